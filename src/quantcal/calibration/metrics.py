"""Calibration metrics: pure functions of raw logits ``(N, C)`` and integer labels ``(N,)``.

Every function takes **logits** (never probabilities), as torch tensors (CPU or CUDA) or numpy
arrays, in float16, bfloat16, float32 or float64. Per-row work runs in float32 (float64 for
float64 logits); every sum over samples runs in float64. Results are Python floats.

Binning conventions (shared by every binned metric here)
-------------------------------------------------------
* ``binning="width"``: ``B`` equal-width bins ``(b/B, (b+1)/B]``; confidence 0 goes into the first
  bin and exactly 1.0 into the last (there is no hidden extra bin for 1.0, unlike torchmetrics,
  Lightning-AI/torchmetrics#3510). The index is ``ceil(B·c·(1 − 8ε)) − 1`` clamped to
  ``[0, B − 1]``, computed in float64, where ε is the machine epsilon of the dtype the confidence
  was computed in. So a confidence within 8ε (relative) of an edge ``i/B`` counts as *on* the
  edge and goes into the lower bin: a three-way tie gives 1/3, stored as 0.33333334 in float32,
  and lands in the bin ending at 5/15 whether the logits were float32 or float64.
* ``binning="mass"`` (adaptive): bins of (nearly) equal sample count that never split tied
  confidences. Samples are grouped by exactly equal confidence; a group whose mid-rank
  ``S − n/2`` (``S`` = cumulative count up to and including the group, ``n`` = its size) is
  ``r`` goes into bin ``min(B − 1, floor(B·r/N))``. Without ties each bin gets ``N/B`` samples
  (±1); a large tie group keeps its samples together, so fewer than ``B`` bins may be non-empty.
  Empty bins never contribute.

References: Guo et al. 2017 "On Calibration of Modern Neural Networks" (ECE, MCE);
Nixon et al. 2019 "Measuring Calibration in Deep Learning" (adaptive and class-wise ECE);
Kumar, Liang & Ma 2019 "Verified Uncertainty Calibration" (debiased estimator);
Brier 1950; Efron & Tibshirani 1993 (percentile bootstrap); Błasiok & Nakkiran 2024 "Smooth ECE:
Principled Reliability Diagrams via Kernel Smoothing" (smooth ECE, no bins).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from quantcal._registry import unknown_name_message

ArrayLike = torch.Tensor | np.ndarray
MetricFn = Callable[[torch.Tensor, torch.Tensor], float]

BINNINGS = ("width", "mass")
NORMS = ("l1", "l2", "max")
_EDGE_ULPS = 8.0  # confidences within this many machine epsilons of an edge count as on it
_CHUNK_ELEMS = 1 << 20  # logits per chunk in row-wise passes (4 MiB of float32: cache friendly)

__all__ = [
    "BINNINGS",
    "NORMS",
    "Reliability",
    "accuracy",
    "adaptive_ece",
    "bootstrap_ci",
    "bootstrap_metric_names",
    "brier",
    "calibration_report",
    "classwise_ece",
    "debiased_ece",
    "debiased_ece_sq",
    "ece",
    "mce",
    "mean_confidence",
    "nll",
    "paired_bootstrap_contrast",
    "paired_bootstrap_diff",
    "plot_reliability",
    "reliability",
    "smooth_ece",
    "smooth_ece_from_confidences",
]


# ----------------------------------------------------------------------------------------------
# validation (one shared validator for every public function)
# ----------------------------------------------------------------------------------------------
def _as_tensor(x: object, what: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    raise TypeError(
        f"{what} must be a torch.Tensor or a numpy.ndarray, got {type(x).__name__}; "
        f"convert it with torch.as_tensor(...) first."
    )


def _validate_logits(logits: ArrayLike) -> torch.Tensor:
    """Check type, dtype and shape of ``logits`` (not finiteness, see ``_check_finite``)."""
    z = _as_tensor(logits, "logits")
    if not z.is_floating_point():
        raise TypeError(
            f"logits must be a floating-point array (float16/bfloat16/float32/float64), got "
            f"dtype {z.dtype}; pass the raw network outputs, e.g. logits.float()."
        )
    if z.dim() != 2:
        raise ValueError(
            f"logits must be 2-D with shape (N, C), got shape {tuple(z.shape)}; "
            f"flatten extra dimensions or add a batch dimension."
        )
    if z.shape[0] == 0:
        raise ValueError("logits is empty (N = 0): metrics need at least one sample.")
    if z.shape[1] < 2:
        raise ValueError(
            f"logits must have at least 2 classes (columns), got C = {z.shape[1]}; for a "
            f"binary problem with one logit s per sample pass the two columns [0, s]."
        )
    _refuse_probabilities(z)
    return z


def _refuse_probabilities(z: torch.Tensor, head: int = 1024) -> None:
    """Raise when the input holds probabilities: every entry of the first ``head`` rows in
    [0, 1] and each of those rows summing to 1 (within 1e-4). Softmax of probabilities is not
    the model's confidence (``ece(probs)`` came out 0.742 where the truth was 0.027), so this
    is never computed silently; logits of real models do not look like this."""
    if not z.is_floating_point():
        return
    rows = z[:head]
    lo, hi = rows.amin(), rows.amax()
    if not (bool(lo >= 0) and bool(hi <= 1)):
        return
    if bool(((rows.double().sum(dim=1) - 1.0).abs() <= 1e-4).all()):
        raise ValueError(
            "these look like probabilities (every row lies in [0, 1] and sums to 1), but "
            "metrics and recalibrators take logits: softmax applied to probabilities is not the "
            "model's confidence. Pass the logits, or log-probabilities (probs.log(), which have "
            "the same softmax); if the model ends with a softmax, take the layer before it."
        )


def _validate(logits: ArrayLike, labels: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared validator: returns ``(logits, labels)`` as tensors on the logits' device.

    Raises TypeError for non-array inputs, floating/bool labels or integer logits; ValueError
    for wrong shapes, an empty input, fewer than 2 classes or labels outside ``[0, C)``.
    Non-finite logits are caught during the row pass (``_check_finite``), which reuses the
    row maximum the metric needs anyway instead of reading the logits a second time.
    """
    z = _validate_logits(logits)
    y = _as_tensor(labels, "labels")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise TypeError(
            f"labels must be integer class indices, got dtype {y.dtype}; "
            f"convert with labels.long() (or np.asarray(labels, dtype=np.int64))."
        )
    if y.dim() != 1:
        raise ValueError(
            f"labels must be 1-D with shape (N,), got shape {tuple(y.shape)}; "
            f"pass class indices, not one-hot rows."
        )
    if y.shape[0] != z.shape[0]:
        raise ValueError(
            f"shape mismatch: logits has N = {z.shape[0]} rows but labels has "
            f"{y.shape[0]} entries; they must describe the same samples."
        )
    y = y.to(device=z.device, dtype=torch.long)
    n_classes = z.shape[1]
    bad = (y < 0) | (y >= n_classes)
    if bool(bad.any()):
        n_bad = int(bad.sum())
        lo, hi = int(y.min()), int(y.max())
        raise ValueError(
            f"labels must lie in [0, C) = [0, {n_classes}); {n_bad} label(s) do not "
            f"(min {lo}, max {hi}). Check the label encoding and the number of logit columns."
        )
    return z, y


