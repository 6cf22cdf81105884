"""The top-label maps: recalibrators of the top-label confidence ``conf ↦ q`` that keep the
argmax, histogram binning (Zadrozny & Elkan 2001) and isotonic regression (Zadrozny & Elkan
2002), and the water-filling that turns ``q`` back into logits (see
:mod:`quantcal.calibration.recal` for the contract).
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar

import numpy as np
import torch

from quantcal.calibration.binning import BINNINGS, bin_mass, bin_width
from quantcal.calibration.checks import ArrayLike, check_choice, check_n_bins
from quantcal.calibration.recal_base import (
    Base,
    apply_input,
    check_state,
    fit_inputs,
    output,
    register,
)

__all__ = ["HistogramBinning", "IsotonicRegression"]

_ETA = 1e-6  # top-label maps: caps at q·(1 − η), q in [1/(1 + (C−1)(1−η)), 1 − η]
#: Counted parameters of the top-label maps (histogram binning's default bins; isotonic
#: regression fits as many steps as its data allow and is counted like it).
_TOP_LABEL_PARAMETERS = 15


# ----------------------------------------------------------------------------------------------
# top-label maps
# ----------------------------------------------------------------------------------------------
def _top_conf_and_correct(z: torch.Tensor, y: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    p = torch.softmax(z.double(), dim=1)
    conf, pred = p.max(dim=1)
    return conf.cpu().numpy(), (pred == y).double().cpu().numpy()


def _with_top_confidence(z: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Logits (log-probabilities shifted so the top class is 0) with top-label confidence ``q``.

    Keeps the argmax; the other classes share ``1 − q`` in proportion to their softmax
    probabilities, water-filled so none exceeds ``q·(1 − η)`` (see ``quantcal.recal``). All in
    log space, so tiny probabilities never underflow to ``log 0``.
    """
    z = z.double()
    c = z.shape[1]
    logp = torch.log_softmax(z, dim=1)
    top = z.argmax(dim=1, keepdim=True)
    is_top = torch.zeros_like(z, dtype=torch.bool).scatter_(1, top, True)
    q = q.to(z).clamp(1.0 / (1.0 + (c - 1) * (1.0 - _ETA)), 1.0 - _ETA)
    cap = q * (1.0 - _ETA)
    log_q, log_cap = torch.log(q), torch.log(cap)
    capped = torch.zeros_like(is_top)
    neg_inf = torch.tensor(float("-inf"), dtype=z.dtype, device=z.device)
    for _ in range(c):
        free = ~capped & ~is_top
        log_free = torch.logsumexp(torch.where(free, logp, neg_inf), dim=1)
        remaining = (1.0 - q - cap * capped.sum(dim=1)).clamp(min=1e-300)
        log_scale = torch.log(remaining) - log_free
        over = free & (log_scale[:, None] + logp > log_cap[:, None])
        if not bool(over.any()):
            break
        capped |= over
    out = torch.where(capped, log_cap[:, None], log_scale[:, None] + logp) - log_q[:, None]
    return out.masked_fill(is_top, 0.0)


class _TopLabel(Base):
    """Shared apply/validation for maps of the top-label confidence ``conf ↦ q``."""

    preserves_argmax: ClassVar[bool] = True

    @classmethod
    def fit_parameters(cls, n_classes: int | None = None) -> int | None:
        return _TOP_LABEL_PARAMETERS

    @abc.abstractmethod
    def _q(self, conf: np.ndarray) -> np.ndarray: ...

    def __call__(self, logits: ArrayLike) -> ArrayLike:
        z = apply_input(logits)
        self._require_fitted(z)
        conf = torch.softmax(z.double(), dim=1).amax(dim=1).cpu().numpy()
        q = torch.from_numpy(np.asarray(self._q(conf), dtype=np.float64))
        return output(_with_top_confidence(z, q.to(z.device)), logits, z)


