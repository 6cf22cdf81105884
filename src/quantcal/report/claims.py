"""The report's findings: the registered claims (:mod:`quantcal.findings.claims`) judged on
this run's numbers and intervals, a caveat when the test split is small, and the claims the
study does not test."""

from __future__ import annotations

import math
from typing import Any

from quantcal.findings.rows import main_rows

__all__ = ["findings", "untested_claims"]


def _mean(values: list[float | None]) -> float | None:
    v = [x for x in values if x is not None and not math.isnan(x)]
    return sum(v) / len(v) if v else None


def findings(rows: list[dict], details: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One entry per claim this study tests (``claim``, ``verdict``, ``evidence``, and the
    claim's ``key``, ``source``, ``rows``; see :mod:`quantcal.findings.claims`), then a caveat
    when the test split is small."""
    from quantcal.findings.claims import evaluate

    out = [c.as_dict() for c in evaluate(rows, details) if c.tested]
    n_test = _mean([r.get("n_test") for r in main_rows(rows)]) or 0
    if n_test and n_test < 2000:
        out.append(
            {
                "claim": "Caveat",
                "verdict": "small run",
                "evidence": [
                    f"About {int(n_test)} test images per cell: intervals are wide and "
                    "verdicts of 'undecided' are expected; the study's scale needs "
                    "the paper presets."
                ],
            }
        )
    return out


def untested_claims(
    rows: list[dict], details: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """The registered claims this study does not test, each with what it would need."""
    from quantcal.findings.claims import evaluate

    return [c.as_dict() for c in evaluate(rows, details) if not c.tested]
