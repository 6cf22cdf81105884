"""The shift stages: a group's test images corrupted by each ``[data] shifts`` entry, and each
cell's logits on them (issue #25).

``shift_images`` (group scope, not cached: the corruptions are deterministic, seeded by the
group's seed and each image's index, :func:`quantcal.training.corruptions.corrupt`) makes each
corrupted copy of test on first use and keeps it for the group's cells (uint8: about 30 MB a
shift for CIFAR's 10,000 test images, 2.3 GB for all 75). ``shift_logits`` (cell
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

__all__ = [
    "ShiftImages",
    "ShiftLogits",
    "cached_shift_logits",
    "cell_model",
    "logits_per_set",
    "read_entry",
    "tensor_entry",
]


def read_entry(ctx: Context, folder: str, key: str) -> Any:
    """The verified cache entry ``cache/FOLDER/KEY.pt`` (its ``KEY.json`` holds the SHA-256),
    or None when absent or damaged (a damaged entry's record is removed, so it is rebuilt)."""
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
    return None


def tensor_entry(
    ctx: Context, folder: str, key: str, compute: Callable[[], Any], record: dict | None = None
) -> Any:
    """:func:`read_entry`, else ``compute()`` written as that entry (its JSON record last)."""
    hit = read_entry(ctx, folder, key)
    if hit is not None:
        return hit
    value = compute()
    raw = torch_bytes(value)
    path = ctx.cache / folder / f"{key}.pt"
    atomic_write_bytes(path, raw)
    meta = {**(record or {}), "sha256": hashlib.sha256(raw).hexdigest()}
    ctx.store.write_json(path.with_suffix(".json"), meta)
    return value


def logits_per_set(
    ctx: Context,
    need: Need,
    cell: QuantCell,
    images: str,
    folder: str,
    specs: tuple[str, ...],
    keys: list[str],
) -> tuple[dict[str, Any], int]:
    """``({spec: logits}, how many were computed)``: the cell's logits on each image set that
    stage ``images`` makes (``need(images)(spec)``), each a cached entry of ``folder``. The
    cell's model is asked for only on a miss."""
    from quantcal.training import train

    out: dict[str, Any] = {}
    made = 0
    for spec, key in zip(specs, keys, strict=True):

        def compute(spec: str = spec) -> Any:
            nonlocal made
            made += 1
            return train.predict_logits(
                cell_model(need, cell),
                need(images)(spec),
                batch_size=ctx.config.eval_batch_size,
                device=ctx.device,
            )[0]

        record = {"precision": cell.precision, "set": spec}
        out[spec] = tensor_entry(ctx, folder, key, compute, record)
    return out, made


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
    return read_entry(ctx, "shift_logits", key)


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
        cell = item
        t0 = time.perf_counter()
        keys = self.keys(ctx, cell)
        out, made = logits_per_set(
            ctx, need, cell, "shift_images", "shift_logits", ctx.config.shifts, keys
        )
        if made:
            ctx.say(
                f"shift  {cell.group.label}  {cell.precision}{cell.where}: {made} corrupted "
                f"test sets ({time.perf_counter() - t0:.1f} s)"
            )
        return out
