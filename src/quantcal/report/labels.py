"""Short display names of the models in a run's rows and details (``/abs/nets.py:build`` ->
``nets.py:build``), the same in both; the files on disk keep the full path."""

from __future__ import annotations

from typing import Any

__all__ = ["short_labels"]


def short_labels(rows: list[dict], details: dict | None = None) -> tuple[list[dict], dict]:
    """Copies of ``rows`` and ``details`` whose ``arch`` is a short display name
    (:func:`quantcal.report.tables.short_models`: ``/abs/nets.py:build`` -> ``nets.py:build``), the
    same in both so that rows and details still match; the files on disk keep the full path."""
    from quantcal.report.tables import short_models

    short = short_models(r["arch"] for r in rows if isinstance(r.get("arch"), str))
    if all(k == v for k, v in short.items()):
        return rows, details or {}

    def walk(x: Any) -> Any:
        if isinstance(x, dict):
            out = {k: walk(v) for k, v in x.items()}
            if isinstance(out.get("arch"), str):
                out["arch"] = short.get(out["arch"], out["arch"])
            return out
        if isinstance(x, list) and x and isinstance(x[0], (dict, list)):
            return [walk(v) for v in x]
        return x

    return [walk(r) for r in rows], walk(details or {})
