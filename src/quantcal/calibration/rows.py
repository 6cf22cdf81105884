"""Row passes over the logits: the per-sample quantities every metric is built from.

Rows are read in cache-sized chunks; per-row work runs in float32 (float64 for float64 logits).
:func:`top_label` gives top-label confidence and correctness without materialising the softmax;
:func:`softmax_rows` gives every per-sample quantity the report needs (NLL, Brier, class-wise bin
sums) in one log-softmax pass. Both raise on non-finite logits.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from quantcal.calibration.binning import bin_width
from quantcal.calibration.checks import check_finite

_CHUNK_ELEMS = 1 << 20  # logits per chunk in row-wise passes (4 MiB of float32: cache friendly)

__all__ = ["softmax_rows", "top_label"]


def _compute_dtype(z: torch.Tensor) -> torch.dtype:
    return torch.float64 if z.dtype == torch.float64 else torch.float32


def _chunks(n_rows: int, n_cols: int) -> Iterator[slice]:
    step = max(1, _CHUNK_ELEMS // max(1, n_cols))
    for start in range(0, n_rows, step):
        yield slice(start, min(n_rows, start + step))


def top_label(z: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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
    check_finite(int(n_bad), n)
    return conf.reciprocal_(), correct


@dataclass(frozen=True)
class _Rows:
    """Per-sample quantities from one softmax pass (float64 unless noted)."""

    conf: torch.Tensor  # compute dtype
    correct: torch.Tensor  # bool
    nll: torch.Tensor
    brier: torch.Tensor
    classwise: torch.Tensor | None  # (3, C*B) float64 sums: count, prob, hit


def softmax_rows(z: torch.Tensor, y: torch.Tensor, classwise_bins: int | None) -> _Rows:
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
            key = (bin_width(p, classwise_bins) + offsets).reshape(-1)
            hit = torch.nn.functional.one_hot(yc, c).reshape(-1).double()
            size = c * classwise_bins
            cw[0] += torch.bincount(key, minlength=size).double()
            cw[1] += torch.bincount(key, weights=p.reshape(-1).double(), minlength=size)
            cw[2] += torch.bincount(key, weights=hit, minlength=size)
    check_finite(n_bad, n)
    return _Rows(conf, correct, nll_i, brier_i, cw)
