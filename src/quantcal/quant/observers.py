"""Activation range estimators ("observers") for post-training quantization.

Each observer sees the range-calibration activations of one layer input, batch by batch
(``observe(x)``), and then proposes a clipping range (``range() -> (lo, hi)``); the quantizer turns
that range into an asymmetric per-tensor scale and zero-point (``primitives.activation_qparams``).

* ``minmax`` (the default and the study's): running min and max over all batches.
* ``percentile``: the ``(100 - p)``-th and ``p``-th percentiles of the pooled activations
  (p = 99.99 by default), read off a bounded running histogram (memory independent of data size).
* ``mse``: the clipping range minimising the expected quantization MSE at the target bit width,
  found by grid search on the same histogram (as AIMET's "tf_enhanced", NNCF, ModelOpt and
  torch.ao's ``HistogramObserver`` do; Banner et al., "Post training 4-bit quantization of
  convolutional networks for rapid-deployment", NeurIPS 2019).

New estimators register with ``@register_observer("name")``; ``QuantConfig`` accepts any
registered name, and the tests that iterate ``available_observers()`` cover it.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from quantcal._registry import Registry
from quantcal.quant.primitives import activation_qrange, check_bits

OBSERVERS: Registry[type[RangeObserver]] = Registry("range estimator")


def register_observer(name: str):
    """Class decorator registering a ``RangeObserver`` subclass under ``name``."""
    return OBSERVERS.register(name)


def available_observers() -> list[str]:
    """Names of the registered range estimators, sorted."""
    return OBSERVERS.available()


def get_observer(name: str, *, bits: int = 8, **options: Any) -> RangeObserver:
    """A new observer ``name`` for activations quantized to ``bits`` bits.

    ``options`` are passed to the observer's constructor (``percentile`` for "percentile",
    ``bins`` for the histogram ones); options it does not take are ignored, so one config can
    carry options for all estimators.
    """
    cls = OBSERVERS.get(name)
    accepted = {k: v for k, v in options.items() if k in cls.OPTIONS}
    return cls(bits=bits, **accepted)


class RangeObserver:
    """Base class: ``observe(x)`` any number of times, then ``range()``."""

    OPTIONS: tuple[str, ...] = ()

    def __init__(self, bits: int = 8) -> None:
        self.bits = check_bits(bits, "activation bits")
        self.count = 0
        self.min = math.inf
        self.max = -math.inf

    def observe(self, x: torch.Tensor) -> None:
        """Record one batch of activations (any shape; NaN is an error)."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"observe() needs a floating-point tensor, got {type(x).__name__}")
        if x.numel() == 0:
            return
        x = x.detach()
        lo, hi = torch.aminmax(x)
        lo, hi = float(lo), float(hi)
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError(
                "observed activations contain NaN or inf; check the model and the "
                "range-calibration inputs"
            )
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        self.count += x.numel()
        self._update(x, lo, hi)

    def _update(self, x: torch.Tensor, lo: float, hi: float) -> None:
        """Hook for subclasses; called after min/max/count were updated."""

    def range(self) -> tuple[float, float]:
        """The proposed clipping range ``(lo, hi)``."""
        if self.count == 0:
            raise ValueError(
                f"{type(self).__name__} has observed no values; pass at least one non-empty "
                "range-calibration batch"
            )
        return self._range()

    def _range(self) -> tuple[float, float]:
        return self.min, self.max


@register_observer("minmax")
class MinMaxObserver(RangeObserver):
    """Running minimum and maximum over every range-calibration batch."""


class _Histogram:
    """A running histogram with ``bins`` equal-width bins over the range seen so far.

    When a batch widens the range, the old counts are re-binned onto the new edges by linear
    interpolation of their cumulative distribution (mass assumed uniform within a bin), then the
    batch is added with ``torch.histc``. Memory is O(bins), whatever the amount of data.
    """

    def __init__(self, bins: int) -> None:
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < 16:
            raise ValueError(f"bins must be an int >= 16, got {bins!r}")
        self.bins = bins
        self.counts = torch.zeros(bins, dtype=torch.float64)
        self.lo = 0.0
        self.hi = 0.0
        self.empty = True

    def edges(self) -> torch.Tensor:
        return torch.linspace(self.lo, self.hi, self.bins + 1, dtype=torch.float64)

    def add(self, x: torch.Tensor, lo: float, hi: float) -> None:
        if self.empty:
            new_lo, new_hi = lo, hi
        else:
            new_lo, new_hi = min(self.lo, lo), max(self.hi, hi)
        if new_hi <= new_lo:  # a constant tensor: give the bins a tiny width around it
            pad = max(abs(new_lo), 1.0) * 1e-6
            new_lo, new_hi = new_lo - pad, new_hi + pad
        if not self.empty and (new_lo < self.lo or new_hi > self.hi):
            self._rebin(new_lo, new_hi)
        self.lo, self.hi = new_lo, new_hi
        flat = x.reshape(-1).to(torch.float32)
        hist = torch.histc(flat, bins=self.bins, min=self.lo, max=self.hi)
        self.counts += hist.to("cpu", torch.float64)
        self.empty = False

    def _rebin(self, new_lo: float, new_hi: float) -> None:
        old_edges = self.edges()
        cdf = torch.cat([torch.zeros(1, dtype=torch.float64), self.counts.cumsum(0)])
        new_edges = torch.linspace(new_lo, new_hi, self.bins + 1, dtype=torch.float64)
        new_cdf = _interp(new_edges, old_edges, cdf)
        self.counts = (new_cdf[1:] - new_cdf[:-1]).clamp_min(0.0)

    def quantile(self, q: float) -> float:
        """The value below which a fraction ``q`` of the mass lies (piecewise-linear CDF)."""
        cdf = torch.cat([torch.zeros(1, dtype=torch.float64), self.counts.cumsum(0)])
        total = float(cdf[-1])
        target = torch.tensor([q * total], dtype=torch.float64)
        return float(_interp(target, cdf, self.edges(), increasing_x=False)[0])


