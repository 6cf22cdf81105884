"""Selective prediction and failure detection from logits: does confidence still rank right
above wrong, and what does a confidence threshold buy (issue #25, item 1)?

With the top-label confidence ``c_i`` and correctness ``y_i`` of N samples, sorted by confidence
from high to low, accepting the top ``k`` gives coverage ``k / N`` and selective risk
``errors among the top k / k`` (Geifman & El-Yaniv 2017).

- :func:`risk_coverage`: the curve, one point per distinct confidence (a threshold cannot split
  samples of equal confidence).
- :func:`aurc`: the area under it, ``(1/N) Σ_k risk(k)`` (Geifman et al., ICLR 2019). Within a
  block of tied confidences the error count at each ``k`` is its expectation over the orders of
  the block (linear between the block's ends), so the value is the mean AURC over all
  tie-breaks and does not depend on how samples happen to be ordered.
- :func:`excess_aurc`: ``aurc`` minus the AURC of a perfect ranking of the same predictions (all
  right ones first), computed exactly, not by the continuous ``r + (1 - r) ln(1 - r)``.
- :func:`selective_risk`: the risk when accepting the most confident ``coverage`` fraction
  (rounded up to the next whole tie block), and :func:`coverage_at_risk`: the largest coverage
  whose selective risk is at most ``risk`` (0 when none is).
- :func:`failure_auroc`: the probability that a right prediction is more confident than a wrong
  one (ties count one half), the ROC AUC of telling right from wrong by confidence; and
  :func:`failure_fpr_at_tpr`: the fraction of wrong predictions accepted at the largest
  threshold that accepts ``tpr`` of the right ones (FPR at 95 % TPR, Hendrycks & Gimpel 2017).
  Both are NaN when all predictions are right or all are wrong: there is nothing to separate.

Every function takes raw logits (N, C) and integer labels (N,), like the other metrics, so each
one works with :func:`~quantcal.calibration.bootstrap.bootstrap_ci` and the paired differences.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from quantcal.calibration import separation
from quantcal.calibration.checks import ArrayLike, validate
from quantcal.calibration.rows import top_label

__all__ = [
    "RiskCoverage",
    "accepted_risk",
    "aurc",
    "coverage_at_risk",
    "excess_aurc",
    "failure_auroc",
    "failure_fpr_at_tpr",
    "risk_coverage",
    "selective_risk",
    "threshold_for_risk",
]


@dataclass(frozen=True)
class RiskCoverage:
    """One point per distinct confidence, from the highest: accepting every sample with
    confidence >= ``thresholds[j]`` covers ``coverage[j]`` of them at selective ``risk[j]``."""

    thresholds: torch.Tensor
    coverage: torch.Tensor
    risk: torch.Tensor
    #: How many samples each point accepts, and N.
    accepted: torch.Tensor
    n: int


def _sorted(logits: ArrayLike, labels: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Confidence (float64) and wrongness (1.0 when wrong), sorted by confidence descending."""
    z, y = validate(logits, labels)
    conf, correct = top_label(z, y)
    wrong = (~correct).double().cpu()
    conf = conf.double().cpu()
    order = torch.argsort(conf, descending=True, stable=True)
    return conf[order], wrong[order]


def _blocks(conf: torch.Tensor) -> torch.Tensor:
    """End index (exclusive) of each block of equal confidence in a descending ``conf``."""
    n = conf.numel()
    change = torch.nonzero(conf[1:] != conf[:-1]).flatten() + 1
    return torch.cat([change, torch.tensor([n])])


def risk_coverage(logits: ArrayLike, labels: ArrayLike) -> RiskCoverage:
    """The risk–coverage curve, one point per distinct confidence (see the module docstring)."""
    conf, wrong = _sorted(logits, labels)
    ends = _blocks(conf)
    errors = torch.cumsum(wrong, 0)[ends - 1]
    return RiskCoverage(
        thresholds=conf[ends - 1],
        coverage=ends.double() / conf.numel(),
        risk=errors / ends,
        accepted=ends,
        n=conf.numel(),
    )


def _expected_errors(conf: torch.Tensor, wrong: torch.Tensor) -> torch.Tensor:
    """Expected error count among the top k, k = 1..N, over the orders of each tie block."""
    n = conf.numel()
    ends = _blocks(conf)
    starts = torch.cat([torch.zeros(1, dtype=ends.dtype), ends[:-1]])
    cum = torch.cumsum(wrong, 0)
    before = torch.where(starts > 0, cum[(starts - 1).clamp(min=0)], torch.zeros_like(cum[:1]))
    in_block = cum[ends - 1] - before
    size = (ends - starts).double()
    block_of = torch.repeat_interleave(torch.arange(ends.numel()), ends - starts)
    k = torch.arange(1, n + 1, dtype=torch.float64)
    taken = k - starts[block_of].double()  # samples of the block among the top k
    return before[block_of] + in_block[block_of] * taken / size[block_of]