def _check_n_bins(n_bins: int) -> int:
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)):
        raise TypeError(f"n_bins must be an int >= 1, got {n_bins!r}.")
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}; 15 is the usual choice.")
    return int(n_bins)


def _check_choice(value: str, allowed: tuple[str, ...], what: str) -> str:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; allowed values: {', '.join(allowed)}.")
    return value


def _check_finite(n_bad_rows: int, n_rows: int) -> None:
    if n_bad_rows:
        raise ValueError(
            f"logits contain NaN or Inf in {n_bad_rows} of {n_rows} rows; metrics need finite "
            f"logits. Look for a diverged model or an overflowing low-precision cast."
        )


# ----------------------------------------------------------------------------------------------
# row passes
# ----------------------------------------------------------------------------------------------
def _compute_dtype(z: torch.Tensor) -> torch.dtype:
    return torch.float64 if z.dtype == torch.float64 else torch.float32


def _chunks(n_rows: int, n_cols: int) -> Iterator[slice]:
    step = max(1, _CHUNK_ELEMS // max(1, n_cols))
    for start in range(0, n_rows, step):
        yield slice(start, min(n_rows, start + step))


def _top_label(z: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-label confidence and correctness, without materialising the softmax.

    Row chunk by row chunk (cache sized): ``m = max z``, ``conf = 1 / Σ_k exp(z_k − m)`` (the
    max entry contributes exp(0) = 1 exactly), and ``correct = (argmax z == y)`` with argmax
    the first index among ties (as ``torch.argmax``). ``correct`` is computed as
    ``z_y == m`` and only rows where the top value is tied pay for a real argmax, which is
    much slower than a plain max. A chunk's ``min`` catches non-finite rows.
    """
    n, c = z.shape
    cdtype = _compute_dtype(z)
    conf = torch.empty(n, dtype=cdtype, device=z.device)
    correct = torch.empty(n, dtype=torch.bool, device=z.device)
    n_bad = torch.zeros((), dtype=torch.long, device=z.device)
    buf = None
    for sl in _chunks(n, c):
        zc = z[sl].to(cdtype)
        yc = y[sl]
        zmax = zc.amax(dim=1)
        zmin = zc.amin(dim=1)
        n_bad += (~torch.isfinite(zmax) | ~torch.isfinite(zmin)).sum()
        if buf is None or buf.shape != zc.shape:
            buf = torch.empty_like(zc)
        torch.sub(zc, zmax[:, None], out=buf)
        total = torch.sum(buf.exp_(), dim=1, out=conf[sl])
        hit = zc.gather(1, yc[:, None]).squeeze(1) == zmax
        # k tied maxima add exactly k to the sum, so a row with sum < 2 has a unique maximum;
        # only the rest of the hits need the (slow) first-index argmax.
        maybe_tied = hit & (total >= 2.0)
        if bool(maybe_tied.any()):
            rows = maybe_tied.nonzero().squeeze(1)
            hit[rows] = zc[rows].argmax(dim=1) == yc[rows]
        correct[sl] = hit
    _check_finite(int(n_bad), n)
    return conf.reciprocal_(), correct


@dataclass(frozen=True)
class _Rows:
    """Per-sample quantities from one softmax pass (float64 unless noted)."""

    conf: torch.Tensor  # compute dtype
    correct: torch.Tensor  # bool
    nll: torch.Tensor
    brier: torch.Tensor
    classwise: torch.Tensor | None  # (3, C*B) float64 sums: count, prob, hit


def _softmax_rows(z: torch.Tensor, y: torch.Tensor, classwise_bins: int | None) -> _Rows:
    """One pass of log-softmax over the rows giving every per-sample quantity the report needs."""
    n, c = z.shape
    cdtype = _compute_dtype(z)
    conf = torch.empty(n, dtype=cdtype, device=z.device)
    correct = torch.empty(n, dtype=torch.bool, device=z.device)
    nll_i = torch.empty(n, dtype=torch.float64, device=z.device)
    brier_i = torch.empty(n, dtype=torch.float64, device=z.device)
    cw = None
    if classwise_bins is not None:
        cw = torch.zeros(3, c * classwise_bins, dtype=torch.float64, device=z.device)
        offsets = torch.arange(c, device=z.device) * classwise_bins
    n_bad = 0
    for sl in _chunks(n, c):
        zc = z[sl].to(cdtype)
        yc = y[sl]
        zmax, zarg = zc.max(dim=1)
        zmin = zc.amin(dim=1)
        n_bad += int((~torch.isfinite(zmax) | ~torch.isfinite(zmin)).sum())
        shifted = zc - zmax[:, None]
        e = torch.exp(shifted)
        s = e.sum(dim=1)
        p = e / s[:, None]
        conf[sl] = s.reciprocal()
        correct[sl] = zarg == yc
        z_y = shifted.gather(1, yc[:, None]).squeeze(1)
        nll_i[sl] = torch.log(s).double() - z_y.double()
        p_y = p.gather(1, yc[:, None]).squeeze(1).double()
        brier_i[sl] = (p.double() ** 2).sum(dim=1) - 2.0 * p_y + 1.0
        if cw is not None:
            key = (_bin_width(p, classwise_bins) + offsets).reshape(-1)
            hit = torch.nn.functional.one_hot(yc, c).reshape(-1).double()
            size = c * classwise_bins
            cw[0] += torch.bincount(key, minlength=size).double()
            cw[1] += torch.bincount(key, weights=p.reshape(-1).double(), minlength=size)
            cw[2] += torch.bincount(key, weights=hit, minlength=size)
    _check_finite(n_bad, n)
    return _Rows(conf, correct, nll_i, brier_i, cw)


# ----------------------------------------------------------------------------------------------
# binning and bin statistics
# ----------------------------------------------------------------------------------------------
def _bin_width(conf: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Equal-width bin index ``ceil(B·c·(1 − 8ε)) − 1`` clamped to ``[0, B − 1]`` (module doc)."""
    eps = torch.finfo(conf.dtype).eps
    x = conf.double() * (n_bins * (1.0 - _EDGE_ULPS * eps))
    return (torch.ceil(x).long() - 1).clamp_(0, n_bins - 1)


def _mass_bins_of_groups(counts: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Bin of each tie group from its mid-rank: ``min(B − 1, floor(B·(S − n/2)/N))``.

    ``counts`` is ``(..., G)`` (group sizes in increasing confidence order, zeros allowed).
    """
    cum = counts.cumsum(dim=-1)
    total = cum[..., -1:]
    mid = cum - 0.5 * counts
    return torch.floor(n_bins * mid / total).long().clamp_(0, n_bins - 1)


def _conf_groups(conf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Group id of every sample (groups of exactly equal confidence, in increasing order)."""
    values, order = torch.sort(conf)
    _, inverse_sorted, counts = torch.unique_consecutive(
        values, return_inverse=True, return_counts=True
    )
    group = torch.empty_like(inverse_sorted)
    group[order] = inverse_sorted
    return group, counts


def _bin_mass(conf: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Equal-mass bin index that never splits tied confidences (see module doc)."""
    group, counts = _conf_groups(conf)
    return _mass_bins_of_groups(counts.double(), n_bins)[group]


def _bin_index(conf: torch.Tensor, n_bins: int, binning: str) -> torch.Tensor:
    return _bin_width(conf, n_bins) if binning == "width" else _bin_mass(conf, n_bins)


def _bin_sums(
    idx: torch.Tensor, conf: torch.Tensor, correct: torch.Tensor, n_bins: int
) -> torch.Tensor:
    """``(3, B)`` float64: count, sum of confidence and number correct per bin."""
    return torch.stack(
        [
            torch.bincount(idx, minlength=n_bins).double(),
            torch.bincount(idx, weights=conf.double(), minlength=n_bins),
            torch.bincount(idx, weights=correct.double(), minlength=n_bins),
        ]
    )


def _ce_from_sums(count: torch.Tensor, s_conf: torch.Tensor, s_hit: torch.Tensor, norm: str):
    """Binned calibration error from per-bin sums; all ``(..., B)``, result ``(...)``.

    l1: ``Σ_b (n_b/N)|acc_b − conf_b|``; l2: ``sqrt(Σ_b (n_b/N)(acc_b − conf_b)²)``;
    max: ``max_b |acc_b − conf_b|`` over non-empty bins (MCE).
    """
    total = count.sum(dim=-1)
    if norm == "l1":
        return (s_hit - s_conf).abs().sum(dim=-1) / total
    nonempty = count > 0
    gap = (s_hit - s_conf).abs() / count.clamp(min=1.0)
    if norm == "l2":
        return torch.sqrt((count * gap**2).sum(dim=-1) / total)
    return torch.where(nonempty, gap, torch.full_like(gap, -1.0)).amax(dim=-1)


def _debiased_sq_from_sums(count: torch.Tensor, s_conf: torch.Tensor, s_hit: torch.Tensor):
    """Kumar et al. 2019 debiased squared l2 error from per-bin sums (bins with n_b < 2 add 0)."""
    total = count.sum(dim=-1)
    safe = count.clamp(min=1.0)
    acc = s_hit / safe
    conf = s_conf / safe
    var_of_mean = acc * (1.0 - acc) / (count - 1.0).clamp(min=1.0)
    term = (acc - conf) ** 2 - var_of_mean
    term = torch.where(count >= 2, term, torch.zeros_like(term))
    return (count * term).sum(dim=-1) / total


# ----------------------------------------------------------------------------------------------
# public metrics
# ----------------------------------------------------------------------------------------------
def ece(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    n_bins: int = 15,
    binning: str = "width",
    norm: str = "l1",
) -> float:
    """Top-label expected calibration error (Guo et al. 2017).

    ``ECE = Σ_b (n_b/N)·|acc_b − conf_b|`` with ``conf = max softmax`` and ``acc`` the fraction
    of argmax predictions that are right; ``norm="l2"`` gives ``sqrt(Σ_b (n_b/N)(acc_b −
    conf_b)²)`` and ``norm="max"`` the largest gap over non-empty bins (MCE). Bins follow the
    module's conventions (``binning="width"`` (lo, hi] bins, ``"mass"`` tie-safe equal-mass).
    """
    n_bins = _check_n_bins(n_bins)
    _check_choice(binning, BINNINGS, "binning")
    _check_choice(norm, NORMS, "norm")
    z, y = _validate(logits, labels)
    conf, correct = _top_label(z, y)
    sums = _bin_sums(_bin_index(conf, n_bins, binning), conf, correct, n_bins)
    return float(_ce_from_sums(sums[0], sums[1], sums[2], norm))


def mce(logits: ArrayLike, labels: ArrayLike, *, n_bins: int = 15, binning: str = "width") -> float:
    """Maximum calibration error (Guo et al. 2017): ``max_b |acc_b − conf_b|``, non-empty bins."""
    return ece(logits, labels, n_bins=n_bins, binning=binning, norm="max")


def adaptive_ece(
    logits: ArrayLike, labels: ArrayLike, *, n_bins: int = 15, norm: str = "l1"
) -> float:
    """ECE with tie-safe equal-mass bins (Nixon et al. 2019): ``ece(..., binning="mass")``."""
    return ece(logits, labels, n_bins=n_bins, binning="mass", norm=norm)


def debiased_ece_sq(
    logits: ArrayLike, labels: ArrayLike, *, n_bins: int = 15, binning: str = "width"
) -> float:
    """Debiased estimate of the **squared** l2 binned calibration error (Kumar et al. 2019).

    The plug-in ``ece(norm="l2")**2 = Σ_b (n_b/N)(acc_b − conf_b)²`` overestimates the squared
    error of the binned model ``E_b[(E[Y | b] − E[conf | b])²]`` because ``acc_b`` is noisy.
    Subtracting the unbiased variance of each bin's mean label gives
    ``Σ_b (n_b/N)[(acc_b − conf_b)² − acc_b(1 − acc_b)/(n_b − 1)]``; bins with fewer than two
    samples contribute 0 (as in Kumar et al.'s reference code). The estimate can be negative.
    """
    n_bins = _check_n_bins(n_bins)
    _check_choice(binning, BINNINGS, "binning")
    z, y = _validate(logits, labels)
    conf, correct = _top_label(z, y)
    sums = _bin_sums(_bin_index(conf, n_bins, binning), conf, correct, n_bins)
    return float(_debiased_sq_from_sums(sums[0], sums[1], sums[2]))


def debiased_ece(
    logits: ArrayLike, labels: ArrayLike, *, n_bins: int = 15, binning: str = "width"
) -> float:
    """``sqrt(max(0, debiased_ece_sq))``: debiased l2 calibration error (Kumar et al. 2019).

    Comparable with ``ece(norm="l2")`` (the biased plug-in on the same bins).
    """
    return math.sqrt(max(0.0, debiased_ece_sq(logits, labels, n_bins=n_bins, binning=binning)))


# ----------------------------------------------------------------------------------------------
# smooth ECE (Błasiok & Nakkiran 2024)
# ----------------------------------------------------------------------------------------------
_SMECE_MIN_BANDWIDTH = 1e-4  # the evaluation grid has round(10 / bandwidth) points
_SMECE_FLAT_BANDWIDTH = 3.0  # from here on the reflected kernel is constant in double precision
_SMECE_CUT = 10.0  # the Gaussian is summed out to 10 bandwidths: exp(-50) ~ 2e-22
_SMECE_SEARCH_STEPS = 10  # halvings of [0, 1] in the bandwidth search (relplot: 10)
_SMECE_SEARCH_FLOOR = 1e-3  # bandwidths below this count as below the fixed point (relplot)


def _smece_grid_size(sigma: float) -> int:
    """Evaluation points ``T = max(200, round(10/σ))`` on [0, 1], as the authors' relplot."""
    return max(200, round(10.0 / sigma))


def _smece_n_terms(v: float) -> int:
    """Terms of the Hermite expansion ``exp(uv − v²/2) = Σ_p He_p(u) v^p / p!`` needed for
    double precision: by Cramér's bound ``|He_p(u)| e^{−u²/2} ≤ 1.09 √p!`` term p is at most
    ``1.09 v^p / √p!``; here ``v = Δ/(2σ) ≤ 0.0504``, so 11 terms at most."""
    p = 1
    while v**p / math.sqrt(math.factorial(p)) > 1e-17:
        p += 1
    return p


def _fast_fft_len(n: int) -> int:
    """The smallest 2^a 3^b 5^c >= n (pocketfft is fastest on such lengths)."""
    best = 1 << max(0, (n - 1).bit_length())
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            m = p35
            while m < n:
                m *= 2
            best = min(best, m)
            p35 *= 3
        p5 *= 5
    return best


class _SmoothEce:
    """Smooth ECE of fixed ``(confidence, residual)`` data at any bandwidth σ.

    ``value(σ) = Σ_k |S_r(t_k)| / Σ_k S_1(t_k)`` on the grid ``t_k = k/(T − 1)``, where
    ``S_w(t) = Σ_i w_i K_σ(t, f_i)`` with the reflected Gaussian kernel
    ``K_σ(t, f) = Σ_{m∈Z} φ_σ(t − f − 2m) + φ_σ(t + f − 2m)`` (every reflection at 0 and 1).

    The sums are exact (to rounding), not binned: each sample sits at ``c_i Δ + d_i`` with
    ``c_i`` its nearest grid index and ``|d_i| ≤ Δ/2``, and with ``u = (j − c_i)Δ/σ``,
    ``v_i = d_i/σ`` the Gaussian factors as ``φ(u − v_i) = φ(u) Σ_p He_p(u) v_i^p / p!``. So
    ``S_w`` on the lattice is ``Σ_p (M_p ∗ H_p)`` with per-cell moments
    ``M_p(c) = Σ_{c_i = c} w_i d_i^p / (σ^p p!)`` and ``H_p(m) = He_p(mΔ/σ) φ(mΔ/σ)`` (one FFT
    convolution). The images of the reflections are folded in afterwards: lattice point ``j``
    adds to grid point ``k`` when ``j ≡ ±k (mod 2(T − 1))``. Moments depend on σ only through
    ``T``, so a bandwidth search reuses them; equal confidences are merged first.
    """

    def __init__(self, conf: np.ndarray, resid: np.ndarray) -> None:
        order = np.argsort(conf)
        f, r = conf[order], resid[order]
        starts = np.flatnonzero(np.concatenate(([True], f[1:] != f[:-1])))
        counts = np.diff(np.append(starts, f.shape[0])).astype(np.float64)
        self.f = f[starts]  # distinct confidences, increasing
        self.w = np.stack([counts, np.add.reduceat(r, starts)])  # (2, G): weight 1 and residual
        self.n = float(f.shape[0])
        self._grids: dict[int, list[Any]] = {}
        self._values: dict[float, float] = {}

    def _moments(self, t: int, n_terms: int) -> np.ndarray:
        """``(2, n_terms, t)`` raw moments ``Σ_{c_i = c} w_i d_i^p`` per grid cell."""
        grid = self._grids.get(t)
        if grid is None:
            cell = np.rint(self.f * (t - 1))
            d = self.f - cell / (t - 1)
            cell = cell.astype(np.intp)  # non-decreasing, as f is sorted
            starts = np.flatnonzero(np.concatenate(([True], cell[1:] != cell[:-1])))
            grid = self._grids[t] = [d, starts, cell[starts], None, []]
        d, starts, cells, power, moments = grid
        while len(moments) < n_terms:
            power = self.w.copy() if power is None else np.multiply(power, d, out=power)
            full = np.zeros((2, t))
            full[:, cells] = np.add.reduceat(power, starts, axis=1)
            moments.append(full)
        grid[3] = power
        return np.stack(moments[:n_terms], axis=1)

    def value(self, sigma: float) -> float:
        sigma = float(sigma)
        if sigma not in self._values:
            self._values[sigma] = self._compute(sigma)
        return self._values[sigma]

    def _compute(self, sigma: float) -> float:
        if sigma >= _SMECE_FLAT_BANDWIDTH:  # K_σ ≡ 1 to within 2·exp(−π²σ²/2) < 1e-19
            return min(1.0, abs(float(self.w[1].sum())) / self.n)
        t = _smece_grid_size(sigma)
        step = 1.0 / (t - 1)
        period = 2 * (t - 1)
        n_terms = _smece_n_terms(step / (2.0 * sigma) * (1.0 + 1e-9))
        scale = np.array([sigma**-p / math.factorial(p) for p in range(n_terms)])
        cells = self._moments(t, n_terms) * scale[:, None]  # (2, P, t)
        radius = math.ceil(_SMECE_CUT * sigma / step)
        u = np.arange(-radius, radius + 1) * (step / sigma)
        hermite = np.zeros((n_terms, u.shape[0]))  # H_p(m) = He_p(u) exp(-u²/2)
        hermite[0] = np.exp(-0.5 * u * u)
        if n_terms > 1:
            hermite[1] = u * hermite[0]
        for p in range(1, n_terms - 1):
            hermite[p + 1] = u * hermite[p] - p * hermite[p - 1]
        # linear convolution (FFT of a 5-smooth length) onto lattice points -radius..t-1+radius
        size = _fast_fft_len(t + 2 * radius)
        spectrum = np.einsum(
            "spk,pk->sk",
            np.fft.rfft(cells, n=size, axis=-1),
            np.fft.rfft(hermite, n=size, axis=-1),
        )
        lattice = np.fft.irfft(spectrum, n=size, axis=-1)[:, : t + 2 * radius]
        # fold the images: lattice point j lands on grid point k with j ≡ ±k (mod 2(t - 1));
        # at k = 0 and k = t - 1 both congruences hold, so those points count twice.
        j = np.arange(-radius, t + radius) % period
        k = np.where(j < t, j, period - j)
        smoothed = np.stack([np.bincount(k, weights=row, minlength=t) for row in lattice])
        smoothed[:, [0, t - 1]] *= 2.0  # (2, t): density, residual
        return min(1.0, float(np.abs(smoothed[1]).sum() / smoothed[0].sum()))

    def search(self) -> tuple[float, float]:
        """``(smooth ECE, σ*)`` at the automatic bandwidth: the fixed point ``σ = smECE_σ``
        by 10 halvings of [0, 1] (σ below 0.001 counts as below it); σ* is the upper end of
        the last interval, where ``smECE_σ ≤ σ``."""
        lo, hi = 0.0, 1.0
        for _ in range(_SMECE_SEARCH_STEPS):
            mid = 0.5 * (lo + hi)
            if mid < _SMECE_SEARCH_FLOOR or mid < self.value(mid):
                lo = mid
            else:
                hi = mid
        return self.value(hi), hi


def _check_bandwidth(bandwidth: float | None) -> float | None:
    if bandwidth is None:
        return None
    if isinstance(bandwidth, bool) or not isinstance(
        bandwidth, (int, float, np.integer, np.floating)
    ):
        raise TypeError(f"bandwidth must be a float or None (automatic), got {bandwidth!r}.")
    value = float(bandwidth)
    if not (math.isfinite(value) and value >= _SMECE_MIN_BANDWIDTH):
        raise ValueError(
            f"bandwidth must be a finite number >= {_SMECE_MIN_BANDWIDTH:g} (the evaluation grid "
            f"has round(10 / bandwidth) points), got {bandwidth!r}; None picks the paper's "
            f"automatic bandwidth."
        )
    return value


def _smooth_ece_data(confidence: ArrayLike, correct: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Validate ``(confidence, correct)`` and return them as float64 numpy arrays."""
    f = _as_tensor(confidence, "confidence")
    y = _as_tensor(correct, "correct")
    if not f.is_floating_point():
        raise TypeError(f"confidence must be a floating-point array, got dtype {f.dtype}.")
    if f.dim() != 1 or y.dim() != 1:
        raise ValueError(
            f"confidence and correct must be 1-D with shape (N,), got shapes "
            f"{tuple(f.shape)} and {tuple(y.shape)}."
        )
    if f.shape[0] != y.shape[0]:
        raise ValueError(
            f"shape mismatch: confidence has {f.shape[0]} entries but correct has "
            f"{y.shape[0]}; they must describe the same samples."
        )
    if f.shape[0] == 0:
        raise ValueError("confidence is empty (N = 0): metrics need at least one sample.")
    if y.is_complex():
        raise TypeError(f"correct must be boolean or 0/1, got dtype {y.dtype}.")
    conf = f.detach().to("cpu", torch.float64).numpy()
    hit = y.detach().to("cpu", torch.float64).numpy()
    if not bool(np.isfinite(conf).all()):
        n_bad = int((~np.isfinite(conf)).sum())
        raise ValueError(f"confidence contains NaN or Inf in {n_bad} of {conf.shape[0]} entries.")
    if bool((conf < 0).any() or (conf > 1).any()):
        raise ValueError(
            f"confidence must lie in [0, 1], got values in [{conf.min():.6g}, {conf.max():.6g}]."
        )
    if not bool(((hit == 0) | (hit == 1)).all()):
        raise ValueError("correct must hold only 0/1 (or False/True) values.")
    return conf, hit


def smooth_ece_from_confidences(
    confidence: ArrayLike, correct: ArrayLike, *, bandwidth: float | None = None
) -> float:
    """Smooth ECE of predictions ``confidence`` in [0, 1] with outcomes ``correct`` (0/1).

    See :func:`smooth_ece` for the definition; this is the same quantity for any
    (probability, binary outcome) pairs, e.g. one-vs-rest scores of one class.
    """
    bandwidth = _check_bandwidth(bandwidth)
    conf, hit = _smooth_ece_data(confidence, correct)
    sm = _SmoothEce(conf, conf - hit)
    return sm.search()[0] if bandwidth is None else sm.value(bandwidth)


def _smooth_ece_of(conf: torch.Tensor, correct: torch.Tensor, bandwidth: float | None) -> float:
    f = conf.detach().to("cpu", torch.float64).numpy()
    sm = _SmoothEce(f, f - correct.detach().to("cpu", torch.float64).numpy())
    return sm.search()[0] if bandwidth is None else sm.value(bandwidth)


def smooth_ece(logits: ArrayLike, labels: ArrayLike, *, bandwidth: float | None = None) -> float:
    """Top-label smooth ECE (Błasiok & Nakkiran, "Smooth ECE: Principled Reliability Diagrams
    via Kernel Smoothing", ICLR 2024, arXiv:2309.12236).

    With ``f_i = max softmax``, residuals ``r_i = f_i − 1[argmax = y_i]`` and the reflected
    Gaussian kernel ``K_σ(t, f) = Σ_{m∈Z} φ_σ(t − f − 2m) + φ_σ(t + f − 2m)`` (the density on
    [0, 1] of ``f + N(0, σ²)`` folded back at 0 and 1 as often as needed)::

        smECE_σ = ∫_0^1 |Σ_i r_i K_σ(t, f_i)| dt / ∫_0^1 Σ_i K_σ(t, f_i) dt

    i.e. the mean absolute kernel-smoothed residual ``|r̂_σ(t)|`` weighted by the smoothed
    density of confidences (the denominator is N for the exact kernel). As in the authors'
    ``relplot``, both integrals are sums over ``T = max(200, round(10/σ))`` equally spaced
    points including 0 and 1, and ``bandwidth=None`` picks the paper's fixed point
    ``σ* = smECE_σ*`` by 10 halvings of [0, 1], returning smECE at the upper end ``σ*`` (a
    multiple of 2⁻¹⁰, at least 2⁻⁹); ``bandwidth`` (≥ 1e-4) fixes σ instead. The value lies in
    [0, 1]. Not a bootstrap name: pass the function itself to :func:`bootstrap_ci`.

    The kernel sums are exact (no binning, every reflection). relplot 1.0.3 bins the samples on
    a 0.001 grid, cuts its kernel at ±1/2 and counts a sample at exactly 0 or 1 at half weight
    (within 0.001 of them, partly), so its value differs: by ≲ 1e-4 for confidences away from
    1, by ~1e-3 (5 %) for typical over-confident networks, more at large σ.
    """
    bandwidth = _check_bandwidth(bandwidth)
    z, y = _validate(logits, labels)
    conf, correct = _top_label(z, y)
    return _smooth_ece_of(conf, correct, bandwidth)


def _classwise_from_sums(cw: torch.Tensor, n_classes: int, n_bins: int, n: int) -> float:
    gaps = (cw[2] - cw[1]).abs().reshape(n_classes, n_bins).sum(dim=1) / n
    return float(gaps.mean())


def classwise_ece(logits: ArrayLike, labels: ArrayLike, *, n_bins: int = 15) -> float:
    """Class-wise ECE (Kull et al. 2019; Nixon et al. 2019), equal-width bins.

    ``(1/C) Σ_k Σ_b (n_kb/N)·|mean_{i∈b} 1[y_i = k] − mean_{i∈b} p_ik|`` where class k's bins
    hold its predicted probability ``p_ik`` for every sample (one-vs-rest); every class counts,
    including classes that never occur.
    """
    n_bins = _check_n_bins(n_bins)
    z, y = _validate(logits, labels)
    rows = _softmax_rows(z, y, n_bins)
    return _classwise_from_sums(rows.classwise, z.shape[1], n_bins, z.shape[0])


def nll(logits: ArrayLike, labels: ArrayLike) -> float:
    """Mean negative log-likelihood ``(1/N) Σ_i [logsumexp(z_i) − z_{i,y_i}]`` (natural log)."""
    z, y = _validate(logits, labels)
    return float(_softmax_rows(z, y, None).nll.mean())


def brier(logits: ArrayLike, labels: ArrayLike) -> float:
    """Multiclass Brier score (Brier 1950): ``(1/N) Σ_i Σ_k (p_ik − 1[y_i = k])²``, in [0, 2]."""
    z, y = _validate(logits, labels)
    return float(_softmax_rows(z, y, None).brier.mean())


def accuracy(logits: ArrayLike, labels: ArrayLike) -> float:
    """Top-1 accuracy: fraction of rows whose argmax (first index among ties) equals the label."""
    z, y = _validate(logits, labels)
    _, correct = _top_label(z, y)
    return float(correct.double().mean())


def mean_confidence(logits: ArrayLike, labels: ArrayLike) -> float:
    """Mean top-label confidence ``(1/N) Σ_i max_k softmax(z_i)_k`` (labels only validated)."""
    z, y = _validate(logits, labels)
    conf, _ = _top_label(z, y)
    return float(conf.double().mean())


@dataclass(frozen=True)
class Reliability:
    """Data behind a reliability diagram (equal-width bins, module conventions).

    ``edges`` (B+1,) are ``i/B``; ``count`` (B,) samples per bin; ``confidence`` and
    ``accuracy`` (B,) the bin means (NaN for empty bins).
    """

    edges: np.ndarray
    count: np.ndarray
    confidence: np.ndarray
    accuracy: np.ndarray

    @property
    def n_bins(self) -> int:
        return int(self.count.shape[0])


def reliability(logits: ArrayLike, labels: ArrayLike, *, n_bins: int = 15) -> Reliability:
    """Per-bin counts, mean confidence and accuracy for a reliability diagram."""
    n_bins = _check_n_bins(n_bins)
    z, y = _validate(logits, labels)
    conf, correct = _top_label(z, y)
    sums = _bin_sums(_bin_width(conf, n_bins), conf, correct, n_bins).cpu().numpy()
    count = sums[0]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.where(count > 0, sums[1] / count, np.nan)
        mean_acc = np.where(count > 0, sums[2] / count, np.nan)
    edges = np.arange(n_bins + 1, dtype=np.float64) / n_bins
    return Reliability(edges, count.astype(np.int64), mean_conf, mean_acc)


def plot_reliability(
    logits: ArrayLike,
    labels: ArrayLike,
    ax: Any = None,
    *,
    n_bins: int = 15,
    title: str | None = None,
    legend: bool = True,
) -> Any:
    """Draw the reliability diagram of ``logits`` on a matplotlib ``ax`` (a new figure's when
    None) and return the axes: per-bin accuracy bars, the gap to the bin's mean confidence in
    red (over-confident) or blue (under-confident), each bin's share of the images as a dotted
    step, axis labels and a legend. The title defaults to the ECE. Bins as :func:`reliability`."""
    from quantcal.report.plots import draw_reliability

    rel = reliability(logits, labels, n_bins=n_bins)
    if ax is None:
        import matplotlib.pyplot as plt

        _, ax = plt.subplots(figsize=(3.6, 3.4), constrained_layout=True)
    if title is None:
        title = f"ECE {100 * ece(logits, labels, n_bins=n_bins):.2f} %"
    acc = [None if a != a else float(a) for a in rel.accuracy]
    conf = [None if c != c else float(c) for c in rel.confidence]
    return draw_reliability(
        ax, list(rel.edges), list(rel.count), conf, acc, title=title, legend=legend
    )


def calibration_report(
    logits: ArrayLike, labels: ArrayLike, *, n_bins: int = 15
) -> dict[str, float]:
    """Every scalar metric at once from a single softmax pass over the logits.

    Keys: n, accuracy, mean_confidence, ece, mce, ece_l2, adaptive_ece, debiased_ece,
    smooth_ece, classwise_ece, nll, brier (``n_bins`` equal-width bins unless the name says
    otherwise; smooth_ece has no bins and uses the automatic bandwidth).
    """
    n_bins = _check_n_bins(n_bins)
    z, y = _validate(logits, labels)
    rows = _softmax_rows(z, y, n_bins)
    w = _bin_sums(_bin_width(rows.conf, n_bins), rows.conf, rows.correct, n_bins)
    m = _bin_sums(_bin_mass(rows.conf, n_bins), rows.conf, rows.correct, n_bins)
    n, c = z.shape
    return {
        "n": float(n),
        "accuracy": float(rows.correct.double().mean()),
        "mean_confidence": float(rows.conf.double().mean()),
        "ece": float(_ce_from_sums(w[0], w[1], w[2], "l1")),
        "mce": float(_ce_from_sums(w[0], w[1], w[2], "max")),
        "ece_l2": float(_ce_from_sums(w[0], w[1], w[2], "l2")),
        "adaptive_ece": float(_ce_from_sums(m[0], m[1], m[2], "l1")),
        "debiased_ece": math.sqrt(max(0.0, float(_debiased_sq_from_sums(w[0], w[1], w[2])))),
        "smooth_ece": _smooth_ece_of(rows.conf, rows.correct, None),
        "classwise_ece": _classwise_from_sums(rows.classwise, c, n_bins, n),
        "nll": float(rows.nll.mean()),
        "brier": float(rows.brier.mean()),
    }


# ----------------------------------------------------------------------------------------------
# bootstrap
# ----------------------------------------------------------------------------------------------
def _index_blocks(n: int, n_resamples: int, seed: int) -> Iterator[np.ndarray]:
    """Resample row indices, ``(b, n)`` int64 blocks; same (n, n_resamples, seed), same rows.

    Drawn from one ``numpy.random.default_rng(seed)`` block after block (about 2**22 indices a
    block, so memory stays bounded whatever N is). The named fast path and the callable loop
    use the same blocks, so both see identical resamples.
    """
    rng = np.random.default_rng(int(seed))
    block = max(1, min(n_resamples, (1 << 22) // n))
    done = 0
    while done < n_resamples:
        b = min(block, n_resamples - done)
        yield rng.integers(0, n, size=(b, n), dtype=np.int64)
        done += b


def _bootstrap_indices(n: int, n_resamples: int, seed: int) -> np.ndarray:
    """All resample indices ``(n_resamples, n)`` at once (for tests and small inputs)."""
    return np.concatenate(list(_index_blocks(n, n_resamples, seed)))


class _FastMetric:
    """A named metric reduced once to per-sample numpy data, then scored on many resamples.

    ``mean`` metrics (accuracy, mean_confidence, nll, brier) average a per-sample value;
    width-binned ones (ece, mce, ece_l2, debiased_ece) keep each sample's ``2·bin + hit`` code
    and confidence, so a block of resamples costs two gathers and two ``np.bincount`` calls;
    ``adaptive_ece`` keeps each sample's tie-group and re-forms the equal-mass bins per resample.
    """

    def __init__(self, name: str, z: torch.Tensor, y: torch.Tensor, n_bins: int) -> None:
        self.name = name
        self.n_bins = n_bins
        self.n = int(y.shape[0])
        self.values: np.ndarray | None = None
        if name in ("nll", "brier"):
            rows = _softmax_rows(z, y, None)
            self.values = (rows.nll if name == "nll" else rows.brier).cpu().numpy()
            return
        conf, correct = _top_label(z, y)
        if name in ("accuracy", "mean_confidence"):
            chosen = correct if name == "accuracy" else conf
            self.values = chosen.double().cpu().numpy()
        elif name == "adaptive_ece":
            group, counts = _conf_groups(conf)
            self.n_groups = int(counts.shape[0])
            self.code = (group * 2 + correct.long()).cpu().numpy()
            group_conf = torch.zeros(self.n_groups, dtype=torch.float64, device=z.device)
            group_conf[group] = conf.double()
            self.group_conf = group_conf.cpu().numpy()
        else:
            self.code = (_bin_width(conf, n_bins) * 2 + correct.long()).cpu().numpy()
            self.conf = conf.double().cpu().numpy()

    def full(self) -> float:
        return float(self.on(np.arange(self.n)[None, :])[0])

    def on(self, idx: np.ndarray) -> np.ndarray:
        """Metric value for every resample row of ``idx`` ``(R, N)``: ``(R,)`` float64."""
        if self.values is not None:
            return self.values[idx].mean(axis=1)
        if self.name == "adaptive_ece":
            return self._adaptive(idx)
        r, b = idx.shape[0], self.n_bins
        key = self.code[idx]
        key += (np.arange(r, dtype=np.int64) * (2 * b))[:, None]
        by_hit = np.bincount(key.ravel(), minlength=2 * r * b).reshape(r, b, 2)
        count = torch.from_numpy(by_hit.sum(axis=2).astype(np.float64))
        s_hit = torch.from_numpy(by_hit[:, :, 1].astype(np.float64))
        key >>= 1  # (row·2B + 2·bin + hit) // 2 = row·B + bin
        s_conf = np.bincount(key.ravel(), weights=self.conf[idx].ravel(), minlength=r * b)
        s_conf = torch.from_numpy(s_conf.reshape(r, b))
        if self.name == "debiased_ece":
            out = _debiased_sq_from_sums(count, s_conf, s_hit).clamp(min=0.0).sqrt()
        else:
            norm = {"ece": "l1", "mce": "max", "ece_l2": "l2"}[self.name]
            out = _ce_from_sums(count, s_conf, s_hit, norm)
        return out.numpy()

    def _adaptive(self, idx: np.ndarray) -> np.ndarray:
        r, g, b = idx.shape[0], self.n_groups, self.n_bins
        key = self.code[idx]
        key += (np.arange(r, dtype=np.int64) * (2 * g))[:, None]
        by_hit = np.bincount(key.ravel(), minlength=2 * r * g).reshape(r, g, 2)
        g_count = by_hit.sum(axis=2).astype(np.float64)
        bins = _mass_bins_of_groups(torch.from_numpy(g_count), b).numpy()  # (R, G)
        bkey = (bins + (np.arange(r, dtype=np.int64) * b)[:, None]).ravel()
        count = np.bincount(bkey, weights=g_count.ravel(), minlength=r * b)
        s_conf = np.bincount(bkey, weights=(g_count * self.group_conf).ravel(), minlength=r * b)
        s_hit = np.bincount(bkey, weights=by_hit[:, :, 1].ravel(), minlength=r * b)
        sums = [torch.from_numpy(a.reshape(r, b)) for a in (count, s_conf, s_hit)]
        return _ce_from_sums(*sums, "l1").numpy()


_FAST_NAMES = (
    "accuracy",
    "adaptive_ece",
    "brier",
    "debiased_ece",
    "ece",
    "ece_l2",
    "mce",
    "mean_confidence",
    "nll",
)
_LOOP_NAMES = {"classwise_ece": classwise_ece}


def bootstrap_metric_names() -> list[str]:
    """Metric names accepted by ``bootstrap_ci`` / ``paired_bootstrap_diff``."""
    return sorted((*_FAST_NAMES, *_LOOP_NAMES))


def _resolve_metric(metric: str | MetricFn, n_bins: int) -> tuple[str | None, MetricFn | None]:
    if callable(metric):
        return None, metric
    if not isinstance(metric, str):
        raise TypeError(f"metric must be a name or a callable(logits, labels), got {metric!r}.")
    if metric in _FAST_NAMES:
        return metric, None
    if metric in _LOOP_NAMES:
        fn = _LOOP_NAMES[metric]
        return None, lambda z, y: fn(z, y, n_bins=n_bins)
    raise ValueError(unknown_name_message("metric", metric, bootstrap_metric_names()))


def _check_bootstrap_args(n_resamples: int, level: float) -> None:
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, (int, np.integer)):
        raise TypeError(f"n_resamples must be an int >= 1, got {n_resamples!r}.")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}; 1000 is typical.")
    if not 0.0 < float(level) < 1.0:
        raise ValueError(f"level must lie strictly between 0 and 1, got {level}; e.g. 0.95.")


def _replicates(
    metric: str | MetricFn,
    logits_list: list[torch.Tensor],
    y: torch.Tensor,
    n_resamples: int,
    seed: int,
    n_bins: int,
) -> tuple[list[float], np.ndarray]:
    """Point estimates and ``(R, len(logits_list))`` replicates on shared resample indices."""
    name, fn = _resolve_metric(metric, n_bins)
    n = y.shape[0]
    if name is not None:
        fast = [_FastMetric(name, z, y, n_bins) for z in logits_list]
        points = [f.full() for f in fast]
        reps = [
            np.stack([f.on(idx) for f in fast], axis=1)
            for idx in _index_blocks(n, n_resamples, seed)
        ]
        return points, np.concatenate(reps)
    points = [float(fn(z, y)) for z in logits_list]
    out = np.empty((n_resamples, len(logits_list)), dtype=np.float64)
    row = 0
    for block in _index_blocks(n, n_resamples, seed):
        for idx in torch.from_numpy(block).to(y.device):
            out[row] = [float(fn(z[idx], y[idx])) for z in logits_list]
            row += 1
    return points, out


def _percentile(values: np.ndarray, level: float) -> tuple[float, float]:
    alpha = (1.0 - float(level)) / 2.0
    lo, hi = np.quantile(values, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def bootstrap_ci(
    metric: str | MetricFn,
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    n_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    n_bins: int = 15,
) -> tuple[float, float]:
    """Percentile bootstrap interval (Efron & Tibshirani 1993) of ``metric`` over test samples.

    ``metric`` is a name from ``bootstrap_metric_names()`` (vectorised: per-sample bins,
    confidences and hits are computed once, each resample is a batched bincount; equal-mass bins
    are re-formed on every resample) or any ``callable(logits, labels) -> float`` (a loop over
    the same resample indices). Returns the ``(1 − level)/2`` and ``(1 + level)/2`` quantiles.
    Note: binned ECE is biased upward, so for a nearly calibrated model the interval can sit
    above the point estimate; see ``debiased_ece``.
    """
    _check_bootstrap_args(n_resamples, level)
    n_bins = _check_n_bins(n_bins)
    z, y = _validate(logits, labels)
    _, reps = _replicates(metric, [z], y, int(n_resamples), seed, n_bins)
    return _percentile(reps[:, 0], level)


def paired_bootstrap_diff(
    metric: str | MetricFn,
    logits_a: ArrayLike,
    logits_b: ArrayLike,
    labels: ArrayLike,
    *,
    n_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    n_bins: int = 15,
) -> tuple[float, float, float]:
    """Paired bootstrap of ``metric(a) − metric(b)`` for two models scored on the same samples.

    Every resample draws one set of row indices and scores both models on it, so the shared
    sampling noise of the test set cancels. Returns ``(estimate, lo, hi)``: the difference on
    the full data and the percentile interval of the resampled differences (exactly
    ``(0, 0, 0)`` when ``logits_a`` and ``logits_b`` are equal).
    """
    return paired_bootstrap_contrast(
        metric,
        [logits_a, logits_b],
        [1.0, -1.0],
        labels,
        n_resamples=n_resamples,
        level=level,
        seed=seed,
        n_bins=n_bins,
    )


def paired_bootstrap_contrast(
    metric: str | MetricFn,
    logits: list[ArrayLike],
    weights: list[float],
    labels: ArrayLike,
    *,
    n_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    n_bins: int = 15,
) -> tuple[float, float, float]:
    """Paired bootstrap of the contrast ``Σ_k w_k · metric(logits_k)`` over models scored on the
    same samples, e.g. a difference of differences ``[ECE(vq) − ECE(vf)] − [ECE(bq) − ECE(bf)]``
    (weights ``[1, -1, -1, 1]``): how much more variant v's ECE rises under quantization than
    base b's. One set of resampled rows scores every model, so the shared sampling noise of the
    test set cancels (Efron & Tibshirani 1993, ch. 16). Returns ``(estimate, lo, hi)``: the
    contrast on the full data and the percentile interval of the resampled contrasts."""
    _check_bootstrap_args(n_resamples, level)
    n_bins = _check_n_bins(n_bins)
    if len(logits) != len(weights) or not logits:
        raise ValueError(
            f"need one weight per logits tensor, got {len(logits)} logits and {len(weights)} "
            "weights"
        )
    first, y = _validate(logits[0], labels)
    zs = [first]
    for i, z in enumerate(logits[1:], start=1):
        zi, _ = _validate(z, labels)
        if zi.shape != first.shape:
            raise ValueError(
                f"every logits tensor must have the same shape (same samples, same classes); "
                f"logits[0] is {tuple(first.shape)}, logits[{i}] is {tuple(zi.shape)}."
            )
        zs.append(zi.to(first.device))
    w = np.asarray(weights, dtype=np.float64)
    points, reps = _replicates(metric, zs, y, int(n_resamples), seed, n_bins)
    lo, hi = _percentile(reps @ w, level)
    return float(np.dot(points, w)), lo, hi
