"""How well a score separates two sets of samples: the ROC AUC with ties counted one half, and
the false-positive rate at a true-positive rate. Shared by failure detection (right against
wrong predictions, :mod:`~quantcal.calibration.selective`) and unknown-input detection (test
against unknown images, :mod:`~quantcal.calibration.ood`)."""

from __future__ import annotations

import math

import torch

__all__ = ["auroc", "fpr_at_tpr"]


def auroc(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """P(a positive scores above a negative) + P(equal) / 2, from the mean ranks of the pooled
    scores (Mann-Whitney U); NaN when either set is empty."""
    n_p, n_n = positive.numel(), negative.numel()
    if n_p == 0 or n_n == 0:
        return math.nan
    both = torch.cat([positive.double(), negative.double()])
    order = torch.argsort(both, stable=True)
    ordered = both[order]
    change = torch.nonzero(ordered[1:] != ordered[:-1]).flatten() + 1
    ends = torch.cat([change, torch.tensor([both.numel()])])
    starts = torch.cat([torch.zeros(1, dtype=ends.dtype), ends[:-1]])
    ranks = torch.empty_like(both)
    ranks[order] = torch.repeat_interleave((starts + ends + 1).double() / 2, ends - starts)
    u = float(ranks[:n_p].sum()) - n_p * (n_p + 1) / 2
    return u / (n_p * n_n)


def fpr_at_tpr(positive: torch.Tensor, negative: torch.Tensor, tpr: float = 0.95) -> float:
    """Share of negatives scoring at or above the largest threshold that keeps at least ``tpr``
    of the positives (the ``ceil(tpr * n)``-th largest positive score); NaN when either set is
    empty."""
    if not (isinstance(tpr, (int, float)) and 0 < tpr <= 1):
        raise ValueError(f"tpr must be in (0, 1], got {tpr!r}")
    n_p = positive.numel()
    if n_p == 0 or negative.numel() == 0:
        return math.nan
    k = min(n_p, max(1, math.ceil(tpr * n_p - 1e-9)))
    threshold = torch.sort(positive.double(), descending=True).values[k - 1]
    return float((negative.double() >= threshold).double().mean())
