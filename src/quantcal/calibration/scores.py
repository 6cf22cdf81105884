"""The scalar metrics: the ECE family (ECE, MCE, adaptive, debiased and class-wise ECE), the
scoring rules (NLL, Brier), accuracy and mean confidence, and every one of them at once from a
single softmax pass (:func:`calibration_report`). Bins follow :mod:`quantcal.calibration.binning`.
"""

from __future__ import annotations

import math

import torch

from quantcal.calibration.binning import (
    BINNINGS,
    bin_index,
    bin_mass,
    bin_sums,
    bin_width,
    ce_from_sums,
    debiased_sq_from_sums,
)
from quantcal.calibration.checks import ArrayLike, check_choice, check_n_bins, validate
from quantcal.calibration.rows import softmax_rows, top_label
from quantcal.calibration.smooth import smooth_ece_of

NORMS = ("l1", "l2", "max")

__all__ = [
    "NORMS",
    "accuracy",
    "adaptive_ece",
    "brier",
    "calibration_report",
    "classwise_ece",
    "debiased_ece",
    "debiased_ece_sq",
    "ece",
    "mce",
    "mean_confidence",
    "nll",
]


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
    n_bins = check_n_bins(n_bins)
    check_choice(binning, BINNINGS, "binning")
    check_choice(norm, NORMS, "norm")
    z, y = validate(logits, labels)
    conf, correct = top_label(z, y)
    sums = bin_sums(bin_index(conf, n_bins, binning), conf, correct, n_bins)
    return float(ce_from_sums(sums[0], sums[1], sums[2], norm))


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
    n_bins = check_n_bins(n_bins)
    check_choice(binning, BINNINGS, "binning")
    z, y = validate(logits, labels)
    conf, correct = top_label(z, y)
    sums = bin_sums(bin_index(conf, n_bins, binning), conf, correct, n_bins)
    return float(debiased_sq_from_sums(sums[0], sums[1], sums[2]))


def debiased_ece(
    logits: ArrayLike, labels: ArrayLike, *, n_bins: int = 15, binning: str = "width"
) -> float:
    """``sqrt(max(0, debiased_ece_sq))``: debiased l2 calibration error (Kumar et al. 2019).

    Comparable with ``ece(norm="l2")`` (the biased plug-in on the same bins).
    """
    return math.sqrt(max(0.0, debiased_ece_sq(logits, labels, n_bins=n_bins, binning=binning)))


def _classwise_from_sums(cw: torch.Tensor, n_classes: int, n_bins: int, n: int) -> float:
    gaps = (cw[2] - cw[1]).abs().reshape(n_classes, n_bins).sum(dim=1) / n
    return float(gaps.mean())


def classwise_ece(logits: ArrayLike, labels: ArrayLike, *, n_bins: int = 15) -> float:
    """Class-wise ECE (Kull et al. 2019; Nixon et al. 2019), equal-width bins.

    ``(1/C) Σ_k Σ_b (n_kb/N)·|mean_{i∈b} 1[y_i = k] − mean_{i∈b} p_ik|`` where class k's bins
    hold its predicted probability ``p_ik`` for every sample (one-vs-rest); every class counts,
    including classes that never occur.
    """
    n_bins = check_n_bins(n_bins)
    z, y = validate(logits, labels)
    rows = softmax_rows(z, y, n_bins)
    return _classwise_from_sums(rows.classwise, z.shape[1], n_bins, z.shape[0])


def nll(logits: ArrayLike, labels: ArrayLike) -> float:
    """Mean negative log-likelihood ``(1/N) Σ_i [logsumexp(z_i) − z_{i,y_i}]`` (natural log)."""
    z, y = validate(logits, labels)
    return float(softmax_rows(z, y, None).nll.mean())


def brier(logits: ArrayLike, labels: ArrayLike) -> float:
    """Multiclass Brier score (Brier 1950): ``(1/N) Σ_i Σ_k (p_ik − 1[y_i = k])²``, in [0, 2]."""
    z, y = validate(logits, labels)
    return float(softmax_rows(z, y, None).brier.mean())


def accuracy(logits: ArrayLike, labels: ArrayLike) -> float:
    """Top-1 accuracy: fraction of rows whose argmax (first index among ties) equals the label."""
    z, y = validate(logits, labels)
    _, correct = top_label(z, y)
    return float(correct.double().mean())


def mean_confidence(logits: ArrayLike, labels: ArrayLike) -> float:
    """Mean top-label confidence ``(1/N) Σ_i max_k softmax(z_i)_k`` (labels only validated)."""
    z, y = validate(logits, labels)
    conf, _ = top_label(z, y)
    return float(conf.double().mean())


def calibration_report(
    logits: ArrayLike, labels: ArrayLike, *, n_bins: int = 15
) -> dict[str, float]:
    """Every scalar metric at once from a single softmax pass over the logits.

    Keys: n, accuracy, mean_confidence, ece, mce, ece_l2, adaptive_ece, debiased_ece,
    smooth_ece, classwise_ece, nll, brier (``n_bins`` equal-width bins unless the name says
    otherwise; smooth_ece has no bins and uses the automatic bandwidth).
    """
    n_bins = check_n_bins(n_bins)
    z, y = validate(logits, labels)
    rows = softmax_rows(z, y, n_bins)
    w = bin_sums(bin_width(rows.conf, n_bins), rows.conf, rows.correct, n_bins)
    m = bin_sums(bin_mass(rows.conf, n_bins), rows.conf, rows.correct, n_bins)
    n, c = z.shape
    return {
        "n": float(n),
        "accuracy": float(rows.correct.double().mean()),
        "mean_confidence": float(rows.conf.double().mean()),
        "ece": float(ce_from_sums(w[0], w[1], w[2], "l1")),
        "mce": float(ce_from_sums(w[0], w[1], w[2], "max")),
        "ece_l2": float(ce_from_sums(w[0], w[1], w[2], "l2")),
        "adaptive_ece": float(ce_from_sums(m[0], m[1], m[2], "l1")),
        "debiased_ece": math.sqrt(max(0.0, float(debiased_sq_from_sums(w[0], w[1], w[2])))),
        "smooth_ece": smooth_ece_of(rows.conf, rows.correct, None),
        "classwise_ece": _classwise_from_sums(rows.classwise, c, n_bins, n),
        "nll": float(rows.nll.mean()),
        "brier": float(rows.brier.mean()),
    }
