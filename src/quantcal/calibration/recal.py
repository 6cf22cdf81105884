"""Post-hoc recalibration: maps from validation logits to better-calibrated logits.

The contract (``Recalibrator``)
-------------------------------
* ``fit(logits, labels) -> self`` on the **val** split only (logits ``(N, C)``, labels ``(N,)``).
* ``__call__(logits) -> logits``: the output is always *logits* whose softmax is the
  recalibrated class distribution, with the input's shape and device, float64 for float64
  input and float32 otherwise, and a numpy array when a numpy array came in. Logit maps
  (temperature, vector, matrix scaling) return the mapped logits. Top-label methods
  (histogram binning, isotonic regression) recalibrate only the top-label confidence ``q``
  and return log-probabilities (shifted so the top class is exactly 0) such that

  - the argmax is the original one and ``max softmax == q`` (up to output-dtype rounding);
  - the remaining mass ``1 − q`` goes to the other classes in proportion to their original
    probabilities, *water-filled* so that none exceeds ``q·(1 − 1e-6)`` (the capped ones sit
    exactly at that cap; keeping them strictly below ``q`` keeps the argmax unique);
  - ``q`` is clipped to ``[1/(1 + (C − 1)(1 − 1e-6)), 1 − 1e-6]``: below 1/C no distribution
    has ``q`` as its maximum, and ``q = 1`` would need ``log 0 = −inf`` logits, which the
    metrics reject.
* ``state_dict()`` returns plain JSON-able data (``name``, parameters, fit diagnostics) and
  ``from_state_dict(d)`` rebuilds an identical recalibrator; ``recal.from_state_dict(d)``
  dispatches on ``d["name"]``.
* class attributes ``name`` (the registry key) and ``preserves_argmax`` (whether the top-1
  prediction, hence accuracy, is guaranteed unchanged).

When a fit can be trusted
-------------------------
:func:`fit_notes` says, for a result row, when a recalibrator's fit should not be taken at its
word: fitted on fewer than :func:`min_fit_images` images (at least ``MIN_FIT_IMAGES`` = 500, and
``MIN_FIT_PER_PARAMETER`` = 50 per fitted parameter: temperature 1, vector scaling 2·C, matrix
scaling C² + C, histogram binning its 15 bins, isotonic regression counted as 15 like histogram
binning), or its held-out ECE measurably above no recalibration (the paired interval of
``ece_diff_vs_none`` above 0). Temperature scaling on a few hundred images of a model that makes
few errors is the common case: the NLL then favours a small T and sharpens an already
calibrated model.

References: Guo et al. 2017 "On Calibration of Modern Neural Networks" (temperature, vector and
matrix scaling); Zadrozny & Elkan 2001 (histogram binning) and 2002 (isotonic regression).
"""

from __future__ import annotations

import abc
import math
import warnings
from typing import Any, ClassVar, Protocol, TypeVar, runtime_checkable

import numpy as np
import torch

from quantcal._registry import Registry
from quantcal.calibration.metrics import (
    BINNINGS,
    ArrayLike,
    _bin_mass,
    _bin_width,
    _check_choice,
    _check_finite,
    _check_n_bins,
    _validate,
    _validate_logits,
)

__all__ = [
    "MIN_FIT_IMAGES",
    "MIN_FIT_PER_PARAMETER",
    "T_MAX",
    "T_MIN",
    "HistogramBinning",
    "Identity",
    "IsotonicRegression",
    "MatrixScaling",
    "NotFittedError",
    "Recalibrator",
    "TemperatureScaling",
    "VectorScaling",
    "available",
    "fit_notes",
    "fit_parameters",
    "from_state_dict",
    "get",
    "keeps_predictions",
    "min_fit_images",
    "register",
]

T_MIN, T_MAX = 1e-2, 1e2  # temperature search interval; a fit at either end warns
_ETA = 1e-6  # top-label maps: caps at q·(1 − η), q in [1/(1 + (C−1)(1−η)), 1 − η]

R = TypeVar("R", bound="_Base")

_REGISTRY: Registry[type] = Registry("recalibrator")
register = _REGISTRY.register


def get(name: str) -> type:
    """The recalibrator class registered as ``name`` (ValueError with suggestions otherwise)."""
    return _REGISTRY.get(name)


def available() -> list[str]:
    """Registered recalibrator names, sorted."""
    return _REGISTRY.available()