@register("histogram")
class HistogramBinning(_TopLabel):
    """Top-label histogram binning (Zadrozny & Elkan 2001; Guo et al. 2017).

    Fit: bin the val top-label confidences and store each bin's accuracy; apply: a sample's new
    confidence is its bin's accuracy. ``binning="mass"`` (default) uses the tie-safe equal-mass
    bins of ``quantcal.metrics``; bins are ``(lo, hi]`` with edges halfway between neighbouring
    bins' confidences (first edge 0, last 1), so no bin is empty. ``binning="width"`` uses
    ``B`` equal-width ``(lo, hi]`` bins; an empty bin keeps its centre ``(b + ½)/B`` (the
    identity's best guess, as there is no evidence there).
    """

    name: ClassVar[str] = "histogram"

    def __init__(self, n_bins: int = 15, binning: str = "mass") -> None:
        self.n_bins = check_n_bins(n_bins)
        self.binning = check_choice(binning, BINNINGS, "binning")
        self.edges: np.ndarray | None = None
        self.values: np.ndarray | None = None

    @property
    def fitted(self) -> bool:
        return self.values is not None

    def fit(self, logits: ArrayLike, labels: ArrayLike) -> HistogramBinning:
        z, y = fit_inputs(logits, labels)
        conf, hit = _top_conf_and_correct(z, y)
        conf_t = torch.from_numpy(conf)
        b = self.n_bins
        if self.binning == "width":
            idx = bin_width(conf_t, b).numpy()
            count = np.bincount(idx, minlength=b)
            s_hit = np.bincount(idx, weights=hit, minlength=b)
            centres = (np.arange(b) + 0.5) / b
            self.values = np.where(count > 0, s_hit / np.maximum(count, 1), centres)
            self.edges = np.arange(b + 1, dtype=np.float64) / b
            return self
        idx = bin_mass(conf_t, b).numpy()
        used = np.unique(idx)
        lo = np.array([conf[idx == k].min() for k in used])
        hi = np.array([conf[idx == k].max() for k in used])
        inner = (hi[:-1] + lo[1:]) / 2.0
        self.edges = np.concatenate([[0.0], inner, [1.0]])
        self.values = np.array([hit[idx == k].mean() for k in used])
        return self

    def _q(self, conf: np.ndarray) -> np.ndarray:
        if self.binning == "width":
            return self.values[bin_width(torch.from_numpy(conf), self.n_bins).numpy()]
        return self.values[np.searchsorted(self.edges[1:-1], conf, side="left")]

    def state_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "n_bins": self.n_bins,
            "binning": self.binning,
            "edges": None if self.edges is None else self.edges.tolist(),
            "values": None if self.values is None else self.values.tolist(),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> HistogramBinning:
        check_state(cls, state)
        out = cls(n_bins=state["n_bins"], binning=state["binning"])
        if state.get("values") is not None:
            out.edges = np.asarray(state["edges"], dtype=np.float64)
            out.values = np.asarray(state["values"], dtype=np.float64)
        return out


@register("isotonic")
class IsotonicRegression(_TopLabel):
    """Top-label isotonic regression (Zadrozny & Elkan 2002) via scikit-learn.

    Fits a non-decreasing map ``conf ↦ P(correct)`` on val with
    ``sklearn.isotonic.IsotonicRegression(y_min=0, y_max=1, out_of_bounds="clip")`` and stores
    its thresholds; applying is the same piecewise-linear interpolation (``np.interp``, constant
    beyond the fitted range), so no scikit-learn object needs to be pickled.
    """

    name: ClassVar[str] = "isotonic"

    def __init__(self) -> None:
        self.x_thresholds: np.ndarray | None = None
        self.y_thresholds: np.ndarray | None = None

    @property
    def fitted(self) -> bool:
        return self.x_thresholds is not None

    def fit(self, logits: ArrayLike, labels: ArrayLike) -> IsotonicRegression:
        from sklearn.isotonic import IsotonicRegression as SkIsotonic

        z, y = fit_inputs(logits, labels)
        conf, hit = _top_conf_and_correct(z, y)
        iso = SkIsotonic(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip")
        iso.fit(conf, hit)
        self.x_thresholds = np.asarray(iso.X_thresholds_, dtype=np.float64)
        self.y_thresholds = np.asarray(iso.y_thresholds_, dtype=np.float64)
        return self

    def _q(self, conf: np.ndarray) -> np.ndarray:
        return np.interp(conf, self.x_thresholds, self.y_thresholds)

    def state_dict(self) -> dict[str, Any]:
        fitted = self.fitted
        return {
            "name": self.name,
            "x_thresholds": self.x_thresholds.tolist() if fitted else None,
            "y_thresholds": self.y_thresholds.tolist() if fitted else None,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> IsotonicRegression:
        check_state(cls, state)
        out = cls()
        if state.get("x_thresholds") is not None:
            out.x_thresholds = np.asarray(state["x_thresholds"], dtype=np.float64)
            out.y_thresholds = np.asarray(state["y_thresholds"], dtype=np.float64)
        return out
