"""The deploy stage: the fp32 deploy form of a group's trained model, built once per group.

Every cell quantizes from it (``quantize`` copies it; ``to_deploy`` of a deploy graph is the same
function, tested bit-identical) instead of re-deploying the training form. Its outputs are
checked against the model's on the first range-calibration images; what the fold could not do
becomes notes on every row of the group. Not cached: it is a cheap function of the train stage.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from quantcal.study.cells import Group
from quantcal.study.factories import reparameterizer
from quantcal.study.notes import recorded_warnings
from quantcal.study.stages.base import Need, Stage

if TYPE_CHECKING:  # pragma: no cover
    from quantcal.study.context import Context

__all__ = ["Deploy"]


class Deploy(Stage):
    """(deploy-form model, the notes its making raised)."""

    name: ClassVar[str] = "deploy"
    scope: ClassVar[str] = "group"
    reads: ClassVar[tuple[str, ...]] = ("data", "train")

    def run(self, ctx: Context, item: Group, need: Need) -> Any:
        from quantcal import models

        model = need("train")[0]
        ptq_calib = need("data").ptq_calib
        x = next(ptq_calib.batches(32, device=ctx.device))[0] if len(ptq_calib) else None
        with recorded_warnings() as notes:
            deploy = models.to_deploy(
                model, reparameterize=reparameterizer(item.model.arch), check_input=x
            )
        return deploy, notes
