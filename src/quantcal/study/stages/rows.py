"""The rows stage: one result row per test shift and recalibration method of a cell, cached by
its row key.

Key (:func:`quantcal.study.keys.row_key`): the cell's logits key, the fp32 cell's logits key,
the recalibration method and where it is fitted, the metric settings, the row schema (the
result columns) and the shift (clean test, or a ``[data] shifts`` corruption), so a new column
recomputes rows but never retrains. Record: ``cache/rows/KEY.json``. The measurement itself is
:func:`quantcal.study.score.score`; a shifted row is recalibrated on the clean validation logits
and carries the paired interaction of quantization and the shift.

A (cell, method) that fails becomes an error row, kept in ``cache/errors`` (with its traceback)
so that shards can assemble it and the next run retries it; a cell whose logits never came to
exist gets error rows for every method (:func:`error_rows`).
"""

from __future__ import annotations

import time
import traceback
import warnings
from typing import TYPE_CHECKING, Any, ClassVar

from quantcal._io import atomic_write_text
from quantcal.calibration.recal_splits import FitFn, fit_and_apply
from quantcal.study.cells import QuantCell
from quantcal.study.keys import CLEAN, logits_key, pending_key, row_key
from quantcal.study.score import base_row, recalibrated_clean, score, thresholds
from quantcal.study.stages import data as data_stage
from quantcal.study.stages.base import Need, Stage

if TYPE_CHECKING:  # pragma: no cover
    from quantcal.study.context import Context

__all__ = ["Rows", "error_row", "error_rows"]


def shifts(ctx: Context, cell: QuantCell) -> list[str]:
    """The test sets a cell is scored on: clean, then its ``[data] shifts`` (not for plans)."""
    if cell.precision.startswith("plan:"):
        return [CLEAN]
    return [CLEAN, *ctx.config.shifts]


def _fp32_fit_for(ctx: Context, fp32_key: str) -> FitFn:
    """The fp32 cell's recalibrator fits, each fitted once per group (every quantized
    cell's paired difference vs fp32 and ``temperature_fp32`` reuse them)."""
    fits = ctx.memo("fp32_fits")

    def fit(method: str, fp32: dict) -> tuple[Any, float | None]:
        key = (fp32_key, method)
        if key not in fits:
            if len(fits) > 64:
                fits.clear()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                result = fit_and_apply(method, fp32, fp32)
            fits[key] = (result, [str(w.message) for w in caught])
        result, messages = fits[key]
        for message in messages:  # each caller records the fit's warnings, cached or not
            warnings.warn(message, RuntimeWarning, stacklevel=2)
        return result

    return fit


def error_row(
    ctx: Context,
    cell: QuantCell,
    method: str,
    key: str,
    exc: BaseException,
    shift: str = CLEAN,
) -> dict:
    """Record a failed (cell, method): in ``cache/errors`` for assembly and retry, and in
    ``ctx.failures`` (kept even when the disk refuses the record, e.g. when it is full)."""
    row = base_row(ctx.config, cell, method)
    row.update(status="error", error=f"{type(exc).__name__}: {exc}", row_id=key, shift=shift)
    ctx.failures.append(row)
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        ctx.store.write_json(ctx.cache / "errors" / f"{key}.json", row)
        atomic_write_text(ctx.cache / "errors" / f"{key}.log", tb)
    except OSError as write_exc:
        ctx.say(f"error  cannot record the failure in {ctx.cache / 'errors'}: {write_exc}")
    return row


def error_rows(ctx: Context, cells: list[QuantCell], exc: BaseException) -> None:
    """Error rows for every method of cells whose logits never came to exist."""
    for cell in cells:
        for shift in shifts(ctx, cell):
            for m in ctx.config.recal:
                error_row(ctx, cell, m, pending_key(cell, m, shift), exc, shift)
    what = "every cell" if len(cells) > 1 else f"{cells[0].precision}"
    ctx.say(f"error  {cells[0].group.label} ({what}): {type(exc).__name__}: {exc}")


