"""The report: ``write_report(run_dir)`` writes ``run_dir/report.html`` from a run's results.

``html`` (the page: reads results.csv, lays out the sections), one module per section
(``verdict``, ``numbers``, ``claims``, ``why``, ``layers``, ``repair``, ``plans``, ``notes``,
``configuration``, ``glossary``), shared pieces (``markup``, ``labels``, ``figures``), ``tables``
(markdown/LaTeX/JSON tables for ``quantcal report --format``) and ``plots`` (matplotlib).
Importing this package does no work: its names load from ``html`` on first access, so the
metrics can reach ``report.plots`` without importing the whole report.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = ["findings", "load_rows", "summary_table", "write_report"]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from quantcal.report.html import findings, load_rows, summary_table, write_report


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("quantcal.report.html"), name)
    raise AttributeError(f"module 'quantcal.report' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