def from_state_dict(state: dict[str, Any]) -> Recalibrator:
    """Rebuild any registered recalibrator from its ``state_dict()``."""
    if not isinstance(state, dict) or "name" not in state:
        raise ValueError("state must be a dict produced by a recalibrator's state_dict().")
    return get(state["name"]).from_state_dict(state)


#: The fewest images any recalibrator's fit is trusted on (see "When a fit can be trusted").
MIN_FIT_IMAGES = 500
#: The fewest images per fitted parameter.
MIN_FIT_PER_PARAMETER = 50
#: Counted parameters of the top-label maps (histogram binning's default bins; isotonic
#: regression fits as many steps as its data allow and is counted like it).
_TOP_LABEL_PARAMETERS = 15
_REUSE_FP32 = "temperature_fp32"  # studyconfig.REUSE_FP32_TEMPERATURE (no import cycle)


def fit_parameters(name: str, n_classes: int | None = None) -> int | None:
    """How many numbers ``name`` fits: none 0, temperature (and the fp32 model's temperature
    reused) 1, vector 2·C, matrix C² + C, histogram and isotonic 15; None when it depends on an
    unknown C or the name is not a recalibrator."""
    if name == _REUSE_FP32:
        return 1
    try:
        cls = get(name)
    except ValueError:
        return None
    return cls.fit_parameters(n_classes)


def min_fit_images(name: str, n_classes: int | None = None) -> int:
    """``max(MIN_FIT_IMAGES, MIN_FIT_PER_PARAMETER · fit_parameters)`` (``MIN_FIT_IMAGES`` when
    the count is unknown); 0 for ``none``."""
    k = fit_parameters(name, n_classes)
    if k == 0:
        return 0
    return max(MIN_FIT_IMAGES, MIN_FIT_PER_PARAMETER * (k or 0))


def keeps_predictions(name: str) -> bool:
    """Whether ``name`` keeps every top-1 prediction (``preserves_argmax``); False when it is
    not a known recalibrator."""
    if name == _REUSE_FP32:
        return True
    try:
        return bool(get(name).preserves_argmax)
    except ValueError:
        return False


def fit_notes(
    name: str,
    n_fit: int | None = None,
    n_classes: int | None = None,
    ece_diff_vs_none: tuple[float | None, float | None, float | None] | None = None,
) -> list[str]:
    """The notes on one result row's recalibrator (see "When a fit can be trusted"): a fit on
    ``n_fit`` images, fewer than :func:`min_fit_images`; a held-out ECE change vs no
    recalibration ``(value, lo, hi)`` whose paired interval lies above 0. Empty for ``none``."""
    if name == "none":
        return []
    notes = []
    need = min_fit_images(name, n_classes)
    if n_fit is not None and n_fit < need:
        k = fit_parameters(name, n_classes)
        what = f"{k} parameter{'s' if k != 1 else ''}" if k is not None else "parameters"
        notes.append(
            f"{name} was fitted on {n_fit} images, fewer than the {need} this report trusts (at "
            f"least {MIN_FIT_IMAGES}, and {MIN_FIT_PER_PARAMETER} per fitted parameter; it fits "
            f"{what}): its fit may not reproduce on another sample, a larger recalibration "
            "split settles it (data.val_size; when cross-fitted on test, a larger test split)"
        )
    d, lo, hi = ece_diff_vs_none or (None, None, None)
    if d is not None and lo is not None and hi is not None and lo > 0:
        notes.append(
            f"{name} raised the held-out ECE by {100 * d:+.2f} [{100 * lo:+.2f}, "
            f"{100 * hi:+.2f}] points vs no recalibration (paired): its fit does not carry "
            "over to the test images, and no verdict counts it as a repair"
        )
    return notes


@runtime_checkable
class Recalibrator(Protocol):
    """What every recalibrator offers (see the module docstring for the full contract)."""

    name: ClassVar[str]
    preserves_argmax: ClassVar[bool]

    def fit(self, logits: ArrayLike, labels: ArrayLike) -> Recalibrator: ...

    def __call__(self, logits: ArrayLike) -> ArrayLike: ...

    def state_dict(self) -> dict[str, Any]: ...

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> Recalibrator: ...


class NotFittedError(ValueError):
    """Raised when a recalibrator is applied before ``fit`` (or ``fixed``)."""