def _aurc(conf: torch.Tensor, wrong: torch.Tensor) -> float:
    k = torch.arange(1, conf.numel() + 1, dtype=torch.float64)
    return float((_expected_errors(conf, wrong) / k).mean())


def aurc(logits: ArrayLike, labels: ArrayLike) -> float:
    """Area under the risk–coverage curve, ``(1/N) Σ_k E[errors among top k] / k``."""
    return _aurc(*_sorted(logits, labels))


def _optimal_aurc(n: int, n_wrong: int) -> float:
    """The AURC of the perfect ranking: ``(1/N) Σ_k max(0, k - n_right) / k``."""
    k = torch.arange(1, n + 1, dtype=torch.float64)
    return float(((k - (n - n_wrong)).clamp(min=0) / k).mean())


def excess_aurc(logits: ArrayLike, labels: ArrayLike) -> float:
    """``aurc`` minus the AURC of ranking every right prediction above every wrong one."""
    conf, wrong = _sorted(logits, labels)
    return _aurc(conf, wrong) - _optimal_aurc(conf.numel(), int(wrong.sum()))


def selective_risk(logits: ArrayLike, labels: ArrayLike, coverage: float = 0.8) -> float:
    """Selective risk when accepting the most confident ``coverage`` fraction, rounded up to the
    end of the tie block that holds the ``ceil(coverage * N)``-th sample."""
    if not (isinstance(coverage, (int, float)) and 0 < coverage <= 1):
        raise ValueError(f"coverage must be in (0, 1], got {coverage!r}")
    curve = risk_coverage(logits, labels)
    need = math.ceil(coverage * curve.n - 1e-9)
    j = int(torch.nonzero(curve.accepted >= need)[0])
    return float(curve.risk[j])


def coverage_at_risk(logits: ArrayLike, labels: ArrayLike, risk: float = 0.05) -> float:
    """The largest coverage whose selective risk is at most ``risk`` (0.0 when even the most
    confident block is riskier)."""
    if not (isinstance(risk, (int, float)) and 0 <= risk <= 1):
        raise ValueError(f"risk must be in [0, 1], got {risk!r}")
    curve = risk_coverage(logits, labels)
    ok = curve.risk <= risk + 1e-12
    return float(curve.coverage[ok].max()) if bool(ok.any()) else 0.0


def _right_wrong(logits: ArrayLike, labels: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Confidences of the right and of the wrong predictions."""
    conf, wrong = _sorted(logits, labels)
    return conf[wrong == 0], conf[wrong == 1]


def failure_auroc(logits: ArrayLike, labels: ArrayLike) -> float:
    """P(confidence of a right prediction > that of a wrong one) + P(equal) / 2: the ROC AUC of
    right (positive) against wrong by confidence; NaN when all are right or all wrong."""
    return separation.auroc(*_right_wrong(logits, labels))


def failure_fpr_at_tpr(logits: ArrayLike, labels: ArrayLike, tpr: float = 0.95) -> float:
    """Fraction of wrong predictions accepted by the largest confidence threshold that accepts
    at least ``tpr`` of the right ones; NaN when all are right or all wrong."""
    if not (isinstance(tpr, (int, float)) and 0 < tpr <= 1):
        raise ValueError(f"tpr must be in (0, 1], got {tpr!r}")
    return separation.fpr_at_tpr(*_right_wrong(logits, labels), tpr)


def threshold_for_risk(logits: ArrayLike, labels: ArrayLike, risk: float = 0.05) -> float:
    """The lowest confidence threshold (the largest coverage) whose selective risk on these
    samples is at most ``risk``: accept a sample when its confidence is >= the threshold.
    ``inf`` when no threshold reaches the risk (accept nothing)."""
    if not (isinstance(risk, (int, float)) and 0 <= risk <= 1):
        raise ValueError(f"risk must be in [0, 1], got {risk!r}")
    curve = risk_coverage(logits, labels)
    ok = torch.nonzero(curve.risk <= risk + 1e-12).flatten()
    return float(curve.thresholds[ok[-1]]) if ok.numel() else math.inf


def accepted_risk(logits: ArrayLike, labels: ArrayLike, threshold: float) -> tuple[float, float]:
    """(selective risk, coverage) of accepting the samples whose confidence is >= ``threshold``;
    the risk is NaN when nothing is accepted."""
    conf, wrong = _sorted(logits, labels)
    accepted = conf >= threshold
    n = int(accepted.sum())
    coverage = n / conf.numel()
    return (float(wrong[accepted].mean()) if n else math.nan), coverage
