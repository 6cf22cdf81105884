"""``quantcal report``: (re)write a run's report, or print its summary table."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantcal.cli._common import add_force, report_failures


@dataclass(frozen=True)
class ReportRequest:
    run_dir: Path
    format: str | None
    force: bool


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "report",
        help="(re)write report.html for a finished run folder, or print its summary table",
        description="Assemble the cached rows of a run (all shards) into "
        "results.csv and write report.html and figures/. With --format, write nothing: print "
        "the run's summary table (one line per model, precision and recalibration method) to "
        "stdout as Markdown, LaTeX or JSON, for a paper or a wiki.",
        epilog="examples:\n"
        "  quantcal report runs/demo                             rewrite report.html\n"
        "  quantcal report runs/demo --format md > table.md      a Markdown table\n"
        "  quantcal report runs/demo --format latex > table.tex  a booktabs tabular\n"
        "  quantcal report runs/demo --format json > table.json  every number unrounded\n\n"
        "RUN_DIR must be a folder quantcal made (run, eval); --force writes report.html and "
        "figures/ into another folder holding a quantcal results.csv.\n\n"
        "exit status: 0 all cells ok, 1 some cells failed (grouped on stderr), 2 the folder is "
        "not a finished run, is not quantcal's, or its table is empty",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run_dir")
    p.add_argument(
        "--format",
        choices=("md", "json", "latex"),
        default=None,
        help="print the summary table to stdout instead of writing report.html: md (a "
        "Markdown table), latex (a booktabs tabular) or json (unrounded, with a header); "
        "md and latex give percent with one decimal (the ECE difference vs fp32: points, two) "
        "and intervals as '12.3 [11.0, 13.6]'. "
        "Reads results.csv only (a sharded run: run `quantcal report RUN_DIR` once first). "
        "Example: quantcal report runs/demo --format latex > table.tex",
    )
    add_force(p, "report.html and figures/")


def resolve(args: argparse.Namespace) -> ReportRequest:
    from quantcal.store import runfolder as _runfolder

    out = Path(args.run_dir)
    if not out.exists():
        raise FileNotFoundError(f"{out} does not exist: give the output folder of a run")
    if not out.is_dir():
        raise ValueError(f"{out} is a file; give the run's output folder")
    if args.format is not None and args.force:
        raise ValueError("--force does not apply with --format: --format writes nothing")
    if not (out / "results.csv").exists() and not (out / "cache").is_dir():
        raise FileNotFoundError(
            f"{out} has neither results.csv nor cache/: it is not a run folder (run `quantcal "
            f"run --out {out}` first)"
        )
    if args.format is None:  # writes report.html and figures/: only into quantcal's folders
        _runfolder.check_owned(out, force=bool(args.force), action="write report.html into")
    if (out / "results.csv").exists():
        from quantcal.report.html import check_results_columns

        check_results_columns(out / "results.csv")
    return ReportRequest(out, args.format, bool(args.force))


def execute(req: ReportRequest) -> int:
    from quantcal.report import html as report
    from quantcal.study import runner as study

    out = req.run_dir
    if req.format is not None:  # print the table; write nothing
        from quantcal.report import tables

        if not (out / "results.csv").exists():
            raise FileNotFoundError(
                f"{out / 'results.csv'} does not exist yet: when every shard has finished, "
                f"`quantcal report {out}` (without --format) assembles it from the cache"
            )
        rows = report.load_rows(out)
        failed = [r for r in rows if r.get("status") != "ok"]
        records = tables.summary_records(rows)
        if not records:
            what = (
                "no result rows"
                if not rows
                else f"no successful cells ({len(failed)} of {len(rows)} rows failed)"
                if failed
                else "no rows of the main table"
            )
            print(
                f"quantcal report: error: {out / 'results.csv'} has {what}: no table to print",
                file=sys.stderr,
            )
            return report_failures(failed, out, len(rows)) or 2
        sys.stdout.write(tables.render(records, req.format, **tables.run_info(out)))
        return report_failures(failed, out, len(rows))
    if (out / "cache").exists():
        study.assemble(out)
    else:
        report.write_report(out)
    rows = report.load_rows(out)
    print(report.summary_table(rows))
    print(f"\nreport: {(out / 'report.html').resolve()}")
    return report_failures([r for r in rows if r.get("status") != "ok"], out, len(rows))
