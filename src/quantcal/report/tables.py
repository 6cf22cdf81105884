"""The run's summary table as data, and as text for a paper or a wiki: Markdown, LaTeX, JSON.

:func:`summary_records` turns the rows of ``results.csv`` (as :func:`quantcal.report.load_rows`
reads them) into one record per cell of the main table: the cells ``report.html`` and the
terminal table show (the first range estimator and range-calibration sample; fp32 rows have
neither), every recalibration method, every seed. Numbers are kept exactly as results.csv holds
them: fractions in [0, 1], full precision. :func:`to_markdown` and :func:`to_latex` print them in
percent (one decimal; the difference vs fp32 in points, two decimals, as the report does) with
their intervals as ``12.3 [11.0, 13.6]``; :func:`to_json` writes them unrounded.

Everything here is a pure function of its arguments, except :func:`run_info`, which reads a run
folder's ``config.toml`` for the header of the JSON output.

    quantcal report runs/demo --format md      # the same, on the command line
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path, PurePath
from typing import Any

from quantcal.findings.rows import dataset_label as _ds_label
from quantcal.findings.rows import groups as _groups
from quantcal.findings.rows import main_rows as _main_rows
from quantcal.findings.rows import model_label as _model_label
from quantcal.findings.rows import prec_key as _prec_key

__all__ = [
    "COLUMNS",
    "FORMATS",
    "display_columns",
    "latex_escape",
    "render",
    "run_info",
    "short_models",
    "summary_records",
    "to_json",
    "to_latex",
    "to_markdown",
]

#: The keys of every record, in order. ``model`` is ``arch@width`` (a ``path/file.py:factory``
#: arch as :func:`short_models` shortens it); ``objective`` is the training
#: objective (``ce`` where results.csv has none); ``notes`` is True when the row has a note (its
#: text is in the notes column of results.csv). The interval columns (``_lo``, ``_hi``) are the
#: run's bootstrap intervals; ``ece_diff_vs_fp32`` is the paired-bootstrap ECE difference vs the
#: same model at fp32 with the same recalibration.
COLUMNS = (
    "dataset",
    "model",
    "objective",
    "seed",
    "precision",
    "recal",
    "recal_fit",
    "accuracy",
    "accuracy_lo",
    "accuracy_hi",
    "ece",
    "ece_lo",
    "ece_hi",
    "debiased_ece",
    "nll",
    "temperature",
    "ece_diff_vs_fp32",
    "ece_diff_vs_fp32_lo",
    "ece_diff_vs_fp32_hi",
    "n_test",
    "notes",
)

#: The text formats of ``quantcal report --format``.
FORMATS = ("md", "json", "latex")

_TEXT = ("dataset", "model", "objective", "precision", "recal", "recal_fit")
_FLOAT = tuple(c for c in COLUMNS if c not in (*_TEXT, "seed", "n_test", "notes"))
_MISSING = "–"  # an en dash, as report.html shows a number that does not exist


# ---------------------------------------------------------------------------------------------
# Model labels
# ---------------------------------------------------------------------------------------------
def _file_factory(arch: str) -> tuple[tuple[str, ...], str] | None:
    """``(path parts, function)`` of a ``path/to/file.py:function`` arch, else None."""
    mod, sep, fn = arch.rpartition(":")
    if sep and fn and mod.endswith(".py"):
        return PurePath(mod).parts, fn
    return None


def short_models(archs: Iterable[str]) -> dict[str, str]:
    """A short display name for each arch: ``/abs/path/to/file.py:factory`` becomes
    ``file.py:factory``, with as many parent folders as it takes to tell apart two archs that
    would otherwise read alike (``a/nets.py:build``, ``b/nets.py:build``); every other arch (a
    registry name, ``module:function``) is kept. The full path stays in config.toml and
    details.json; tables and the report show these names."""
    archs = list(dict.fromkeys(archs))
    split = {a: _file_factory(a) for a in archs}
    files = [a for a in archs if split[a]]
    depth = dict.fromkeys(files, 1)

    def label(a: str) -> str:
        parts, fn = split[a]  # type: ignore[misc]
        return f"{PurePath(*parts[-depth[a] :])}:{fn}"

    while True:
        labels = {a: label(a) for a in files}
        taken = Counter([*labels.values(), *(a for a in archs if not split[a])])
        clash = [a for a in files if taken[labels[a]] > 1 and depth[a] < len(split[a][0])]
        if not clash:
            break
        for a in clash:
            depth[a] += 1
    return {a: labels.get(a, a) for a in archs}


# ---------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------
def _int(v: Any) -> int | None:
    """A count or seed read as float by load_rows (``0.0``), as an int; None stays None."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return None
    return int(v) if float(v).is_integer() else v


