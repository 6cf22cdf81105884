"""The report: ``write_report(run_dir)`` writes ``run_dir/report.html`` from a run's results.

One module per section (``verdict``, ``numbers``, ``claims``, ``why``, ``layers``, ``repair``,
``plans``, ``figures``, ``notes``, ``glossary``, ``configuration``), ``labels`` (short model
names), ``markup`` (HTML pieces the sections share), ``tables`` (markdown/LaTeX/JSON tables),
``plots`` (matplotlib figures) and ``html`` (results.csv in, the page out).
"""

from quantcal.report.html import findings, load_rows, summary_table, write_report

__all__ = ["findings", "load_rows", "summary_table", "write_report"]
