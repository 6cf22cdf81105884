"""What the sub-commands share: common options, the exit-status texts, refusing options that do
not apply, and printing notes and failures.

Every command is two steps: ``resolve(args) -> request`` checks every value (files, names,
numbers, options that do not apply to the chosen path) and does no work, then
``execute(request) -> exit status`` computes. A bad value raises ``ValueError`` (or
``FileNotFoundError``) in the first step, which :func:`quantcal.cli.main` turns into exit
status 2 with one line on stderr, before anything is computed or written.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EXIT_STUDY = """exit status:
  0    every cell computed (a shard: every cell of this shard)
  1    some cells failed: they are error rows in results.csv, grouped by cause on stderr,
       with tracebacks in OUT/cache/errors/*.log; everything else was computed and written
  2    bad input (study file, option, dataset, model factory, checkpoint, output folder):
       nothing was computed
  130  interrupted: finished stages are cached, re-run the same command to resume

Results and tables go to stdout; progress, notes and errors to stderr (one plain line per
epoch and stage when stderr is not a terminal)."""

EXIT_SIMPLE = """exit status:
  0    done
  1    a file could not be written or read (disk full, permission): fix it and re-run
  2    bad input (an option, a file, a folder): nothing was computed or written
  130  interrupted"""


@dataclass(frozen=True)
class Common:
    """The options every computing command takes."""

    device: str = "auto"
    quiet: bool = False
    threads: int | None = None


def add_force(
    p: argparse.ArgumentParser, what: str = "results.csv, report.html, config.toml, ..."
) -> None:
    p.add_argument(
        "--force",
        action="store_true",
        help="write into an --out folder that quantcal did not make, or that holds another "
        f"study or evaluation (it then replaces {what} there)",
    )


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or auto (default: auto)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or stage messages")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for PyTorch; for run and eval this overrides the study's pinned "
        "`threads` and enters the cache keys (default: the study's, else PyTorch's choice; "
        "1 is fastest on a busy machine)",
    )


def common(args: argparse.Namespace) -> Common:
    threads = getattr(args, "threads", None)
    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    return Common(args.device or "auto", bool(args.quiet), threads)


def parse_set(items: Sequence[str], option: str = "--set") -> dict[str, Any]:
    """``KEY=VALUE`` items as a dict, each value parsed as TOML (a bare word as a string)."""
    from quantcal._toml import parse_value

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{option} expects KEY=VALUE (e.g. train.epochs=5), got {item!r}")
        out[key.strip()] = parse_value(value.strip())
    return out


def split_list(text: str) -> list[str]:
    return [x.strip() for x in str(text).split(",") if x.strip()]


def refuse(given: Mapping[str, bool], why: str) -> None:
    """Raise a ValueError naming each option of ``given`` (option -> whether the user gave it)
    that was given, with ``why`` it does not apply; nothing when none was."""
    bad = [opt for opt, on in given.items() if on]
    if bad:
        names = ", ".join(bad)
        verb = "does" if len(bad) == 1 else "do"
        raise ValueError(f"{names} {verb} not apply here: {why}. Leave {names} out")


def absolute_factory(arch: str) -> str:
    """``path/file.py:fn`` with an absolute path (the run folder may be read from elsewhere)."""
    mod, sep, fn = arch.rpartition(":")
    if sep and mod.endswith(".py"):
        return f"{Path(mod).expanduser().resolve()}:{fn}"
    return arch


# ---------------------------------------------------------------------------------------------
def _cell_label(r: dict) -> str:
    n = lambda v: f"{float(v):g}"  # noqa: E731 - numeric columns arrive as float or str
    where = "" if r.get("observer") in (None, "-") else f" {r['observer']} #{n(r['ptq_sample'])}"
    if (r.get("method") or "-") not in ("-", "ptq"):
        where += f" {r['method']}"
    obj = "" if (r.get("objective") or "ce") == "ce" else f" {r['objective']}"
    return (
        f"{r['dataset']} {r['arch']}@{n(r['width'])}{obj} seed {n(r['seed'])} "
        f"{r['precision']}{where}"
    )


def report_notes(rows: list[dict]) -> None:
    """Each distinct note of the rows once on stderr, with how many rows it concerns."""
    counts: dict[str, int] = {}
    for r in rows:
        for note in filter(None, (x.strip() for x in str(r.get("notes") or "").split(" | "))):
            counts[note] = counts.get(note, 0) + 1
    for note, k in counts.items():
        print(f"note: {k} rows: {note}", file=sys.stderr)


def report_failures(failed: list[dict], out: Path, total: int | None = None) -> int:
    """Print failed rows on stderr grouped by cause ("12 cells: ..."); returns the exit status
    (1 when any failed, else 0)."""
    if not failed:
        return 0
    by_cause: dict[str, list[dict]] = {}
    for r in failed:
        by_cause.setdefault(str(r.get("error") or "unknown error"), []).append(r)
    of = f" of {total}" if total else ""
    cells = {_cell_label(r) for r in failed}
    print(
        f"quantcal: {len(failed)}{of} result rows failed ({len(cells)} cells), by cause:",
        file=sys.stderr,
    )
    for cause, rows in sorted(by_cause.items(), key=lambda kv: -len(kv[1])):
        labels = sorted({_cell_label(r) for r in rows})
        shown = "; ".join(labels[:3]) + (f"; and {len(labels) - 3} more" if len(labels) > 3 else "")
        print(f"  {len(labels)} cells: {cause}\n      ({shown})", file=sys.stderr)
    print(
        f"  error rows are in {out / 'results.csv'} (status, error); tracebacks in "
        f"{out / 'cache' / 'errors'}/*.log. Re-running retries them.",
        file=sys.stderr,
    )
    return 1


def report_failed_attributions(failed: list[dict]) -> int:
    """Name each failed per-layer attribution on stderr; 1 when there is any, else 0."""
    for r in failed:
        print(
            f"quantcal: the {r.get('what', 'attribution')} of {r['dataset']} / "
            f"{r['arch']}@{float(r['width']):g} {r['precision']}"
            + (f" on {r['ood_set']}" if r.get("ood_set") else "")
            + f" failed: {r['error']} (re-running retries it)",
            file=sys.stderr,
        )
    return 1 if failed else 0


def finish(out: Path, t0: float, quiet: bool) -> int:
    """Print the summary table, notes and failures of a finished run; its exit status."""
    from quantcal.report import html as report
    from quantcal.study import runner as study

    if not (out / "results.csv").exists():
        print(f"partial run in {out}: other shards still have cells to compute")
        return report_failures(study.failed_rows(out), out)
    from quantcal.findings.rows import clean_rows

    every = report.load_rows(out, shifted=True)
    rows = clean_rows(every)
    if not quiet:
        from quantcal.findings.verdicts import verdict_table

        print()
        print(report.summary_table(rows))
        table = verdict_table(rows, report.run_budget(out))
        if table:
            print()
            print(table)
    print(f"\nreport: {(out / 'report.html').resolve()}  ({time.perf_counter() - t0:.0f} s)")
    report_notes(rows)
    code = report_failures([r for r in every if r.get("status") != "ok"], out, len(every))
    return report_failed_attributions(study.failed_attributions(out)) or code
