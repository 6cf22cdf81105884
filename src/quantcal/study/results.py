"""The results of a run: its rows collected from the cache (``results.csv``) and the skeleton of
``details.json`` (each row's reliability bins)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from quantcal._io import atomic_write_text
from quantcal.findings.rows import RESULT_COLUMNS
from quantcal.study.keys import logits_key, pending_key, row_key

if TYPE_CHECKING:  # pragma: no cover
    from quantcal.study.context import Context

__all__ = ["collect_rows", "reliability_details", "write_csv"]


def collect_rows(ctx: Context, plan) -> tuple[list[dict], int]:
    """Rows for every (cell, method) of the plan from the cache; returns (rows, missing)."""
    cfg = ctx.config
    rows, missing = [], 0
    for g, cells in plan:
        tkey = ctx.train_key(g)
        fp32_key = logits_key(cfg, cells[0], tkey)
        for cell in cells:
            lkey = logits_key(cfg, cell, tkey)
            for m in cfg.recal:
                rk = row_key(cfg, lkey, fp32_key, m, ctx.recal_fit(g)[0])
                found = None
                for path in (
                    ctx.cache / "rows" / f"{rk}.json",
                    ctx.cache / "errors" / f"{rk}.json",
                    ctx.cache / "errors" / f"{pending_key(cell, m)}.json",
                ):
                    found = ctx.store.read_json(path, ("row_id", "status"))
                    if found is not None:
                        break
                if found is None:
                    missing += 1
                else:
                    rows.append(found)
    return rows, missing


def write_csv(out_dir: Path, rows: list[dict]) -> Path:
    """``out_dir/results.csv``: one line per row, the columns of :data:`RESULT_COLUMNS`."""
    import csv
    import io

    buf = io.StringIO()
    w = csv.DictWriter(
        buf, fieldnames=list(RESULT_COLUMNS), extrasaction="ignore", lineterminator="\n"
    )
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in RESULT_COLUMNS})
    return atomic_write_text(out_dir / "results.csv", buf.getvalue())


def reliability_details(rows: list[dict]) -> dict[str, Any]:
    """The ``details.json`` skeleton with each row's reliability bins by row id."""
    details: dict[str, Any] = {"reliability": {}, "inspect": [], "training": []}
    for r in rows:
        if r.get("reliability"):
            details["reliability"][r["row_id"]] = r["reliability"]
    return details
