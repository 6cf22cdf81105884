"""The pieces claim functions build their verdicts and evidence from: the verdict of an
interval, one verdict for several models, a row of numbers, the seed count and the precisions
of a set of rows in plan order."""

from __future__ import annotations

from typing import Any

from quantcal.findings.rows import Estimate, prec_key

__all__ = ["interval_verdict", "number", "precisions", "seeds", "summarise"]


def interval_verdict(e: Estimate, positive: str, negative: str) -> str:
    """``positive`` when the interval lies above 0, ``negative`` below, else undecided."""
    if not e.decided:
        return "undecided (no interval)"
    if e.lo > 0:
        return positive
    if e.hi < 0:
        return negative
    return "undecided (interval contains 0)"


def summarise(verdicts: list[str]) -> str:
    """One verdict for several models: the common one, or a count per verdict."""
    if not verdicts:
        return "not tested in this run"
    counts = {v: verdicts.count(v) for v in dict.fromkeys(verdicts)}
    if len(counts) == 1:
        return f"{verdicts[0]} ({len(verdicts)} of {len(verdicts)})"
    return "mixed: " + ", ".join(f"{v} {c} of {len(verdicts)}" for v, c in counts.items())


def number(ds: str, model: str, precision: str, quantity: str, e: Estimate) -> dict[str, Any]:
    """One row of a claim's numbers: where, what, and the estimate with its interval."""
    return {
        "dataset": ds,
        "model": model,
        "precision": precision,
        "quantity": quantity,
        "value": e.value,
        "lo": e.lo,
        "hi": e.hi,
        "n_seeds": e.n_seeds,
    }


def seeds(e: Estimate) -> str:
    """`` (mean of 3 seeds)`` when the estimate combines several seeds, else ``""``."""
    return f" (mean of {e.n_seeds} seeds)" if e.n_seeds > 1 else ""


def precisions(rows: list[dict]) -> list[str]:
    """The rows' precisions in plan order (:func:`quantcal.findings.rows.prec_key`)."""
    return sorted({r["precision"] for r in rows}, key=prec_key)
