"""The report: ``write_report(run_dir)`` writes ``run_dir/report.html`` from a run's results.

One module per section (``why``, ``layers``, ``repair``, ``plans``, ``figures``, ``glossary``),
``tables`` (markdown/LaTeX/JSON tables), ``plots`` (matplotlib figures) and ``html`` (the page).
"""

from quantcal.report.html import findings, load_rows, summary_table, write_report

__all__ = ["findings", "load_rows", "summary_table", "write_report"]