# ----------------------------------------------------------------------------------------------
# shared plumbing
# ----------------------------------------------------------------------------------------------
def _fit_inputs(logits: ArrayLike, labels: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated float64 logits and long labels for fitting."""
    z, y = _validate(logits, labels)
    _check_finite(int((~torch.isfinite(z)).any(dim=1).sum()), z.shape[0])
    return z.double(), y


def _apply_input(logits: ArrayLike) -> torch.Tensor:
    z = _validate_logits(logits)
    _check_finite(int((~torch.isfinite(z)).any(dim=1).sum()), z.shape[0])
    return z


def _output(out: torch.Tensor, like: ArrayLike, z: torch.Tensor) -> ArrayLike:
    dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
    out = out.to(dtype=dtype, device=z.device)
    return out.cpu().numpy() if isinstance(like, np.ndarray) else out


def _check_state(cls: type, state: dict[str, Any]) -> None:
    if not isinstance(state, dict) or state.get("name") != cls.name:
        got = state.get("name") if isinstance(state, dict) else type(state).__name__
        raise ValueError(
            f"state_dict is for {got!r}, not {cls.name!r}; use recal.from_state_dict(state)."
        )


class _Base(abc.ABC):
    name: ClassVar[str] = ""
    preserves_argmax: ClassVar[bool] = True
    n_classes: int | None = None

    @classmethod
    def fit_parameters(cls, n_classes: int | None = None) -> int | None:
        """How many numbers a fit sets (None: depends on an unknown ``n_classes``)."""
        return 1

    def _require_fitted(self, z: torch.Tensor) -> None:
        if not self.fitted:
            raise NotFittedError(
                f"{type(self).__name__} is not fitted; call .fit(val_logits, val_labels) first."
            )
        if self.n_classes is not None and z.shape[1] != self.n_classes:
            raise ValueError(
                f"{type(self).__name__} was fitted on C = {self.n_classes} classes but got "
                f"logits with {z.shape[1]} columns."
            )

    @property
    @abc.abstractmethod
    def fitted(self) -> bool: ...

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.state_dict()!r:.200})"

    @abc.abstractmethod
    def state_dict(self) -> dict[str, Any]: ...


# ----------------------------------------------------------------------------------------------
# identity
# ----------------------------------------------------------------------------------------------
@register("none")
class Identity(_Base):
    """No recalibration: returns the logits unchanged (lets studies list "none" uniformly)."""

    name: ClassVar[str] = "none"
    preserves_argmax: ClassVar[bool] = True

    @classmethod
    def fit_parameters(cls, n_classes: int | None = None) -> int | None:
        return 0

    def __init__(self) -> None:
        self._fitted = False

    @property
    def fitted(self) -> bool:
        return self._fitted

    def fit(self, logits: ArrayLike, labels: ArrayLike) -> Identity:
        _fit_inputs(logits, labels)
        self._fitted = True
        return self

    def __call__(self, logits: ArrayLike) -> ArrayLike:
        z = _apply_input(logits)
        self._require_fitted(z)
        return _output(z.clone(), logits, z)

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "fitted": self._fitted}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> Identity:
        _check_state(cls, state)
        out = cls()
        out._fitted = bool(state["fitted"])
        return out


# ----------------------------------------------------------------------------------------------
# temperature scaling
# ----------------------------------------------------------------------------------------------
def _ts_terms(
    zc: torch.Tensor, zc2: torch.Tensor, zy: torch.Tensor, beta: float
) -> tuple[float, float, float]:
    """NLL of softmax(β·z) and its first two derivatives in β (float64).

    With ``zc = z − max z`` per row (the NLL is shift invariant), ``s = Σ_k exp(β zc_k)``:
    ``f = mean(log s − β zc_y)``, ``f' = mean(E_p[zc] − zc_y)``, ``f'' = mean(Var_p[zc]) ≥ 0``.
    """
    e = torch.exp(zc * beta)
    s = e.sum(dim=1)
    m1 = torch.einsum("nc,nc->n", e, zc) / s
    m2 = torch.einsum("nc,nc->n", e, zc2) / s
    f = float((torch.log(s) - beta * zy).mean())
    g = float((m1 - zy).mean())
    h = float((m2 - m1 * m1).clamp(min=0.0).mean())
    return f, g, h


@register("temperature")
class TemperatureScaling(_Base):
    """Temperature scaling (Guo et al. 2017): ``z ↦ z / T`` with the exact NLL-optimal ``T``.

    ``NLL(β) = mean_i[logsumexp(β z_i) − β z_{i,y_i}]`` with ``β = 1/T`` is convex in β
    (``NLL'' = mean Var_p(z) ≥ 0``), so the optimum is unique. ``fit`` solves ``NLL'(β) = 0`` by
    Newton's method in float64, safeguarded by a bracket on β that falls back to geometric
    bisection, until ``|dNLL/d log T| = β·|NLL'(β)| ≤ tol`` (default 1e-10).

    Degenerate inputs end at a bound with a ``RuntimeWarning``, never at NaN or 1e7, and are
    detected exactly before solving: separable data (every label holds its row's top logit, so
    NLL falls as T → 0) give ``T = T_MIN = 0.01``; logits no better than uniform
    (``NLL'(β → 0) = mean(mean_k z_k − z_y) ≥ 0``, optimum at T → ∞) give ``T = T_MAX = 100``;
    constant rows (zero gradient, every T equally good) give ``T = 1``. An interior optimum
    outside ``[T_MIN, T_MAX]`` also stops at the nearer bound with a warning.

    Attributes: ``temperature``, ``n_iter`` (NLL evaluations), ``grad_log_t`` (final
    dNLL/d log T), ``converged``, ``nll`` (val NLL at ``temperature``).
    """

    name: ClassVar[str] = "temperature"
    preserves_argmax: ClassVar[bool] = True

    def __init__(self, *, tol: float = 1e-10, max_iter: int = 100) -> None:
        if not tol > 0:
            raise ValueError(f"tol must be > 0, got {tol}.")
        if int(max_iter) < 1:
            raise ValueError(f"max_iter must be >= 1, got {max_iter}.")
        self.tol = float(tol)
        self.max_iter = int(max_iter)
        self.temperature: float | None = None
        self.n_iter = 0
        self.grad_log_t = float("nan")
        self.converged = False
        self.nll = float("nan")

    @classmethod
    def fixed(cls, temperature: float) -> TemperatureScaling:
        """A ready-to-apply scaler with a given T (e.g. the fp32 model's T on a quantized one)."""
        t = float(temperature)
        if not (math.isfinite(t) and t > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}.")
        out = cls()
        out.temperature = t
        return out

    @property
    def fitted(self) -> bool:
        return self.temperature is not None

    def fit(self, logits: ArrayLike, labels: ArrayLike) -> TemperatureScaling:
        z, y = _fit_inputs(logits, labels)
        zc = z - z.amax(dim=1, keepdim=True)
        zy = zc.gather(1, y[:, None]).squeeze(1)
        if bool((zc.amin(dim=1) == 0).all()):
            warnings.warn(
                "temperature scaling: every logit row is constant, so every T gives the same "
                "NLL; using T = 1.",
                RuntimeWarning,
                stacklevel=2,
            )
            self._set(1.0, 0, 0.0, True, float(math.log(z.shape[1])))
            return self
        if bool((zy == 0).all()):
            warnings.warn(
                "temperature scaling: the validation data are separable (every label has the "
                f"top logit, so NLL keeps falling as T -> 0); using the bound T = {T_MIN:g}.",
                RuntimeWarning,
                stacklevel=2,
            )
            f, g, _ = _ts_terms(zc, zc * zc, zy, 1.0 / T_MIN)
            self._set(T_MIN, 1, -g / T_MIN, False, f)
            return self
        if float((zc.mean(dim=1) - zy).mean()) >= 0:  # NLL'(β → 0) ≥ 0: optimum at T → ∞
            warnings.warn(
                "temperature scaling: the logits are no better than uniform (NLL keeps falling "
                f"as T grows); using the bound T = {T_MAX:g}.",
                RuntimeWarning,
                stacklevel=2,
            )
            f, g, _ = _ts_terms(zc, zc * zc, zy, 1.0 / T_MAX)
            self._set(T_MAX, 1, -g / T_MAX, False, f)
            return self
        beta, evals, grad, f, ok = self._solve(zc, zc * zc, zy)
        self._set(1.0 / beta, evals, -beta * grad, ok, f)
        return self

    def _solve(
        self, zc: torch.Tensor, zc2: torch.Tensor, zy: torch.Tensor
    ) -> tuple[float, int, float, float, bool]:
        """Safeguarded Newton on NLL'(β) = 0 over [1/T_MAX, 1/T_MIN]; returns β, evals, NLL'(β),
        NLL(β), converged. A Newton step that leaves the current bracket becomes a geometric
        bisection; a bracket that collapses onto an end of the interval means the optimum lies
        beyond it (warned, returned at the bound)."""
        b_lo, b_hi = 1.0 / T_MAX, 1.0 / T_MIN
        lo, hi = b_lo, b_hi
        beta = 1.0
        f = g = float("nan")
        for evals in range(1, self.max_iter + 1):
            f, g, h = _ts_terms(zc, zc2, zy, beta)
            if beta * abs(g) <= self.tol:
                return beta, evals, g, f, True
            if g > 0:
                hi = beta
            else:
                lo = beta
            if hi / lo - 1.0 < 1e-13:
                edge = b_hi if g < 0 else b_lo
                if abs(math.log(beta / edge)) > 1e-9:
                    return beta, evals, g, f, True  # interior optimum at float64 resolution
                reason = (
                    "the validation data look separable (NLL keeps falling as T -> 0)"
                    if g < 0
                    else "the logits are no better than uniform (NLL keeps falling as T grows)"
                )
                warnings.warn(
                    f"temperature scaling: {reason}; stopping at the bound T = {1.0 / edge:g}.",
                    RuntimeWarning,
                    stacklevel=3,
                )
                f, g, _ = _ts_terms(zc, zc2, zy, edge)
                return edge, evals + 1, g, f, False
            if evals == self.max_iter:
                break  # return the last point evaluated: its NLL and gradient describe it
            step = beta - g / h if h > 0 else float("nan")
            beta = step if lo < step < hi else math.sqrt(lo * hi)
        warnings.warn(
            f"temperature scaling did not converge in {self.max_iter} evaluations "
            f"(|dNLL/dlogT| = {beta * abs(g):.3g}).",
            RuntimeWarning,
            stacklevel=3,
        )
        return beta, self.max_iter, g, f, False

    def _set(self, t: float, n_iter: int, grad: float, ok: bool, f: float) -> None:
        self.temperature = float(t)
        self.n_iter = int(n_iter)
        self.grad_log_t = float(grad)
        self.converged = bool(ok)
        self.nll = float(f)

    def __call__(self, logits: ArrayLike) -> ArrayLike:
        z = _apply_input(logits)
        self._require_fitted(z)
        cdtype = torch.float64 if z.dtype == torch.float64 else torch.float32
        return _output(z.to(cdtype) / self.temperature, logits, z)

    def state_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "temperature": self.temperature,
            "n_iter": self.n_iter,
            "grad_log_t": None if math.isnan(self.grad_log_t) else self.grad_log_t,
            "converged": self.converged,
            "nll": None if math.isnan(self.nll) else self.nll,
            "tol": self.tol,
            "max_iter": self.max_iter,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> TemperatureScaling:
        _check_state(cls, state)
        out = cls(tol=state.get("tol", 1e-10), max_iter=state.get("max_iter", 100))
        t = state.get("temperature")
        out.temperature = None if t is None else float(t)
        out.n_iter = int(state.get("n_iter", 0))
        nan = float("nan")
        out.grad_log_t = nan if state.get("grad_log_t") is None else float(state["grad_log_t"])
        out.converged = bool(state.get("converged", False))
        out.nll = nan if state.get("nll") is None else float(state["nll"])
        return out


# ----------------------------------------------------------------------------------------------
# vector and matrix scaling
# ----------------------------------------------------------------------------------------------
class _AffineScaling(_Base):
    """Shared fit of an affine logit map by L-BFGS (scipy, float64, analytic gradients).

    Objective: ``mean_i CE(map(z_i), y_i) + (l2/2)·(‖A − A₀‖² + ‖b‖²)`` where ``A₀`` is the
    identity map, so the small ridge pulls towards "no change" and keeps the problem strictly
    convex (also when a class never occurs in val). The gradient of the mean CE with respect
    to the mapped logits is ``G = (softmax − onehot)/N``; ``b`` gets ``Σ_i G_i``. Runs until
    the largest gradient entry is below ``tol`` (default 1e-6; L-BFGS runs at most 3 times, the
    first run and 2 restarts, then a ``RuntimeWarning`` if still above). scipy is used rather
    than ``torch.optim.LBFGS``, whose first use imports ``torch._dynamo`` (seconds).
    """

    preserves_argmax: ClassVar[bool] = False

    def __init__(self, *, l2: float = 1e-4, tol: float = 1e-6, max_iter: int = 1000) -> None:
        if not (l2 >= 0 and math.isfinite(l2)):
            raise ValueError(f"l2 must be a finite number >= 0, got {l2}.")
        if not tol > 0:
            raise ValueError(f"tol must be > 0, got {tol}.")
        if int(max_iter) < 1:
            raise ValueError(f"max_iter must be >= 1, got {max_iter}.")
        self.l2, self.tol, self.max_iter = float(l2), float(tol), int(max_iter)
        self.weight: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None
        self.n_classes = None
        self.n_iter = 0
        self.grad_max = float("nan")
        self.converged = False

    @property
    def fitted(self) -> bool:
        return self.weight is not None

    @abc.abstractmethod
    def _init_weight(self, c: int) -> torch.Tensor: ...

    @abc.abstractmethod
    def _map(self, z: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor: ...

    @abc.abstractmethod
    def _weight_grad(self, g: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Gradient of ``Σ_ik G_ik map(z)_ik`` with respect to the weight."""
        ...

    def fit(self, logits: ArrayLike, labels: ArrayLike) -> _AffineScaling:
        from scipy.optimize import minimize

        z, y = _fit_inputs(logits, labels)
        z, y = z.cpu(), y.cpu()
        n, c = z.shape
        w0 = self._init_weight(c)
        n_w = w0.numel()
        onehot = torch.nn.functional.one_hot(y, c).double()

        def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
            t = torch.from_numpy(theta)
            w, b = t[:n_w].reshape(w0.shape), t[n_w:]
            logp = torch.log_softmax(self._map(z, w, b), dim=1)
            dw, db = w - w0, b
            loss = -(logp * onehot).sum() / n + 0.5 * self.l2 * (dw.pow(2).sum() + db.pow(2).sum())
            g = (logp.exp() - onehot) / n
            grad_w = self._weight_grad(g, z) + self.l2 * dw
            grad_b = g.sum(dim=0) + self.l2 * db
            return float(loss), torch.cat([grad_w.reshape(-1), grad_b]).numpy()

        theta = torch.cat([w0.reshape(-1), torch.zeros(c, dtype=torch.float64)]).numpy()
        self.n_iter = 0
        for _ in range(3):
            res = minimize(
                objective,
                theta,
                jac=True,
                method="L-BFGS-B",
                options={"maxiter": self.max_iter, "gtol": self.tol, "ftol": 1e-15},
            )
            theta, self.n_iter = res.x, self.n_iter + int(res.nit)
            self.grad_max = float(np.abs(objective(theta)[1]).max())
            if self.grad_max <= self.tol:
                break
        self.converged = self.grad_max <= self.tol
        if not self.converged:
            warnings.warn(
                f"{type(self).__name__}: L-BFGS stopped with max |gradient| = "
                f"{self.grad_max:.3g} > {self.tol:g} after {self.n_iter} iterations.",
                RuntimeWarning,
                stacklevel=2,
            )
        t = torch.from_numpy(theta)
        self.weight, self.bias, self.n_classes = t[:n_w].reshape(w0.shape).clone(), t[n_w:], c
        return self

    def __call__(self, logits: ArrayLike) -> ArrayLike:
        z = _apply_input(logits)
        self._require_fitted(z)
        out = self._map(z.double(), self.weight.to(z.device), self.bias.to(z.device))
        return _output(out, logits, z)

    def state_dict(self) -> dict[str, Any]:
        fitted = self.fitted
        return {
            "name": self.name,
            "l2": self.l2,
            "tol": self.tol,
            "max_iter": self.max_iter,
            "weight": self.weight.tolist() if fitted else None,
            "bias": self.bias.tolist() if fitted else None,
            "n_iter": self.n_iter,
            "grad_max": self.grad_max if fitted else None,
            "converged": self.converged,
        }

    @classmethod
    def from_state_dict(cls: type[R], state: dict[str, Any]) -> R:
        _check_state(cls, state)
        out = cls(l2=state["l2"], tol=state["tol"], max_iter=state["max_iter"])
        if state.get("weight") is not None:
            out.weight = torch.tensor(state["weight"], dtype=torch.float64)
            out.bias = torch.tensor(state["bias"], dtype=torch.float64)
            out.n_classes = int(out.bias.shape[0])
            out.grad_max = float(state["grad_max"])
        out.n_iter = int(state.get("n_iter", 0))
        out.converged = bool(state.get("converged", False))
        return out


@register("vector")
class VectorScaling(_AffineScaling):
    """Vector scaling (Guo et al. 2017): ``z ↦ w ⊙ z + b`` with per-class ``w, b ∈ R^C``.

    Not argmax preserving: per-class scales and biases can reorder classes.
    """

    name: ClassVar[str] = "vector"

    @classmethod
    def fit_parameters(cls, n_classes: int | None = None) -> int | None:
        return None if n_classes is None else 2 * n_classes

    def _init_weight(self, c: int) -> torch.Tensor:
        return torch.ones(c, dtype=torch.float64)

    def _map(self, z: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return z * w + b

    def _weight_grad(self, g: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return (g * z).sum(dim=0)


@register("matrix")
class MatrixScaling(_AffineScaling):
    """Matrix scaling (Guo et al. 2017): ``z ↦ W z + b`` with ``W ∈ R^{C×C}``, ridge towards I.

    Not argmax preserving; C² parameters, so it needs a large val split (or a larger ``l2``).
    """

    name: ClassVar[str] = "matrix"

    @classmethod
    def fit_parameters(cls, n_classes: int | None = None) -> int | None:
        return None if n_classes is None else n_classes * n_classes + n_classes

    def _init_weight(self, c: int) -> torch.Tensor:
        return torch.eye(c, dtype=torch.float64)

    def _map(self, z: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return z @ w.T + b

    def _weight_grad(self, g: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return g.T @ z


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
    probabilities, water-filled so none exceeds ``q·(1 − η)`` (see the module docstring). All in
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


class _TopLabel(_Base):
    """Shared apply/validation for maps of the top-label confidence ``conf ↦ q``."""

    preserves_argmax: ClassVar[bool] = True

    @classmethod
    def fit_parameters(cls, n_classes: int | None = None) -> int | None:
        return _TOP_LABEL_PARAMETERS

    @abc.abstractmethod
    def _q(self, conf: np.ndarray) -> np.ndarray: ...

    def __call__(self, logits: ArrayLike) -> ArrayLike:
        z = _apply_input(logits)
        self._require_fitted(z)
        conf = torch.softmax(z.double(), dim=1).amax(dim=1).cpu().numpy()
        q = torch.from_numpy(np.asarray(self._q(conf), dtype=np.float64))
        return _output(_with_top_confidence(z, q.to(z.device)), logits, z)


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
        self.n_bins = _check_n_bins(n_bins)
        self.binning = _check_choice(binning, BINNINGS, "binning")
        self.edges: np.ndarray | None = None
        self.values: np.ndarray | None = None

    @property
    def fitted(self) -> bool:
        return self.values is not None

    def fit(self, logits: ArrayLike, labels: ArrayLike) -> HistogramBinning:
        z, y = _fit_inputs(logits, labels)
        conf, hit = _top_conf_and_correct(z, y)
        conf_t = torch.from_numpy(conf)
        b = self.n_bins
        if self.binning == "width":
            idx = _bin_width(conf_t, b).numpy()
            count = np.bincount(idx, minlength=b)
            s_hit = np.bincount(idx, weights=hit, minlength=b)
            centres = (np.arange(b) + 0.5) / b
            self.values = np.where(count > 0, s_hit / np.maximum(count, 1), centres)
            self.edges = np.arange(b + 1, dtype=np.float64) / b
            return self
        idx = _bin_mass(conf_t, b).numpy()
        used = np.unique(idx)
        lo = np.array([conf[idx == k].min() for k in used])
        hi = np.array([conf[idx == k].max() for k in used])
        inner = (hi[:-1] + lo[1:]) / 2.0
        self.edges = np.concatenate([[0.0], inner, [1.0]])
        self.values = np.array([hit[idx == k].mean() for k in used])
        return self

    def _q(self, conf: np.ndarray) -> np.ndarray:
        if self.binning == "width":
            return self.values[_bin_width(torch.from_numpy(conf), self.n_bins).numpy()]
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
        _check_state(cls, state)
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

        z, y = _fit_inputs(logits, labels)
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
        _check_state(cls, state)
        out = cls()
        if state.get("x_thresholds") is not None:
            out.x_thresholds = np.asarray(state["x_thresholds"], dtype=np.float64)
            out.y_thresholds = np.asarray(state["y_thresholds"], dtype=np.float64)
        return out
