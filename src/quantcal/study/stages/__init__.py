"""The stages of a study, in order. A new stage is one module here and one line in
:data:`STAGES`; see ``docs/architecture.md``.

Group scope: data -> train -> deploy (-> shift_images, corrupted test copies). Cell scope:
plan (plan cells) -> quantize (by method) -> logits (-> shift_logits) -> rows -> attribution
(attributed cells) -> ood (-> ood_logits, with ood_images per group; when ``[data] ood`` is
set). The study-scope stages (the sections of details.json, then the report) are listed in
:data:`quantcal.study.details.SECTIONS`.
"""

from __future__ import annotations

from quantcal.study.stages.attribution import Attribution
from quantcal.study.stages.base import Need, Outputs, Stage
from quantcal.study.stages.data import Data
from quantcal.study.stages.deploy import Deploy
from quantcal.study.stages.logits import Logits
from quantcal.study.stages.ood import Ood, OodImages, OodLogits
from quantcal.study.stages.plan import Plan
from quantcal.study.stages.quantize import Quantize
from quantcal.study.stages.rows import Rows
from quantcal.study.stages.shift import ShiftImages, ShiftLogits
from quantcal.study.stages.train import Train

__all__ = ["STAGES", "Need", "Outputs", "Stage"]

#: Every stage, in the order the runner asks for the eager ones (train per group; logits, rows
#: and attribution per cell); the others run when a stage that reads them needs them.
STAGES: tuple[Stage, ...] = (
    Data(),
    Train(),
    Deploy(),
    Plan(),
    Quantize(),
    Logits(),
    ShiftImages(),
    ShiftLogits(),
    Rows(),
    Attribution(),
    OodImages(),
    OodLogits(),
    Ood(),
)
