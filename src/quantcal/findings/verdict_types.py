"""The types of the deployer's verdicts (:mod:`quantcal.findings.verdicts`): the outcomes,
from best to worst, the :class:`Budget` a study sets, a :class:`Repair` (one recalibrator
measured on a cell) and a :class:`Verdict` (one quantized cell's outcome and the numbers behind
it)."""

from __future__ import annotations

from dataclasses import dataclass

from quantcal.calibration import recal as _recal
from quantcal.findings.rows import Estimate

__all__ = [
    "ACCURACY_LOST",
    "LIKE_FP32_BROKEN",
    "LIKE_FP32_RECAL",
    "NONE",
    "NOT_REPAIRABLE",
    "OUTCOMES",
    "SAFE",
    "SAFE_AFTER_RECAL",
    "SAFE_OUTCOMES",
    "Budget",
    "Repair",
    "Verdict",
]

SAFE = "safe as is"
SAFE_AFTER_RECAL = "safe after recalibration"
LIKE_FP32_RECAL = "as trustworthy as fp32, which is not: recalibrate"
LIKE_FP32_BROKEN = "as trustworthy as fp32, which is not: cannot be repaired"
ACCURACY_LOST = "not safe: accuracy lost"
NOT_REPAIRABLE = "not safe: confidence cannot be repaired"
#: The outcomes, from best to worst.
OUTCOMES = (
    SAFE,
    SAFE_AFTER_RECAL,
    LIKE_FP32_RECAL,
    LIKE_FP32_BROKEN,
    ACCURACY_LOST,
    NOT_REPAIRABLE,
)
#: Outcomes whose model may be deployed (the recalibrated ones with their recalibrator).
SAFE_OUTCOMES = (SAFE, SAFE_AFTER_RECAL, LIKE_FP32_RECAL)
#: An estimate with no value: a verdict's field when no recalibrator was measured.
NONE = Estimate(None, None, None, 0)


@dataclass(frozen=True)
class Budget:
    """What a deployer accepts: top-1 accuracy lost and ECE gained vs fp32, and the highest ECE
    at all (fractions: 0.01 is one point; ``max_ece`` 0.05 is 5 %)."""

    max_accuracy_drop: float = 0.01
    max_ece_rise: float = 0.01
    max_ece: float = 0.05

    def __post_init__(self) -> None:
        for name in ("max_accuracy_drop", "max_ece_rise", "max_ece"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be a fraction in [0, 1] (0.01 = 1 point), got {v!r}")


@dataclass(frozen=True)
class Repair:
    """One recalibrator measured on a cell: its ECE and accuracy, the paired ECE differences
    vs the fp32 model with the same recalibrator and vs no recalibration, and the notes on its
    fit (:func:`quantcal.recal.fit_notes`)."""

    method: str
    fit: str
    ece: Estimate
    accuracy: Estimate
    diff_vs_fp32: Estimate
    diff_vs_none: Estimate
    keeps_predictions: bool
    parameters: int | None
    notes: tuple[str, ...] = ()
    n_fit: int | None = None
    n_classes: int | None = None

    @property
    def raised_ece(self) -> bool:
        """Its fit measurably raised the held-out ECE (paired interval above 0)."""
        d = self.diff_vs_none
        return d.decided and d.lo > 0

    @property
    def small_fit(self) -> bool:
        """Fitted on fewer images than :func:`quantcal.recal.min_fit_images`."""
        return self.n_fit is not None and self.n_fit < _recal.min_fit_images(
            self.method, self.n_classes
        )


@dataclass(frozen=True)
class Verdict:
    """One quantized cell's outcome (see :mod:`quantcal.findings.verdicts`) and the numbers behind
    it.

    ``recal`` and ``recal_fit`` name the recalibrator the verdict rests on (the repair, else the
    best usable one; empty when none was measured); ``best_ece`` and ``recal_accuracy`` are its
    ECE and accuracy, ``fp32_best_ece`` the fp32 model's best. ``basis`` names the intervals
    that decided (when ``borderline``, only those that straddle their line); ``notes`` are
    the warnings on the cell's recalibrators (fits too small or that raised ECE).
    """

    dataset: str
    model: str
    precision: str
    outcome: str
    accuracy: Estimate
    fp32_accuracy: Estimate
    ece: Estimate
    fp32_ece: Estimate
    best_ece: Estimate
    fp32_best_ece: Estimate
    recal: str
    recal_fit: str
    borderline: bool
    reason: str
    recal_accuracy: Estimate = NONE
    basis: str = ""
    notes: tuple[str, ...] = ()
    #: The fp32 abstention threshold on this cell as deployed (as is, or with the repairing
    #: recalibrator): "threshold holds", "re-set the threshold", "target risk unreachable"
    #: (:mod:`quantcal.findings.threshold`; the worst over seeds), or "" when not measured.
    threshold: str = ""

    @property
    def safe(self) -> bool:
        return self.outcome in SAFE_OUTCOMES
