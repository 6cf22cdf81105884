"""The attribution stage (optional: ``[quant] attribution``): which layers a quantized cell's
calibration loss comes from (``quant.attribute_layers``), for the cells
:func:`quantcal.study.cells.attribution_cells` picks.

It reads the first ``[quant] attribution.samples`` images of the group's search images (val, or
the search half of test; ``images`` in the record says which) and the cell's quantized model:
the one the logits stage just made, or made again when the logits came from the cache
(quantization is deterministic). Key: :func:`quantcal.study.keys.attribution_key`; record:
``cache/attribution/KEY.json``. A failure is recorded and said; the cell's rows stand.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from quantcal.study.cells import QuantCell, attribution_cells
from quantcal.study.keys import attribution_key, logits_key
from quantcal.study.stages import data as data_stage
from quantcal.study.stages.base import Need, Stage

if TYPE_CHECKING:  # pragma: no cover
    from quantcal.study.context import Context

__all__ = ["Attribution", "path"]


def path(ctx: Context, cell: QuantCell, train_key: str) -> Path:
    """Where the cell's attribution record is cached."""
    lkey = logits_key(ctx.config, cell, train_key)
    images = data_stage.stage_images(ctx, cell.group).search
    return ctx.cache / "attribution" / f"{attribution_key(ctx.config, lkey, images)}.json"


class Attribution(Stage):
    """The cell's per-layer attribution record."""

    name: ClassVar[str] = "attribution"
    reads: ClassVar[tuple[str, ...]] = ("train", "quantize")
    eager: ClassVar[bool] = True
    cache: ClassVar[str | None] = "attribution"

    def keys(self, ctx: Context, item: QuantCell) -> list[str]:
        return [path(ctx, item, ctx.train_key(item.group)).stem]

    def applies(self, ctx: Context, item: QuantCell) -> bool:
        return item in attribution_cells(ctx.config, [item])

    def failed(self, ctx: Context, cells: list[QuantCell], exc: BaseException) -> bool:
        for cell in cells:
            g = cell.group
            ctx.attribution_errors.append(
                {"label": f"{g.label} {cell.precision}", "error": f"{type(exc).__name__}: {exc}"}
            )
            ctx.say(f"error  {g.label} {cell.precision} attribution: {type(exc).__name__}: {exc}")
        return True

    def run(self, ctx: Context, item: QuantCell, need: Need) -> Any:
        from quantcal import quant

        cell = item
        where = path(ctx, cell, need("train")[1])
        hit = ctx.store.read_json(where, ("groups", "precision"))
        if hit is not None:
            return hit
        spec = ctx.config.attribution or {}
        net = need("quantize")[0]  # its notes were said by the logits stage
        search = data_stage.search_split(ctx, cell.group)
        n = min(int(spec["samples"]), len(search))
        result = quant.attribute_layers(
            net,
            search.batches(ctx.config.eval_batch_size, device=ctx.device),
            granularity=spec["granularity"],
            n_bins=ctx.config.n_bins,
            max_samples=n,
        )
        result.images = data_stage.stage_images(ctx, cell.group).describe(
            n, stage="the attribution"
        )
        record = result.as_dict()
        ctx.store.write_json(where, record)
        for note in result.notes:
            ctx.say(f"note   {cell.group.label}  {cell.precision} attribution: {note}")
        ctx.say(
            f"attrib {cell.group.label}  {cell.precision}: {len(result.groups)} "
            f"{spec['granularity']}s x 2 over {n} {result.images['split']} images "
            f"({result.seconds:.1f} s, "
            f"{result.work_fraction:.0%} of the work of full passes)"
        )
        return record
