"""The plan stage (optional: ``[quant] plans``): the mixed-precision configuration of a
``plan:KIND`` cell, searched on the group's range-calibration sample and its search images.

The search (``quant.plan_mixed_precision``) reads :func:`~quantcal.study.stages.data.search_split`
(val, or one half of test for a checkpoint trained elsewhere); its record goes into the cell's
logits record (and details.json), with ``images``: what it read and what its rows are scored on.
Its settings are part of the cell's logits key (:func:`quantcal.study.keys.logits_key`).
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any, ClassVar

from quantcal.study.cells import QuantCell
from quantcal.study.keys import plan_spec, quant_config
from quantcal.study.stages import data as data_stage
from quantcal.study.stages.base import Need, Stage
from quantcal.training import images as _images

if TYPE_CHECKING:  # pragma: no cover
    from quantcal.study.context import Context

__all__ = ["Plan"]


class Plan(Stage):
    """(the plan's QuantConfig, the search's record) of a plan cell."""

    name: ClassVar[str] = "plan"
    reads: ClassVar[tuple[str, ...]] = ("data", "deploy")

    def applies(self, ctx: Context, item: QuantCell) -> bool:
        return plan_spec(ctx.config, item) is not None

    def run(self, ctx: Context, item: QuantCell, need: Need) -> Any:
        from quantcal import quant

        cell, config = item, ctx.config
        spec = plan_spec(config, cell)
        if spec is None:
            raise ValueError(f"{cell.precision} is not a plan cell")
        top = quant_config(config, cell)
        splits = need("data")
        deploy = need("deploy")[0]
        calib = data_stage.ptq_batches(ctx, splits, cell.sample)
        budget = quant.PlanBudget(
            max_accuracy_drop=spec["max_accuracy_drop"],
            max_ece_rise=spec["max_ece_rise"],
            recal=spec["recal"],
            confidence=None
            if spec.get("confidence", 0.9) is False
            else spec.get("confidence", 0.9),
        )
        t0 = time.perf_counter()
        search = data_stage.search_split(ctx, cell.group)
        result = quant.plan_mixed_precision(
            deploy,
            calib,
            search.batches(config.eval_batch_size, device=ctx.device),
            budget=budget,
            levels=spec["levels"],
            cost=spec["cost"],
            base_config=top,
            seed=cell.group.seed,
            batch_size=config.eval_batch_size,
            memo=ctx.memo("plan").setdefault((cell.group, spec["recal"]), {}),
            log=lambda line: ctx.say(f"plan   {cell.group.label}  {cell.precision}: {line}"),
        )
        qc = dataclasses.replace(
            result.config, observer=top.observer, first_last_8bit=top.first_last_8bit
        )
        ctx.say(
            f"plan   {cell.group.label}  {cell.precision}: {len(qc.layer_bits)} of "
            f"{len(result.plan)} layers off {qc.name.split('+')[0]}, {result.evaluations} "
            f"evaluations ({time.perf_counter() - t0:.1f} s)"
        )
        record = result.as_dict()
        policy = data_stage.stage_images(ctx, cell.group)
        record["images"] = policy.describe(len(search), stage="the plan search")
        halved = policy.search == _images.TEST_HALF
        record["images"]["scored_on"] = _images.REPORT_HALF if halved else "test"
        record["images"]["n_scored"] = len(splits.test) - (len(search) if halved else 0)
        return qc, record
