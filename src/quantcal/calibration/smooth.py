"""Smooth ECE (Błasiok & Nakkiran 2024, "Smooth ECE: Principled Reliability Diagrams via Kernel
Smoothing"): top-label calibration error by kernel smoothing, with no bins.

:func:`smooth_ece` scores logits, :func:`smooth_ece_from_confidences` any (probability, binary
outcome) pairs; the exact reflected-kernel sums are computed by one FFT convolution of per-cell
Hermite moments (``_SmoothEce``), and the automatic bandwidth is the paper's fixed point.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from quantcal.calibration.checks import ArrayLike, as_tensor, validate
from quantcal.calibration.rows import top_label

__all__ = ["smooth_ece", "smooth_ece_from_confidences", "smooth_ece_of"]

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
    f = as_tensor(confidence, "confidence")
    y = as_tensor(correct, "correct")
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


def smooth_ece_of(conf: torch.Tensor, correct: torch.Tensor, bandwidth: float | None) -> float:
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
    z, y = validate(logits, labels)
    conf, correct = top_label(z, y)
    return smooth_ece_of(conf, correct, bandwidth)