def row(
    ctx: Context,
    cell: QuantCell,
    method: str,
    lg: dict,
    lmeta: dict,
    lkey: str,
    fp32: dict,
    fp32_key: str,
    fp32_meta: dict | None = None,
    shift: str = CLEAN,
    clean: tuple[dict, dict] | None = None,
) -> dict[str, Any]:
    """The cached or newly scored row of (cell, method) on test or its ``shift``ed copy (then
    ``lg`` and ``fp32`` hold the shifted test logits, ``clean`` the clean ones)."""
    fit_on, fit_notes = data_stage.recal_fit(ctx, cell.group)
    key = row_key(ctx.config, lkey, fp32_key, method, fit_on, shift)
    path = ctx.cache / "rows" / f"{key}.json"
    hit = ctx.store.read_json(path, ("row_id", "status"))
    if hit is not None:
        return hit
    notes: list[str] = []
    for n in (
        *data_stage.splits(ctx, cell.group).notes,
        *(fp32_meta or {}).get("notes", []),  # the model's: they hold for every cell
        *lmeta.get("notes", []),
        *fit_notes,
        *ctx.isa_notes,
    ):
        if n not in notes:
            notes.append(n)
    ctx.scored += 1
    fp32_fit = _fp32_fit_for(ctx, fp32_key if shift == CLEAN else f"{fp32_key} {shift}")
    report_on = data_stage.report_fold(ctx, cell, lg["test_labels"])
    clean_z = None
    if clean is not None and not cell.is_fp32:
        memo = ctx.memo("recalibrated_clean")
        if (lkey, method) not in memo:
            if len(memo) > 16:
                memo.clear()
            memo[(lkey, method)] = recalibrated_clean(method, *clean, fit_on, cell.group.seed)
        clean_z = memo[(lkey, method)]
    pair = None
    if fit_on == "val" and report_on is None:
        memo = ctx.memo("thresholds")
        if (lkey, method) not in memo:
            memo[(lkey, method)] = thresholds(method, lg, fp32, ctx.config.target_risk)
        pair = memo[(lkey, method)]
    r = score(
        ctx.config, cell, method, lg, fp32, fp32_fit, notes, fit_on, report_on, shift, clean_z, pair
    )
    r.update(
        params=lmeta.get("params"),
        macs=lmeta.get("macs"),
        weight_bytes=lmeta.get("weight_bytes"),
        bops=lmeta.get("bops"),
        quantized_layers=lmeta.get("quantized_layers"),
        row_id=key,
    )
    ctx.store.write_json(path, r)
    err = ctx.cache / "errors" / f"{key}.json"
    if err.exists():
        err.unlink()
    return r


class Rows(Stage):
    """The cell's rows, one per ``[recal] methods`` entry (a failed one as an error row)."""

    name: ClassVar[str] = "rows"
    reads: ClassVar[tuple[str, ...]] = ("logits", "shift_logits")
    eager: ClassVar[bool] = True
    cache: ClassVar[str | None] = "rows"

    def entries(self, ctx: Context, item: QuantCell) -> list[tuple[str, str, str]]:
        """(shift, recalibration method, row key) of every row of the cell, in order."""
        g = item.group
        tkey = ctx.train_key(g)
        lkey = logits_key(ctx.config, item, tkey)
        fp32_key = logits_key(ctx.config, QuantCell(g, "fp32", None, None), tkey)
        fit_on = data_stage.recal_fit(ctx, g)[0]
        return [
            (s, m, row_key(ctx.config, lkey, fp32_key, m, fit_on, s))
            for s in shifts(ctx, item)
            for m in ctx.config.recal
        ]

    def keys(self, ctx: Context, item: QuantCell) -> list[str]:
        return [key for _, _, key in self.entries(ctx, item)]

    def run(self, ctx: Context, item: QuantCell, need: Need) -> Any:
        cell, g = item, item.group
        lg, lmeta, lkey = need("logits")
        fp32_cell = QuantCell(g, "fp32", None, None)
        fp32, fp32_meta, fp32_key = need("logits", fp32_cell)
        t0, scored = time.perf_counter(), ctx.scored
        out = []
        shifted: dict[str, tuple[dict, dict]] = {}
        for s, m, rk in self.entries(ctx, cell):
            try:
                if s == CLEAN:
                    args, clean = (lg, fp32), None
                else:
                    if s not in shifted:
                        q_s = need("shift_logits")[s]
                        f_s = need("shift_logits", fp32_cell)[s]
                        q = {**lg, "test_logits": q_s}
                        shifted[s] = (q, q) if cell.is_fp32 else (q, {**fp32, "test_logits": f_s})
                    args, clean = shifted[s], (lg, fp32)
                out.append(
                    row(ctx, cell, m, args[0], lmeta, lkey, args[1], fp32_key, fp32_meta, s, clean)
                )
            except Exception as exc:
                out.append(error_row(ctx, cell, m, rk, exc, s))
                where = "" if s == CLEAN else f" {s}"
                ctx.say(
                    f"error  {g.label} {cell.precision}{where} {m}: {type(exc).__name__}: {exc}"
                )
        if ctx.scored > scored:
            ctx.say(
                f"score  {g.label}  {cell.precision}{cell.where}: {ctx.scored - scored} rows "
                f"recalibrated and measured ({time.perf_counter() - t0:.1f} s)"
            )
        return out
