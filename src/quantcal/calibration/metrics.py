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

Where the code lives (this module re-exports the public names): input validation in
:mod:`~quantcal.calibration.checks`, bins and bin statistics in
:mod:`~quantcal.calibration.binning`, row passes in :mod:`~quantcal.calibration.rows`, the ECE
family and scoring rules in :mod:`~quantcal.calibration.scores`, smooth ECE in
:mod:`~quantcal.calibration.smooth`, the reliability diagram in
:mod:`~quantcal.calibration.reliability`, bootstrap intervals in
:mod:`~quantcal.calibration.bootstrap`, and selective prediction and failure detection (AURC,
risk at a coverage, AUROC and FPR at 95 % TPR of right against wrong) in
:mod:`~quantcal.calibration.selective`, and unknown-input detection (MSP, max logit, energy) in
:mod:`~quantcal.calibration.ood`.
"""

from __future__ import annotations

from quantcal.calibration.binning import BINNINGS
from quantcal.calibration.bootstrap import (
    MetricFn,  # noqa: F401  (a public type, not in __all__)
    bootstrap_ci,
    bootstrap_metric_names,
    paired_bootstrap_contrast,
    paired_bootstrap_diff,
)
from quantcal.calibration.checks import ArrayLike  # noqa: F401  (a public type, not in __all__)
from quantcal.calibration.ood import OOD_SCORES, ood_auroc, ood_fpr_at_tpr, ood_score
from quantcal.calibration.reliability import Reliability, plot_reliability, reliability
from quantcal.calibration.scores import (
    NORMS,
    accuracy,
    adaptive_ece,
    brier,
    calibration_report,
    classwise_ece,
    debiased_ece,
    debiased_ece_sq,
    ece,
    mce,
    mean_confidence,
    nll,
)
from quantcal.calibration.selective import (
    RiskCoverage,
    aurc,
    coverage_at_risk,
    excess_aurc,
    failure_auroc,
    failure_fpr_at_tpr,
    risk_coverage,
    selective_risk,
)
from quantcal.calibration.smooth import smooth_ece, smooth_ece_from_confidences

__all__ = [
    "BINNINGS",
    "NORMS",
    "OOD_SCORES",
    "Reliability",
    "RiskCoverage",
    "accuracy",
    "adaptive_ece",
    "aurc",
    "bootstrap_ci",
    "bootstrap_metric_names",
    "brier",
    "calibration_report",
    "classwise_ece",
    "coverage_at_risk",
    "debiased_ece",
    "debiased_ece_sq",
    "ece",
    "excess_aurc",
    "failure_auroc",
    "failure_fpr_at_tpr",
    "mce",
    "mean_confidence",
    "nll",
    "ood_auroc",
    "ood_fpr_at_tpr",
    "ood_score",
    "paired_bootstrap_contrast",
    "paired_bootstrap_diff",
    "plot_reliability",
    "reliability",
    "risk_coverage",
    "selective_risk",
    "smooth_ece",
    "smooth_ece_from_confidences",
]
