"""Claims as objects: each finding is a small function over result rows returning a ``Claim``.

A claim function takes the rows of ``results.csv`` (as :func:`quantcal.report.load_rows` reads
them) and returns a :class:`Claim`: the statement, a verdict, the evidence as sentences and as
rows of numbers with intervals, and whether this study tests it at all. They are registered in
order in ``CLAIMS`` (``register_claim`` adds one); :func:`evaluate` runs them all.

Which claims a study tests is decided from its rows, never from its name:

- the paper's claim 1 (ECE grows as precision falls) needs, for some model, fp32 and a quantized
  precision (the verdict is on the lowest one);
- claim 2 (GhostNet-VGG is the most robust) needs ``ghostnet_vgg16`` and another architecture
  on the same dataset, each at fp32 and the lowest precision;
- claim 3 (temperature scaling helps quantized nets but fails for 4-bit MobileOne) needs
  temperature scaling at a quantized precision; its MobileOne half needs ``mobileone_s0``;
- the extras need what they compare (a reused fp32 temperature; several range-calibration
  samples; several training objectives).

Seeds are aggregated one way everywhere (:func:`quantcal.findings.rows.aggregate`): per-seed values
(each a paired difference with its bootstrap interval where the column is one), then their mean
with an interval that holds the test-image variance within seeds and the training variance
between them. The paper: Kuang & Wong, "On Calibration of Modern Quantized Efficient Neural
Networks", arXiv 2309.13866.

Layout: the type and the registry are in :mod:`quantcal.findings.claims.registry`, the shared
pieces of evidence in :mod:`~quantcal.findings.claims.evidence`, and the claims by theme in
:mod:`~quantcal.findings.claims.paper` (the paper's three),
:mod:`~quantcal.findings.claims.extras` (quantcal's extras on the rows) and
:mod:`~quantcal.findings.claims.details` (the ablation, the attribution and repair, on
``details.json``) and :mod:`~quantcal.findings.claims.decisions` (failure detection, corrupted
and unknown inputs). They are imported below in report order, which is the order of ``CLAIMS``.
"""

from __future__ import annotations

from quantcal.findings.claims.evidence import summarise
from quantcal.findings.claims.registry import CLAIMS, Claim, ClaimFn, evaluate, register_claim

# Report order: each import registers its module's claims (``@register_claim``) in turn, so
# these stay in this order (not sorted).
# isort: off
from quantcal.findings.claims.paper import (
    ghostnet_most_robust,
    precision_raises_ece,
    temperature_scaling_helps,
)
from quantcal.findings.claims.extras import (
    calibration_budgeted_plans,
    range_sample_variance,
    refit_temperature,
    training_objectives,
)
from quantcal.findings.claims.details import (
    ablation_properties,
    attention_keeps_calibration,
    attribution_layer_types,
    repair_restores,
    separable_mechanism,
)
from quantcal.findings.claims.decisions import (
    failure_detection_beyond_accuracy,
    ood_moves_with_calibration,
    quantization_and_corruption_compound,
    temperature_holds_under_shift,
)

# isort: on

__all__ = [
    "CLAIMS",
    "Claim",
    "ClaimFn",
    "ablation_properties",
    "attention_keeps_calibration",
    "attribution_layer_types",
    "calibration_budgeted_plans",
    "evaluate",
    "failure_detection_beyond_accuracy",
    "ghostnet_most_robust",
    "ood_moves_with_calibration",
    "precision_raises_ece",
    "quantization_and_corruption_compound",
    "range_sample_variance",
    "refit_temperature",
    "register_claim",
    "repair_restores",
    "separable_mechanism",
    "summarise",
    "temperature_holds_under_shift",
    "temperature_scaling_helps",
    "training_objectives",
]
