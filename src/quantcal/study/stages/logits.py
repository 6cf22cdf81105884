"""The logits stage: a cell's validation and test logits, the currency of every later stage.

Key (:func:`quantcal.study.keys.logits_key`): the train key, the precision's QuantConfig, the
range-calibration sample, the method and its options (and a plan's search settings). Record:
``cache/logits/KEY.pt`` (the logits and labels) and ``KEY.json`` (SHA-256 of the ``.pt``, the
cell's identity, size and cost statistics, per-layer inspection, a plan's record, and the notes
of what the deploy form and the quantizer could not do as asked); the JSON is written last and
marks the entry complete. On a miss it asks the deploy, plan and quantize stages for the model.
"""

from __future__ import annotations

import hashlib
import time
from typing import TYPE_CHECKING, Any, ClassVar

from quantcal._io import atomic_write_bytes, torch_bytes
from quantcal.study.cells import QuantCell
from quantcal.study.keys import logits_key, plan_spec, quant_config
from quantcal.study.notes import fp32_model_notes, plan_notes
from quantcal.study.stages import data as data_stage
from quantcal.study.stages.base import Need, Stage

if TYPE_CHECKING:  # pragma: no cover
    from quantcal.study.context import Context

__all__ = ["Logits", "cached"]


def cached(ctx: Context, cell: QuantCell, train_key: str) -> dict | None:
    """The cell's cached logits (verified), or None when absent or damaged."""
    path = ctx.cache / "logits" / f"{logits_key(ctx.config, cell, train_key)}.pt"
    meta = ctx.store.read_json(path.with_suffix(".json"), ("sha256", "precision"))
    return None if meta is None else ctx.store.read_torch(path, meta["sha256"])


class Logits(Stage):
    """(logits and labels of val and test, the record, the logits key)."""

    name: ClassVar[str] = "logits"
    reads: ClassVar[tuple[str, ...]] = ("data", "train", "deploy", "plan", "quantize")
    eager: ClassVar[bool] = True
    cache: ClassVar[str | None] = "logits"

    def keys(self, ctx: Context, item: QuantCell) -> list[str]:
        return [logits_key(ctx.config, item, ctx.train_key(item.group))]

    def failed(self, ctx: Context, cells: list[QuantCell], exc: BaseException) -> bool:
        from quantcal.study.stages.rows import error_rows

        error_rows(ctx, cells, exc)
        return False  # no rows and no attribution without logits

    def run(self, ctx: Context, item: QuantCell, need: Need) -> Any:
        from quantcal import models, quant
        from quantcal.quant.matmul import matmul_modules
        from quantcal.training import train

        cell = item
        model, train_key, _ = need("train")
        key = logits_key(ctx.config, cell, train_key)
        path = ctx.cache / "logits" / f"{key}.pt"
        meta_path = path.with_suffix(".json")
        meta = ctx.store.read_json(meta_path, ("sha256", "precision"))
        if meta is not None:
            hit = ctx.store.read_torch(path, meta["sha256"])
            if hit is not None:
                return hit, meta, key
            meta_path.unlink(missing_ok=True)
        elif path.exists():
            ctx.store.heal(path, "no valid JSON record beside it")
        splits = need("data")
        t0 = time.perf_counter()
        qc = quant_config(ctx.config, cell)
        meta = {
            "precision": cell.precision,
            "observer": cell.observer,
            "sample": cell.sample,
            "method": None if qc is None else cell.method,
        }
        deploy, deploy_notes = need("deploy")
        notes = list(deploy_notes)
        if qc is None:
            net = deploy
        else:
            calib = data_stage.ptq_batches(ctx, splits, cell.sample)
            if plan_spec(ctx.config, cell) is not None:
                qc, meta["plan"] = need("plan")
                notes.extend(plan_notes(meta["plan"], cell.precision))
                policy_note = data_stage.stage_images(ctx, cell.group).plan_note
                if policy_note:
                    notes.append(policy_note)
            net, caught = need("quantize")
            notes.extend(n for n in caught if n not in notes)
            cov = getattr(net, "quant_coverage", None)
            if cov:
                meta["quantized_layers"] = f"{cov['quantized']}/{cov['total']}"
            products = matmul_modules(net)
            if products and qc.product_bits != qc.act_bits:  # the label says A{act_bits}
                notes.append(
                    f"{len(products)} product(s) of two activations (attention's Q·Kᵀ, A·V) "
                    f"at {qc.product_bits} bits ([quant] matmul_bits), the layers' "
                    f"activations at {qc.act_bits}"
                )
            try:
                meta["inspect"] = quant.inspect(net, calib[:2]).to_rows()
            except Exception as exc:  # a report nicety; never lose the cell for it
                meta["inspect_error"] = f"{type(exc).__name__}: {exc}"
        stats = models.describe(
            deploy, splits.image_size, in_chans=splits.channels, config=qc
        )  # weight bytes and BOPs at each layer's bits (a mixed plan's included)
        meta.update(
            params=stats.params, macs=stats.macs, weight_bytes=stats.weight_bytes, bops=stats.bops
        )
        out = {}
        for name in ("val", "test"):
            lg, lb = train.predict_logits(
                net,
                getattr(splits, name),
                batch_size=ctx.config.eval_batch_size,
                device=ctx.device,
            )
            out[f"{name}_logits"], out[f"{name}_labels"] = lg, lb
        meta["seconds"] = time.perf_counter() - t0
        if qc is None:
            notes.extend(fp32_model_notes(out["val_logits"], out["val_labels"]))
            notes.extend(data_stage.input_notes(ctx, model, splits))
        meta["notes"] = notes  # what the deploy form and the quantizer could not do as asked
        for note in notes:
            ctx.say(f"note   {cell.group.label}  {cell.precision}: {note}")
        raw = torch_bytes(out)
        meta["sha256"] = hashlib.sha256(raw).hexdigest()
        atomic_write_bytes(path, raw)
        ctx.store.write_json(meta_path, meta)  # last: it marks the entry complete
        ctx.say(
            f"eval   {cell.group.label}  {cell.precision}{cell.where}  ({meta['seconds']:.1f} s)"
        )
        return out, meta, key
