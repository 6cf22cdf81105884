"""The results of a run: its rows collected from the cache (``results.csv``) and the skeleton of
``details.json`` (each row's reliability bins)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from quantcal._io import atomic_write_text
from quantcal.findings.rows import RESULT_COLUMNS
from quantcal.study.keys import pending_key

if TYPE_CHECKING:  # pragma: no cover
    from quantcal.study.context import Context

__all__ = ["collect_rows", "reliability_details", "write_csv"]


def collect_rows(ctx: Context, plan) -> tuple[list[dict], int]:
    """Rows for every (cell, method) of the plan from the cache, under the keys the rows stage
    declares (an error row under the same key, or under the pending key of a cell whose logits
    never came to exist); returns (rows, missing)."""
    from quantcal.study.stages.rows import Rows

    rows_stage = Rows()
    rows, missing = [], 0
    for _g, cells in plan:
        for cell in cells:
            for s, m, rk in rows_stage.entries(ctx, cell):
                found = None
                for path in (
                    ctx.cache / rows_stage.cache / f"{rk}.json",
                    ctx.cache / "errors" / f"{rk}.json",
                    ctx.cache / "errors" / f"{pending_key(cell, m, s)}.json",
                ):
                    found = ctx.store.read_json(path, ("row_id", "status"))
                    if found is not None:
                        break
                if found is None:
                    missing += 1
                else:
                    rows.append(found)
    return rows, missing


def write_csv(
    out_dir: Path,
    rows: list[dict],
    columns: tuple[str, ...] | None = None,
    name: str = "results.csv",
) -> Path:
    """``out_dir/NAME``: one line per row, the ``columns`` (default :data:`RESULT_COLUMNS`)."""
    import csv
    import io

    columns = RESULT_COLUMNS if columns is None else columns
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})
    return atomic_write_text(out_dir / name, buf.getvalue())


def reliability_details(rows: list[dict]) -> dict[str, Any]:
    """The ``details.json`` skeleton with each row's reliability bins by row id."""
    details: dict[str, Any] = {
        "reliability": {},
        "risk_coverage": {},
        "inspect": [],
        "training": [],
    }
    for r in rows:
        for part in ("reliability", "risk_coverage"):
            if r.get(part):
                details[part][r["row_id"]] = r[part]
    return details
