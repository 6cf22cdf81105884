"""The deployer's verdict per model and precision, from a budget the study sets.

For each quantized cell (dataset, model, precision; the first range estimator and
range-calibration sample; seeds aggregated by :func:`quantcal.findings.rows.aggregate`), with the
same model's fp32 cell as the reference and a :class:`Budget` (``[report]`` in a study file;
defaults: ``max_accuracy_drop`` 0.01 and ``max_ece_rise`` 0.01, one point each vs fp32, and
``max_ece`` 0.05, an absolute ECE of 5 % that no deployed model should exceed whatever fp32
does):

A recalibrator is a **usable repair** of the cell when it does not cost more than
``max_accuracy_drop`` of accuracy vs the cell as is (vector and matrix scaling change
predictions), and its fit did not measurably raise the held-out ECE (the paired interval of
``ece_diff_vs_none`` above 0; :func:`quantcal.recal.fit_notes`). It **repairs** the cell when,
in addition, the cell's accuracy after it is within ``max_accuracy_drop`` of fp32 and its ECE is
≤ the fp32 model's best ECE (raw or after a usable recalibrator) + ``max_ece_rise`` and ≤
``max_ece``. Among the repairs, the one with the lowest ECE is named, unless one that keeps
every prediction and fits fewer parameters is within noise of it (its ECE above the lowest by at
most half its own interval): that one is named (temperature before histogram binning before
isotonic regression before vector scaling, at equal ECE).

1. **safe as is** when accuracy is within budget, ECE ≤ fp32's ECE + ``max_ece_rise`` and ECE ≤
   ``max_ece``;
2. **safe after recalibration** when a recalibrator repairs it (where the raw accuracy was lost,
   only a recalibrator that changes predictions and wins the accuracy back can: the reason then
   says "vector changes predictions: accuracy 21.9 → 88.8 %");
3. **as trustworthy as fp32, which is not: recalibrate** when its ECE is within fp32's +
   ``max_ece_rise`` but fp32 itself is over ``max_ece`` (quantization did no harm; the
   confidence was never trustworthy), and a recalibrator repairs it;
4. **as trustworthy as fp32, which is not: cannot be repaired**: the same, with no repair;
5. **not safe: accuracy lost** when fp32 accuracy − quantized accuracy > ``max_accuracy_drop``
   and no recalibrator wins it back (a recalibrator that gains accuracy is still named);
6. **not safe: confidence cannot be repaired** otherwise.

Point estimates decide. A verdict is ``borderline`` (the report's ≈) when the interval of a
difference that decided it straddles its budget line: the paired interval of ΔECE vs fp32
(``ece_diff_vs_fp32``) for the raw ECE; for a recalibrated ECE, the paired ΔECE vs the fp32
model with the same recalibrator when that is fp32's best, else (no paired column for that
difference) the recalibrated ECE's own interval against the line; the ECE's own interval against
the absolute ``max_ece`` (a fixed line has no partner); the quantized accuracy's own interval
against fp32's accuracy − ``max_accuracy_drop`` (the rows have no paired accuracy difference).
``Verdict.basis`` says which intervals were used.

Layout: the outcomes and types are in :mod:`quantcal.findings.verdict_types`, the rules above in
:mod:`quantcal.findings.verdict_rules`, the table and summary sentences in
:mod:`quantcal.findings.verdict_text`; this module gathers their public names.
"""

from __future__ import annotations

from quantcal.findings.verdict_rules import repairs, verdicts
from quantcal.findings.verdict_text import summary, verdict_table
from quantcal.findings.verdict_types import (
    ACCURACY_LOST,
    LIKE_FP32_BROKEN,
    LIKE_FP32_RECAL,
    NOT_REPAIRABLE,
    OUTCOMES,
    SAFE,
    SAFE_AFTER_RECAL,
    SAFE_OUTCOMES,
    Budget,
    Repair,
    Verdict,
)

__all__ = [
    "ACCURACY_LOST",
    "LIKE_FP32_BROKEN",
    "LIKE_FP32_RECAL",
    "NOT_REPAIRABLE",
    "OUTCOMES",
    "SAFE",
    "SAFE_AFTER_RECAL",
    "SAFE_OUTCOMES",
    "Budget",
    "Repair",
    "Verdict",
    "repairs",
    "summary",
    "verdict_table",
    "verdicts",
]