def _float(v: Any) -> float | None:
    return None if v is None else float(v)


def summary_records(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record (a dict with the keys of :data:`COLUMNS`) per cell of the main table.

    ``rows`` are results.csv's rows as :func:`quantcal.report.load_rows` returns them. The main
    table holds the successful rows of the first range estimator and the first range-calibration
    sample (fp32 rows have neither), as report.html's and the terminal's tables do. Records come
    grouped by dataset and model (in the order of results.csv), then by precision (fp32 first,
    then falling bit widths), recalibration method (the study's order) and seed. Floats are the
    values of results.csv unrounded; an empty cell is None.
    """
    main = _main_rows(list(rows))
    short = short_models(r["arch"] for r in main)
    recal_order = {m: i for i, m in enumerate(dict.fromkeys(r["recal"] for r in main))}
    by_group: dict[tuple[str, str], list[dict]] = {g: [] for g in _groups(main)}
    for r in main:
        by_group[(r["dataset"], _model_label(r))].append(r)
    records = []
    for group in by_group.values():
        group.sort(
            key=lambda r: (_prec_key(r["precision"]), recal_order[r["recal"]], r.get("seed") or 0)
        )
        for r in group:
            rec: dict[str, Any] = {
                "dataset": r["dataset"],
                "model": f"{short[r['arch']]}@{r['width']:g}",
                "objective": r.get("objective") or "ce",
                "seed": _int(r.get("seed")),
                "precision": r["precision"],
                "recal": r["recal"],
                "recal_fit": r.get("recal_fit") or "",
            }
            for c in _FLOAT:
                rec[c] = _float(r.get(c))
            rec["n_test"] = _int(r.get("n_test"))
            rec["notes"] = bool(str(r.get("notes") or "").strip())
            records.append(rec)
    return records


# ---------------------------------------------------------------------------------------------
# Cells as text
# ---------------------------------------------------------------------------------------------
def _finite(x: Any) -> bool:
    return x is not None and math.isfinite(x)


def _pct(x: float | None, digits: int) -> str:
    return f"{100 * x:.{digits}f}" if _finite(x) else _MISSING


def _interval(rec: dict, key: str, digits: int) -> str:
    """``"12.3 [11.0, 13.6]"`` in percent; the estimate alone where there is no interval."""
    value, lo, hi = rec.get(key), rec.get(f"{key}_lo"), rec.get(f"{key}_hi")
    if not _finite(value):
        return _MISSING
    if not (_finite(lo) and _finite(hi)):
        return _pct(value, digits)
    return f"{_pct(value, digits)} [{_pct(lo, digits)}, {_pct(hi, digits)}]"


def _plain(fmt: str) -> Callable[[dict, str], str]:
    return lambda rec, key: format(rec[key], fmt) if _finite(rec.get(key)) else _MISSING


def _text(rec: dict, key: str) -> str:
    return str(rec.get(key) or "")


def _fit(rec: dict, key: str) -> str:
    # Without recalibration nothing was fitted: the column's value there is the run's setting.
    return _MISSING if rec.get("recal") == "none" else _text(rec, key)


def _count(rec: dict, key: str) -> str:
    return _MISSING if rec.get(key) is None else str(rec[key])


def _ci_label(level: float | None) -> str:
    return "CI" if level is None else f"{100 * level:g}% CI"


class _Col:
    """A printed column: the record key, its Markdown and LaTeX headings, its cell text."""

    def __init__(self, key: str, md: str, tex: str, cell: Callable[[dict, str], str], num: bool):
        self.key, self.md, self.tex, self.cell, self.num = key, md, tex, cell, num


def _columns(level: float | None) -> list[_Col]:
    ci = _ci_label(level)
    tci = ci.replace("%", r"\%")
    return [
        _Col("dataset", "dataset", "dataset", lambda r, k: _ds_label(_text(r, k)), False),
        _Col("model", "model", "model", _text, False),
        _Col("objective", "objective", "objective", _text, False),
        _Col("seed", "seed", "seed", _count, True),
        _Col("precision", "precision", "precision", _text, False),
        _Col("recal", "recal", "recal", _text, False),
        _Col("recal_fit", "fit on", "fit on", _fit, False),
        _Col(
            "accuracy",
            f"accuracy % [{ci}]",
            rf"accuracy (\%) [{tci}]",
            lambda r, k: _interval(r, k, 1),
            True,
        ),
        _Col("ece", f"ECE % [{ci}]", rf"ECE (\%) [{tci}]", lambda r, k: _interval(r, k, 1), True),
        _Col(
            "debiased_ece",
            "debiased ECE %",
            r"debiased ECE (\%)",
            lambda r, k: _pct(r.get(k), 1),
            True,
        ),
        _Col("nll", "NLL", "NLL", _plain(".3f"), True),
        _Col("temperature", "T", "$T$", _plain(".3g"), True),
        _Col(
            "ece_diff_vs_fp32",
            f"ΔECE vs fp32 (points) [{ci}]",
            rf"$\Delta$ECE vs fp32 (points) [{tci}]",
            lambda r, k: _interval(r, k, 2),
            True,
        ),
        _Col("n_test", "n test", r"$n_\mathrm{test}$", _count, True),
        _Col("notes", "notes", "notes", lambda r, k: "yes" if r.get(k) else "", False),
    ]


def display_columns(records: Sequence[dict[str, Any]]) -> list[str]:
    """The record keys :func:`to_markdown` and :func:`to_latex` print, one per table column.

    Interval keys (``_lo``, ``_hi``) are printed inside their estimate's cell. ``objective`` is
    left out when every record's is ``ce``, and ``seed`` when the records have a single seed.
    """
    keys = [c.key for c in _columns(None)]
    if all((r.get("objective") or "ce") == "ce" for r in records):
        keys.remove("objective")
    if len({r.get("seed") for r in records}) <= 1:
        keys.remove("seed")
    return keys


def _table(records: Sequence[dict], level: float | None) -> tuple[list[_Col], list[list[str]]]:
    keep = display_columns(records)
    cols = [c for c in _columns(level) if c.key in keep]
    return cols, [[c.cell(rec, c.key) for c in cols] for rec in records]


# ---------------------------------------------------------------------------------------------
# Formats
# ---------------------------------------------------------------------------------------------
def _md_escape(s: str) -> str:
    return " ".join(s.split()).replace("\\", "\\\\").replace("|", "\\|")


def to_markdown(records: Sequence[dict[str, Any]], *, level: float | None = None) -> str:
    """A GitHub-flavoured Markdown table: one line per record, numbers in percent.

    ``level`` (e.g. 0.95, the run's ``[metrics] level``) labels the intervals; without it the
    headings say "CI".
    """
    cols, body = _table(records, level)
    lines = [
        "| " + " | ".join(_md_escape(c.md) for c in cols) + " |",
        "|" + "|".join("---:" if c.num else "---" for c in cols) + "|",
    ]
    lines += ["| " + " | ".join(_md_escape(cell) for cell in row) + " |" for row in body]
    return "\n".join(lines) + "\n"


_TEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "–": "--",
}


def latex_escape(s: str) -> str:
    """``s`` as LaTeX text: ``\\ & % $ # _ { } ~ ^`` escaped, whitespace runs made one space."""
    return "".join(_TEX_SPECIAL.get(ch, ch) for ch in " ".join(s.split()))


def _tex_number(s: str) -> str:
    """A numeric cell: a true minus sign, ``--`` for a missing number."""
    return s.replace("-", "$-$").replace(_MISSING, "--")


def to_latex(records: Sequence[dict[str, Any]], *, level: float | None = None) -> str:
    """A booktabs ``tabular`` (``\\usepackage{booktabs}``): one ``\\\\``-ended line per record.

    Text is escaped; numbers are in percent as in :func:`to_markdown`, negative ones with a
    math minus, a missing one as ``--``.
    """
    cols, body = _table(records, level)
    spec = "".join("r" if c.num else "l" for c in cols)
    lines = [
        r"% quantcal summary table; needs \usepackage{booktabs}",
        rf"\begin{{tabular}}{{{spec}}}",
        r"\toprule",
        " & ".join(c.tex for c in cols) + r" \\",
        r"\midrule",
    ]
    for row in body:
        cells = [_tex_number(x) if c.num else latex_escape(x) for c, x in zip(cols, row)]
        if cells and cells[0].startswith("["):  # `\\ [` would read as `\\[length]`
            cells[0] = "{}" + cells[0]
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def _json_value(v: Any) -> Any:
    # JSON has no NaN or infinity: such a number is written as null.
    return None if isinstance(v, float) and not math.isfinite(v) else v


def to_json(
    records: Sequence[dict[str, Any]],
    *,
    run: str | None = None,
    study: str | None = None,
    level: float | None = None,
    version: str | None = None,
) -> str:
    """The records unrounded (floats as Python's shortest repr: they read back exactly), under
    a header: the quantcal version, the run and study names, the interval level, the columns."""
    if version is None:
        from quantcal import __version__ as version
    doc = {
        "quantcal": version,
        "run": run,
        "study": study,
        "table": "summary",
        "level": level,
        "units": "accuracy, ece, debiased_ece and ece_diff_vs_fp32 (and their _lo/_hi interval "
        "bounds) are fractions as in results.csv, not percent; nll in nats per image",
        "columns": list(COLUMNS),
        "records": [{k: _json_value(rec.get(k)) for k in COLUMNS} for rec in records],
    }
    return json.dumps(doc, indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def run_info(run_dir: str | Path) -> dict[str, Any]:
    """``run`` (the folder's name), ``study`` and ``level`` (from its config.toml, None where it
    has none or it does not parse): the header of :func:`to_json` and the interval labels."""
    from quantcal._toml import loads

    run = Path(run_dir)
    info: dict[str, Any] = {"run": run.resolve().name, "study": None, "level": None}
    try:
        cfg = loads((run / "config.toml").read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return info
    name = cfg.get("name")
    level = (cfg.get("metrics") or {}).get("level")
    info["study"] = name if isinstance(name, str) else None
    info["level"] = float(level) if isinstance(level, (int, float)) else None
    return info


def render(records: Sequence[dict[str, Any]], fmt: str, **info: Any) -> str:
    """``records`` in one of :data:`FORMATS`; ``info`` as :func:`run_info` returns it."""
    level = info.get("level")
    if fmt == "md":
        return to_markdown(records, level=level)
    if fmt == "latex":
        return to_latex(records, level=level)
    if fmt == "json":
        return to_json(records, run=info.get("run"), study=info.get("study"), level=level)
    raise ValueError(f"unknown table format {fmt!r}: choose from {', '.join(FORMATS)}")
