"""The shift stages: a group's test images corrupted by each ``[data] shifts`` entry, and each
cell's logits on them (issue #25).

``shift_images`` (group scope, not cached: the corruptions are deterministic, seeded by the
group's seed and each image's index, :func:`quantcal.training.corruptions.corrupt`) makes each
corrupted copy of test on first use and keeps it for the group's cells. ``shift_logits`` (cell
scope) gives ``{shift: test logits}``; key :func:`quantcal.study.keys.shift_logits_key`, record
``cache/shift_logits/KEY.pt`` with ``KEY.json`` (its SHA-256, written last). The rows stage
scores each cell on each shift, its recalibrators fitted on the clean validation logits. Plan
cells are scored on clean test only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from quantcal._io import atomic_write_bytes, torch_bytes
from quantcal.study.cells import Group, QuantCell
from quantcal.study.keys import logits_key, shift_logits_key
from quantcal.study.stages.base import Need, Stage

if TYPE_CHECKING:  # pragma: no cover
    from quantcal.study.context import Context

__all__ = ["ShiftImages", "ShiftLogits", "cached_shift_logits", "cell_model", "tensor_entry"]


def tensor_entry(
    ctx: Context, folder: str, key: str, compute: Callable[[], Any], record: dict | None = None
) -> Any:
    """The verified cache entry ``cache/FOLDER/KEY.pt`` (its ``KEY.json`` holds the SHA-256 and
    is written last), computed by ``compute()`` and written when absent or damaged."""
    path = ctx.cache / folder / f"{key}.pt"
    meta_path = path.with_suffix(".json")
    meta = ctx.store.read_json(meta_path, ("sha256",))
    if meta is not None:
        hit = ctx.store.read_torch(path, meta["sha256"])
        if hit is not None:
            return hit
        meta_path.unlink(missing_ok=True)
    elif path.exists():
        ctx.store.heal(path, "no valid JSON record beside it")
    value = compute()
    raw = torch_bytes(value)
    atomic_write_bytes(path, raw)
    ctx.store.write_json(meta_path, {**(record or {}), "sha256": hashlib.sha256(raw).hexdigest()})
    return value


def cell_model(need: Need, cell: QuantCell):
    """The network a cell evaluates: the deploy form for fp32, else the quantized one."""
    return need("deploy")[0] if cell.is_fp32 else need("quantize")[0]


class _Shifted:
    """A group's corrupted test copies, each made on first use and kept."""

    def __init__(self, test, seed: int, device: str):
        self.test, self.seed, self.device = test, seed, device
        self._made: dict[str, Any] = {}

    def __call__(self, shift: str):
        from quantcal.training import corruptions

        if shift not in self._made:
            name, severity = corruptions.parse_shift(shift)
            images = corruptions.corrupt(
                self.test.images, name, severity, seed=self.seed, device=self.device
            )
            self._made[shift] = dataclasses.replace(self.test, images=images)
        return self._made[shift]


class ShiftImages(Stage):
    """``shift -> test split corrupted by it`` (a callable, lazy), preprocessed like test."""

    name: ClassVar[str] = "shift_images"
    scope: ClassVar[str] = "group"
    reads: ClassVar[tuple[str, ...]] = ("data",)

    def run(self, ctx: Context, item: Group, need: Need) -> Any:
        return _Shifted(need("data").test, item.seed, ctx.device)


def _applies(ctx: Context, cell: QuantCell) -> bool:
    return bool(ctx.config.shifts) and not cell.precision.startswith("plan:")


def cached_shift_logits(ctx: Context, cell: QuantCell, train_key: str, shift: str):
    """A cell's cached test logits under ``shift`` (verified), or None."""
    key = shift_logits_key(logits_key(ctx.config, cell, train_key), shift)
    path = ctx.cache / "shift_logits" / f"{key}.pt"
    meta = ctx.store.read_json(path.with_suffix(".json"), ("sha256",))
    return None if meta is None else ctx.store.read_torch(path, meta["sha256"])


class ShiftLogits(Stage):
    """``{shift: test logits}`` of a cell on every ``[data] shifts`` entry."""

    name: ClassVar[str] = "shift_logits"
    reads: ClassVar[tuple[str, ...]] = ("shift_images", "deploy", "quantize")
    cache: ClassVar[str | None] = "shift_logits"

    def applies(self, ctx: Context, item: QuantCell) -> bool:
        return _applies(ctx, item)

    def keys(self, ctx: Context, item: QuantCell) -> list[str]:
        if not _applies(ctx, item):
            return []
        lkey = logits_key(ctx.config, item, ctx.train_key(item.group))
        return [shift_logits_key(lkey, s) for s in ctx.config.shifts]

    def run(self, ctx: Context, item: QuantCell, need: Need) -> Any:
        from quantcal.training import train

        cell = item
        out: dict[str, Any] = {}
        t0, made = time.perf_counter(), 0
        for shift, key in zip(ctx.config.shifts, self.keys(ctx, cell), strict=True):

            def compute(shift: str = shift) -> Any:
                nonlocal made
                made += 1
                logits, _ = train.predict_logits(
                    cell_model(need, cell),
                    need("shift_images")(shift),
                    batch_size=ctx.config.eval_batch_size,
                    device=ctx.device,
                )
                return logits

            record = {"precision": cell.precision, "shift": shift}
            out[shift] = tensor_entry(ctx, "shift_logits", key, compute, record)
        if made:
            ctx.say(
                f"shift  {cell.group.label}  {cell.precision}{cell.where}: {made} corrupted "
                f"test sets ({time.perf_counter() - t0:.1f} s)"
            )
        return out
