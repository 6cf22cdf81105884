"""The claim type and the registry: :class:`Claim`, ``CLAIMS``, :func:`register_claim` and
:func:`evaluate`.

A claim is a function over the rows of ``results.csv`` (and, when it takes a second argument, the
study's ``details.json``) that returns a :class:`Claim`; ``@register_claim`` appends it to
``CLAIMS``, the report order. The built-in claims live in the sibling modules
(:mod:`quantcal.findings.claims.paper`, :mod:`~quantcal.findings.claims.extras`,
:mod:`~quantcal.findings.claims.details`); :mod:`quantcal.findings.claims` imports them in report
order, so import claims from there.

A new claim: copy a function of :mod:`~quantcal.findings.claims.paper` (rows only) or
:mod:`~quantcal.findings.claims.details` (rows and ``details.json``) into a module of its theme,
keep ``@register_claim`` on it, and import that module in :mod:`quantcal.findings.claims` where
it should appear in the report (the order of those imports is the order of ``CLAIMS``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["CLAIMS", "Claim", "ClaimFn", "evaluate", "register_claim"]


@dataclass(frozen=True)
class Claim:
    """A claim judged on one study's numbers.

    ``verdict`` is ``supported``, ``contradicted``, ``undecided`` (with the reason), ``mixed:
    ...`` (a count per verdict over models), ``see the numbers`` (a measurement, not a test) or
    ``not tested`` (``tested`` False; ``evidence`` then says what the study would need).
    ``rows``: the numbers behind it, one dict per model and precision with ``quantity``,
    ``value``, ``lo``, ``hi`` and ``n_seeds``.
    """

    key: str
    statement: str
    verdict: str
    evidence: tuple[str, ...] = ()
    rows: tuple[dict[str, Any], ...] = ()
    source: str = "quantcal"
    tested: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """``{"claim", "verdict", "evidence", "key", "source", "tested", "rows"}``."""
        return {
            "claim": self.statement,
            "verdict": self.verdict,
            "evidence": list(self.evidence),
            "key": self.key,
            "source": self.source,
            "tested": self.tested,
            "rows": [dict(r) for r in self.rows],
        }


#: ``fn(rows)``, or ``fn(rows, details)`` for a claim judged on ``details.json`` as well (the
#: ablation's paired contrasts, the per-layer attribution); ``rows`` are the clean-test rows,
#: and a claim with a keyword-only ``shifted`` parameter also gets the rows scored on corrupted
#: test copies (``[data] shifts``).
ClaimFn = Callable[..., Claim]
#: The registered claims, in report order.
CLAIMS: list[ClaimFn] = []


def register_claim(fn: ClaimFn) -> ClaimFn:
    """Add a claim function to ``CLAIMS`` (a decorator)."""
    CLAIMS.append(fn)
    return fn


def evaluate(rows: list[dict], details: dict[str, Any] | None = None) -> list[Claim]:
    """Every registered claim on the rows (and ``details``, for those that read it), in
    order."""
    import inspect

    from quantcal.findings.rows import clean_rows, shifted_rows

    clean, shifted = clean_rows(rows), shifted_rows(rows)
    out = []
    for fn in CLAIMS:
        params = inspect.signature(fn).parameters
        positional = [p for p in params.values() if p.kind is not p.KEYWORD_ONLY]
        args = (clean, details or {}) if len(positional) > 1 else (clean,)
        kwargs = {"shifted": shifted} if "shifted" in params else {}
        out.append(fn(*args, **kwargs))
    return out
