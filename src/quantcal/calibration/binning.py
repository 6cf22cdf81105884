"""Bin assignment and per-bin statistics, shared by every binned metric and recalibrator.

Binning conventions
-------------------
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

The binned errors are computed from per-bin sums (count, sum of confidence, number correct):
:func:`ce_from_sums` (l1, l2, max) and :func:`debiased_sq_from_sums` (Kumar et al. 2019).
"""

from __future__ import annotations

import torch

BINNINGS = ("width", "mass")
_EDGE_ULPS = 8.0  # confidences within this many machine epsilons of an edge count as on it

__all__ = [
    "BINNINGS",
    "bin_index",
    "bin_mass",
    "bin_sums",
    "bin_width",
    "ce_from_sums",
    "conf_groups",
    "debiased_sq_from_sums",
    "mass_bins_of_groups",
]


def bin_width(conf: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Equal-width bin index ``ceil(B·c·(1 − 8ε)) − 1`` clamped to ``[0, B − 1]`` (module doc)."""
    eps = torch.finfo(conf.dtype).eps
    x = conf.double() * (n_bins * (1.0 - _EDGE_ULPS * eps))
    return (torch.ceil(x).long() - 1).clamp_(0, n_bins - 1)


def mass_bins_of_groups(counts: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Bin of each tie group from its mid-rank: ``min(B − 1, floor(B·(S − n/2)/N))``.

    ``counts`` is ``(..., G)`` (group sizes in increasing confidence order, zeros allowed).
    """
    cum = counts.cumsum(dim=-1)
    total = cum[..., -1:]
    mid = cum - 0.5 * counts
    return torch.floor(n_bins * mid / total).long().clamp_(0, n_bins - 1)


def conf_groups(conf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Group id of every sample (groups of exactly equal confidence, in increasing order)."""
    values, order = torch.sort(conf)
    _, inverse_sorted, counts = torch.unique_consecutive(
        values, return_inverse=True, return_counts=True
    )
    group = torch.empty_like(inverse_sorted)
    group[order] = inverse_sorted
    return group, counts


def bin_mass(conf: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Equal-mass bin index that never splits tied confidences (see module doc)."""
    group, counts = conf_groups(conf)
    return mass_bins_of_groups(counts.double(), n_bins)[group]


def bin_index(conf: torch.Tensor, n_bins: int, binning: str) -> torch.Tensor:
    return bin_width(conf, n_bins) if binning == "width" else bin_mass(conf, n_bins)


def bin_sums(
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


def ce_from_sums(count: torch.Tensor, s_conf: torch.Tensor, s_hit: torch.Tensor, norm: str):
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


def debiased_sq_from_sums(count: torch.Tensor, s_conf: torch.Tensor, s_hit: torch.Tensor):
    """Kumar et al. 2019 debiased squared l2 error from per-bin sums (bins with n_b < 2 add 0)."""
    total = count.sum(dim=-1)
    safe = count.clamp(min=1.0)
    acc = s_hit / safe
    conf = s_conf / safe
    var_of_mean = acc * (1.0 - acc) / (count - 1.0).clamp(min=1.0)
    term = (acc - conf) ** 2 - var_of_mean
    term = torch.where(count >= 2, term, torch.zeros_like(term))
    return (count * term).sum(dim=-1) / total
