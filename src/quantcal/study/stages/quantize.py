"""The quantize stage: a cell's quantized model by its method (``quant.available_methods()``).

A method that trains (``qat``) fine-tunes on the group's training split with the study's recipe,
resumable from ``cache/qat/KEY`` (KEY: the cell's logits key). The stage is not cached itself:
its result is the logits stage's record, and it runs only when those logits are not cached (or an
attribution needs the model again: quantization is deterministic). A plan cell quantizes with the
configuration the plan stage found.

Under torchrun (``WORLD_SIZE`` > 1) the cells whose method trains are quantized by every rank
together before the rank-0-only stages (:func:`distribute`).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, ClassVar

from quantcal.study.cells import Group, QuantCell
from quantcal.study.environment import rank
from quantcal.study.keys import logits_key, plan_spec, quant_config
from quantcal.study.notes import recorded_warnings
from quantcal.study.stages import data as data_stage
from quantcal.study.stages import train as train_stage
from quantcal.study.stages.base import Need, Outputs, Stage

if TYPE_CHECKING:  # pragma: no cover
    from quantcal.study.context import Context

__all__ = ["Quantize", "distribute", "quantize_cell"]


def quantize_cell(ctx: Context, cell: QuantCell, deploy, qc, calib, splits, key: str):
    """The cell's quantized model by its method (``quant.quantize``)."""
    from quantcal import quant
    from quantcal.quant.methods import get_method

    spec = get_method(cell.method)
    extra: dict[str, Any] = {}
    if spec.needs_train_data:
        extra = {
            "train_data": splits,
            "train_config": train_stage.train_config(ctx, cell.group),
            "work_dir": ctx.cache / "qat" / key,
        }
    label = f"{cell.group.label}  {cell.precision}{cell.where}"
    return quant.quantize(
        deploy,
        qc,
        calib,
        method=cell.method,
        method_options=ctx.config.method_options.get(cell.method),
        log=lambda line: ctx.say(f"quant  {label}: {line}"),
        **extra,
    )


class Quantize(Stage):
    """(quantized model, the warnings its making raised, as notes) of a quantized cell."""

    name: ClassVar[str] = "quantize"
    reads: ClassVar[tuple[str, ...]] = ("data", "train", "deploy", "plan")

    def applies(self, ctx: Context, item: QuantCell) -> bool:
        return not item.is_fp32

    def run(self, ctx: Context, item: QuantCell, need: Need) -> Any:
        cell = item
        splits = need("data")
        deploy = need("deploy")[0]
        calib = data_stage.ptq_batches(ctx, splits, cell.sample)
        qc = need("plan")[0] if plan_spec(ctx.config, cell) else quant_config(ctx.config, cell)
        key = logits_key(ctx.config, cell, need("train")[1])
        with recorded_warnings() as caught:
            net = quantize_cell(ctx, cell, deploy, qc, calib, splits, key)
        return net, caught

    def prepare(self, ctx: Context, outputs: Outputs, group: Group, cells: list[QuantCell]) -> None:
        distribute(ctx, outputs, group, cells)


def distribute(ctx: Context, outputs: Outputs, g: Group, cells: list[QuantCell]) -> None:
    """Under torchrun (``WORLD_SIZE`` > 1), quantize the cells whose method trains (``qat``)
    by every rank together (``train.train`` runs them with DDP); rank 0 keeps each result (or
    its failure) as the cell's quantize output for its logits stage, the other ranks drop theirs.
    A single process quantizes them in the logits stage instead."""
    from quantcal.quant.methods import get_method
    from quantcal.study.stages import logits as logits_stage

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    tkey = outputs.get("train", g)[1]
    for cell in cells:
        if cell.is_fp32 or not get_method(cell.method).needs_train_data:
            continue
        if logits_stage.cached(ctx, cell, tkey) is not None:
            continue
        key = logits_key(ctx.config, cell, tkey)
        try:
            splits = outputs.get("data", g)
            deploy = outputs.get("deploy", g)[0]
            calib = data_stage.ptq_batches(ctx, splits, cell.sample)
            with recorded_warnings() as caught:
                qc = quant_config(ctx.config, cell)
                net = quantize_cell(ctx, cell, deploy, qc, calib, splits, key)
            result: Any = (net, caught)
        except Exception as exc:  # rank 0 records it as the cell's error in its turn
            result = exc
        if rank() == 0:
            outputs.put("quantize", cell, result)