def _interp(
    x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor, increasing_x: bool = True
) -> torch.Tensor:
    """``numpy.interp`` for float64 tensors; ``xp`` non-decreasing (flat runs allowed)."""
    import numpy as np

    xp_np = xp.numpy()
    fp_np = fp.numpy()
    if not increasing_x:
        # Inverse CDF: on flat runs of the CDF take the first edge where it reaches the target.
        keep = np.concatenate([[True], np.diff(xp_np) > 0])
        xp_np, fp_np = xp_np[keep], fp_np[keep]
    return torch.from_numpy(np.interp(x.numpy(), xp_np, fp_np))


class _HistogramObserver(RangeObserver):
    OPTIONS = ("bins",)

    def __init__(self, bits: int = 8, bins: int = 2048) -> None:
        super().__init__(bits)
        self.hist = _Histogram(bins)
        self.zeros = 0  # exact zeros (ReLU outputs, padding): always represented exactly

    def _update(self, x: torch.Tensor, lo: float, hi: float) -> None:
        self.hist.add(x, lo, hi)
        self.zeros += int((x == 0).sum())


@register_observer("percentile")
class PercentileObserver(_HistogramObserver):
    """Clip at the ``(100 - p)``-th and ``p``-th percentiles of all observed activations.

    ``p`` in (50, 100]; 100 gives min-max. Percentiles are read off a running histogram
    (``bins`` bins), accurate to about one bin width (range / bins), far below one 8-bit step.
    """

    OPTIONS = ("bins", "percentile")

    def __init__(self, bits: int = 8, percentile: float = 99.99, bins: int = 2048) -> None:
        super().__init__(bits, bins)
        self.percentile = check_percentile(percentile)

    def _range(self) -> tuple[float, float]:
        if self.percentile >= 100.0:
            return self.min, self.max
        q = self.percentile / 100.0
        lo = max(self.min, self.hist.quantile(1.0 - q))
        hi = min(self.max, self.hist.quantile(q))
        return min(lo, hi), max(lo, hi)


def check_percentile(percentile: float) -> float:
    """Validate a clipping percentile: a number in (50, 100]."""
    if isinstance(percentile, bool) or not isinstance(percentile, (int, float)):
        raise TypeError(f"percentile must be a number in (50, 100], got {percentile!r}")
    if not 50.0 < float(percentile) <= 100.0:
        raise ValueError(
            f"percentile must be in (50, 100], got {percentile}; 99.99 clips the 0.01 % tails"
        )
    return float(percentile)


@register_observer("mse")
class MSEObserver(_HistogramObserver):
    """Clipping range minimising the expected quantization MSE on the observed histogram.

    Candidates are ``lo = a * min(lo_0, 0)`` and ``hi = b * max(hi_0, 0)`` for ``a, b`` on a grid
    in (0, 1] (``grid`` values each). For a candidate with step ``s = (hi - lo) / (2^bits - 1)``
    the expected error of the histogram mass is ``sum_i n_i * e_i`` with ``e_i = s^2 / 12`` for a
    bin centre ``c_i`` inside the range (rounding noise; exact zeros, which are always
    representable, add nothing) and ``(c_i - clamp(c_i, lo, hi))^2`` outside (clipping error), the
    standard model of Banner et al. (NeurIPS 2019).
    """

    OPTIONS = ("bins", "grid")

    def __init__(self, bits: int = 8, bins: int = 2048, grid: int = 100) -> None:
        super().__init__(bits, bins)
        if isinstance(grid, bool) or not isinstance(grid, int) or grid < 2:
            raise ValueError(f"grid must be an int >= 2, got {grid!r}")
        self.grid = grid

    def _range(self) -> tuple[float, float]:
        lo0, hi0 = min(self.min, 0.0), max(self.max, 0.0)
        if hi0 - lo0 <= 0.0:
            return self.min, self.max
        edges = self.hist.edges()
        centres = 0.5 * (edges[1:] + edges[:-1])
        n = self.hist.counts
        zero = torch.zeros(1, dtype=torch.float64)
        # Prefix sums: s_k[j] = sum over the first j bins of n * c^k.
        s0, s1, s2 = (torch.cat([zero, (n * centres**k).cumsum(0)]) for k in range(3))
        levels = activation_qrange(self.bits)[1]
        fractions = torch.arange(1, self.grid + 1, dtype=torch.float64) / self.grid
        los = lo0 * fractions if lo0 < 0.0 else zero
        his = hi0 * fractions if hi0 > 0.0 else zero
        below = torch.searchsorted(centres, los, right=False)  # bins with centre < lo
        above = torch.searchsorted(centres, his, right=True)  # bins with centre > hi start here
        # sum n (c - t)^2 over a set of bins = S2 - 2 t S1 + t^2 S0
        err_lo = s2[below] - 2 * los * s1[below] + los**2 * s0[below]
        a0, a1, a2 = s0[-1] - s0[above], s1[-1] - s1[above], s2[-1] - s2[above]
        err_hi = a2 - 2 * his * a1 + his**2 * a0
        inside = s0[-1] - s0[below][:, None] - a0[None, :] - self.zeros
        step = (his[None, :] - los[:, None]) / levels
        mse = err_lo[:, None] + err_hi[None, :] + inside.clamp_min(0.0) * step**2 / 12.0
        k = int(torch.argmin(mse))
        i, j = divmod(k, mse.shape[1])
        return float(los[i]), float(his[j])
