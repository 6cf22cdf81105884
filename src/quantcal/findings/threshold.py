"""The deployer's abstention threshold, carried from fp32 to a quantized model (issue #25,
item 2): does it still hold?

The rule: a confidence threshold is set on the fp32 model's validation logits for a target
risk (the lowest threshold whose error rate among accepted images is at most ``target_risk``,
:func:`~quantcal.calibration.selective.threshold_for_risk`). On a quantized model's test logits
that threshold gives some risk and coverage as is, and after the quantized model is
recalibrated; re-set on the quantized model's own validation logits it gives others. The
outcome, for a verdict table:

- ``"threshold holds"``: the fp32 threshold keeps the test risk at or below the target;
- ``"re-set the threshold"``: it does not, but a threshold re-set on the quantized model's own
  validation logits does (with some coverage);
- ``"target risk unreachable"``: no threshold on the quantized model's validation logits reaches
  the target, or the re-set one does not hold on test either.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from quantcal.calibration.checks import ArrayLike
from quantcal.calibration.selective import accepted_risk, threshold_for_risk

__all__ = ["OUTCOMES", "ThresholdTransfer", "judge", "threshold_transfer"]

HOLDS, RESET, UNREACHABLE = "threshold holds", "re-set the threshold", "target risk unreachable"
#: The outcomes, from the best.
OUTCOMES = (HOLDS, RESET, UNREACHABLE)


@dataclass(frozen=True)
class ThresholdTransfer:
    """The thresholds and what each gives on test: (selective risk, coverage) pairs, the risk
    NaN where nothing is accepted."""

    target_risk: float
    fp32_threshold: float
    as_is: tuple[float, float]
    recalibrated: tuple[float, float] | None
    reset_threshold: float
    reset: tuple[float, float]
    outcome: str


def _within(pair: tuple[float, float], target: float) -> bool:
    risk, coverage = pair
    return coverage > 0 and not math.isnan(risk) and risk <= target + 1e-12


def judge(
    kept: tuple[float, float],
    reset_threshold: float,
    reset: tuple[float, float],
    target_risk: float,
) -> str:
    """The outcome: ``kept`` is (risk, coverage) on test of the fp32 threshold, ``reset`` that
    of the threshold re-set on the quantized model's own validation logits
    (``reset_threshold``, ``inf`` when none reaches the target there)."""
    if _within(kept, target_risk):
        return HOLDS
    if math.isfinite(reset_threshold) and _within(reset, target_risk):
        return RESET
    return UNREACHABLE


def threshold_transfer(
    fp32_val: tuple[ArrayLike, ArrayLike],
    quant_val: tuple[ArrayLike, ArrayLike],
    quant_test: tuple[ArrayLike, ArrayLike],
    target_risk: float = 0.05,
    recalibrated_test: ArrayLike | None = None,
) -> ThresholdTransfer:
    """Apply the rule above to ``(logits, labels)`` pairs; ``recalibrated_test`` (the quantized
    model's test logits after recalibration, same labels) adds the ``recalibrated`` numbers."""
    t = threshold_for_risk(*fp32_val, risk=target_risk)
    as_is = accepted_risk(*quant_test, t)
    recal = (
        None if recalibrated_test is None else accepted_risk(recalibrated_test, quant_test[1], t)
    )
    t_own = threshold_for_risk(*quant_val, risk=target_risk)
    reset = accepted_risk(*quant_test, t_own)
    outcome = judge(as_is, t_own, reset, target_risk)
    return ThresholdTransfer(target_risk, t, as_is, recal, t_own, reset, outcome)
