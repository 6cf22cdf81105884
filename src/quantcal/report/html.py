"""Figures, tables, findings and a self-contained ``report.html`` from a study's output folder.

Inputs (all written by :func:`quantcal.study.run_study`): ``results.csv``, ``details.json``
(reliability bins, per-layer quantization data, training curves), ``config.toml``, ``env.json``.
Figures use matplotlib's object API (no pyplot state, no display needed) and are embedded in the
HTML as base64 PNG, and also written to ``figures/``.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
from pathlib import Path
from typing import Any

from quantcal._io import atomic_write_bytes, atomic_write_text
from quantcal.findings.rows import (
    aggregate,
    dataset_label,
    groups,
    main_rows,
    model_label,
    ok,
    pct,
    pick,
    prec_key,
)
from quantcal.report.figures import (
    fig_acc_vs_ece,
    fig_layers,
    fig_precision,
    fig_recal_gain,
    fig_reliability,
    worst_inspect,
)
from quantcal.report.glossary import PAPER, glossary_section, paper_citation
from quantcal.report.layers import ablation_section, attribution_section
from quantcal.report.plans import plans_section
from quantcal.report.plots import FULL_COUNT
from quantcal.report.repair import repair_section, repair_summary
from quantcal.report.why import why_section

__all__ = ["findings", "load_rows", "summary_table", "write_report"]

_TEXT_COLUMNS = {
    "dataset",
    "arch",
    "objective",
    "precision",
    "observer",
    "method",
    "recal",
    "recal_fit",
    "status",
    "error",
    "notes",
    "quantized_layers",
    "row_id",
}


# ---------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------
def _num(v: str) -> float | None:
    if v in ("", None):
        return None
    try:
        return float(v)
    except ValueError:
        return None


def check_results_columns(path: str | Path) -> None:
    """A ValueError unless ``path`` is a results.csv with the columns quantcal writes (the
    identity of a cell, its recalibrator and status), naming the missing ones."""
    from quantcal.study.runner import RESULT_COLUMNS

    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            header = next(csv.reader(fh), [])
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ValueError(f"{path} cannot be read as a CSV file ({exc})") from None
    need = [*RESULT_COLUMNS[: RESULT_COLUMNS.index("recal") + 1], "status"]
    missing = [c for c in need if c not in header]
    if missing:
        raise ValueError(
            f"{path} is not a results.csv that quantcal wrote: it lacks the columns "
            f"{', '.join(missing)}. Give the folder of a quantcal run (or re-run it)"
        )


def load_rows(run_dir: str | Path) -> list[dict[str, Any]]:
    """results.csv as dicts, numeric columns as float (None where empty)."""
    path = Path(run_dir) / "results.csv"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist: run `quantcal run --out {run_dir}` first (or, for a sharded "
            "run, wait until every shard has finished)"
        )
    check_results_columns(path)
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        for k in r.keys() - _TEXT_COLUMNS:
            r[k] = _num(r[k])
    return rows


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


_prec_key = prec_key
_ok = ok
_main_rows = main_rows
_model_label = model_label
_groups = groups
_pick = pick
_pct = pct


def _mean(values: list[float | None]) -> float | None:
    v = [x for x in values if x is not None and not math.isnan(x)]
    return sum(v) / len(v) if v else None


def _diff(r: dict, key: str) -> str:
    """``"d [lo, hi]"`` in percentage points for a paired-difference column."""
    return f"{_pct(r.get(key), 2)} [{_pct(r.get(f'{key}_lo'), 2)}, {_pct(r.get(f'{key}_hi'), 2)}]"


def _ci(r: dict, key: str) -> str:
    lo, hi = r.get(f"{key}_lo"), r.get(f"{key}_hi")
    if lo is None or hi is None:
        return _pct(r.get(key))
    return f"{_pct(r.get(key))} [{_pct(lo)}, {_pct(hi)}]"


# ---------------------------------------------------------------------------------------------
# Findings: the registered claims (quantcal.findings.claims), judged on this run's numbers and intervals
# ---------------------------------------------------------------------------------------------
def findings(rows: list[dict], details: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One entry per claim this study tests (``claim``, ``verdict``, ``evidence``, and the
    claim's ``key``, ``source``, ``rows``; see :mod:`quantcal.findings.claims`), then a caveat when the
    test split is small."""
    from quantcal.findings.claims import evaluate

    out = [c.as_dict() for c in evaluate(rows, details) if c.tested]
    n_test = _mean([r.get("n_test") for r in _main_rows(rows)]) or 0
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


# ---------------------------------------------------------------------------------------------
# Tables and HTML
# ---------------------------------------------------------------------------------------------
_ds_label = dataset_label


def _temp(rows: list[dict]) -> str:
    """The fitted temperature (the mean over seeds)."""
    ts = [r["temperature"] for r in rows if r.get("temperature") is not None]
    return "–" if not ts else format(sum(ts) / len(ts), ".3g")


def summary_table(rows: list[dict]) -> str:
    """A compact plain-text table of the key numbers, for the terminal."""
    rows = short_labels(rows)[0]
    main = _main_rows(rows)
    mw = max([22, *(len(m) for _, m in _groups(main))])  # the model column fits every label
    pw = max([5, *(len(r["precision"]) for r in main)])  # and the precision column
    header = (
        f"{'dataset':<16} {'model':<{mw}} {'prec':<{pw}} {'acc%':>6} {'ECE%':>6} {'[95% CI]':>14} "
        f"{'+TS':>6} {'fp32T':>6} {'T':>6}"
    )
    lines = [header, "-" * len(header)]
    for ds, model in _groups(main):
        for r in _pick(main, dataset=ds, model=model, recal="none"):
            ts = _pick(main, dataset=ds, model=model, recal="temperature", precision=r["precision"])
            f32 = _pick(
                main, dataset=ds, model=model, recal="temperature_fp32", precision=r["precision"]
            )
            ci = f"[{_pct(r['ece_lo'])},{_pct(r['ece_hi'])}]" if r.get("ece_lo") is not None else ""
            lines.append(
                f"{_ds_label(ds)[:16]:<16} {model:<{mw}} {r['precision']:<{pw}} "
                f"{_pct(r['accuracy']):>6} "
                f"{_pct(r['ece']):>6} {ci:>14} {_pct(ts[0]['ece']) if ts else '–':>6} "
                f"{_pct(f32[0]['ece']) if f32 else '–':>6} "
                f"{_temp(ts):>6}"
            )
    repair = repair_summary(rows)
    if repair:
        lines.append(repair)
    errors = [r for r in rows if r.get("status") != "ok"]
    if errors:
        lines.append(f"{len(errors)} result rows failed; see the 'error' column of results.csv")
    return "\n".join(lines)


def _html_table(headers: list[str], body: list[list[str]], css: str = "") -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    trs = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in body
    )
    cls = f" class='{css}'" if css else ""
    return f"<table{cls}><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"


def _outside(e) -> bool:
    """A point estimate outside its own interval (binned ECE below its bootstrap interval)."""
    return e.decided and not (e.lo <= e.value <= e.hi)


_OUTSIDE_NOTE = (
    "† The binned ECE lies outside its bootstrap interval. ECE is an absolute value per bin, "
    "so the noise a resample adds raises it on average: resampled ECEs sit above the estimate "
    "when the model is well calibrated, and the percentile interval describes them. The "
    "estimate is the number to quote; the interval's width is the uncertainty."
)


def _two_line(e, digits: int = 1, sign: bool = False, mark: str = "") -> str:
    """An estimate as HTML: the number, then its interval on a second, smaller line (and as a
    tooltip), so that the key numbers fit the page."""
    if e.value is None:
        return "–"
    v = f"{100 * e.value:+.{digits}f}" if sign else pct(e.value, digits)
    if not e.decided:
        return html.escape(v + mark)
    ci = f"[{pct(e.lo, digits)}, {pct(e.hi, digits)}]"
    tip = f"{v} {ci} ({e.n_seeds} seed{'s' if e.n_seeds != 1 else ''})"
    return (
        f"<span title='{html.escape(tip)}'>{html.escape(v + mark)}</span>"
        f"<br><span class='ci'>{html.escape(ci)}</span>"
    )


def _count(n: float | None, unit: str) -> str:
    """``327 k``, ``1307 kB``; a count under a thousand exactly (a tiny model is not ``0 k``)."""
    if n is None:
        return "–"
    return f"{n / 1e3:.0f} k{unit}" if n >= 1e3 else f"{n:.0f} {unit}".rstrip()


def _key_table(rows: list[dict]) -> str:
    """One line per model and precision (seeds aggregated), raw and after temperature
    scaling; each number with its interval beneath it."""
    main = _main_rows(rows)
    multi_ds = len({r["dataset"] for r in main}) > 1
    body, flagged = [], False
    for ds, model in _groups(main):
        raw = _pick(main, dataset=ds, model=model, recal="none")
        for p in sorted({r["precision"] for r in raw}, key=_prec_key):
            rs = _pick(raw, precision=p)
            same = {"dataset": ds, "model": model, "precision": p}
            ts = _pick(main, recal="temperature", **same)
            f32 = _pick(main, recal="temperature_fp32", **same)
            ece = aggregate(rs, "ece")
            mark = " †" if _outside(ece) else ""
            ts_ece = aggregate(ts, "ece")
            ts_mark = " †" if _outside(ts_ece) else ""
            flagged |= bool(mark or ts_mark)
            r = rs[0]
            name = f"{_ds_label(ds)} / {model}" if multi_ds else model
            cells = [
                _two_line(aggregate(rs, "accuracy")),
                _two_line(ece, mark=mark),
                _two_line(aggregate(rs, "ece_diff_vs_fp32"), 2, sign=True) if p != "fp32" else "–",
                _two_line(ts_ece, mark=ts_mark) if ts else "–",
                _two_line(aggregate(f32, "ece")) if f32 else "–",
                html.escape(_temp(ts)),
                _count(r.get("params"), ""),
                _count(r.get("weight_bytes"), "B"),
            ]
            body.append(
                f"<tr><td class='text model'>{html.escape(name).replace('@', '<wbr>@')}</td>"
                f"<td class='text'>{html.escape(p)}</td>"
                + "".join(f"<td>{c}</td>" for c in cells)
                + "</tr>"
            )
    heads = [
        ("model", "dataset / model" if multi_ds else "model"),
        ("precision", "precision"),
        ("top-1 test accuracy", "accuracy %"),
        ("binned ECE on the test split, raw logits", "ECE %"),
        ("paired-bootstrap ECE difference vs the same model at fp32", "ΔECE vs fp32 (points)"),
        ("ECE after temperature scaling fitted on this model", "ECE % after TS"),
        ("ECE when the fp32 model's temperature is reused", "ECE % with fp32's T"),
        ("the fitted temperature", "T"),
        ("parameters", "params"),
        ("stored weight size at this precision", "weights"),
    ]
    head = "".join(f"<th title='{html.escape(t)}'>{html.escape(h)}</th>" for t, h in heads)
    table = (
        f"<table class='nums key'><thead><tr>{head}</tr></thead>"
        f"<tbody>{''.join(body)}</tbody></table>"
    )
    seeds = len({r.get("seed") for r in main})
    notes = ["Under each number, its bootstrap interval (hover the number for it too)."]
    if seeds > 1:
        notes.append(
            f"Each line is the mean of {seeds} seeds; its interval holds the test-image "
            "variance within seeds and the training variance between them."
        )
    if flagged:
        notes.append(_OUTSIDE_NOTE)
    return table + "".join(f"<p class='muted'>{html.escape(n)}</p>" for n in notes)


def _all_methods_table(rows: list[dict]) -> str:
    main = _main_rows(rows)
    methods = list(dict.fromkeys(r["recal"] for r in main))
    body = []
    for ds, model in _groups(main):
        for p in sorted(
            {r["precision"] for r in _pick(main, dataset=ds, model=model)}, key=_prec_key
        ):
            cells = []
            for m in methods:
                rs = _pick(main, dataset=ds, model=model, recal=m, precision=p)
                cells.append(_pct(rs[0]["ece"]) if rs else "–")
            body.append([ds, model, p, *cells])
    return _html_table(["dataset", "model", "precision", *[f"ECE % {m}" for m in methods]], body)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;
margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em}h2{margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.82em;margin:.6em 0}
td,th{border:1px solid #ddd;padding:3px 7px;text-align:right}th{background:#f4f4f4}
td:first-child,td:nth-child(2),td:nth-child(3){text-align:left}
img{max-width:100%;border:1px solid #eee;margin:.4em 0}.verdict{font-weight:600}
.muted{color:#666;font-size:.9em}code{background:#f4f4f4;padding:1px 4px}
.badge{display:inline-block;padding:1px 7px;border-radius:9px;font-weight:600;white-space:nowrap}
.safe{background:#d9f2dd;color:#135c1e}.repair{background:#dbe9fb;color:#123f7a}
.lost{background:#fde2d6;color:#7a2a06}.broken{background:#f9d6dc;color:#7a0e24}
.asfp32{background:#fff1c2;color:#6b4a00}
td.text{text-align:left}th{text-align:left}
table.verdicts{width:100%}table.verdicts td{vertical-align:middle;white-space:nowrap}
table.verdicts td.why,table.verdicts td.verdict{white-space:normal}
td.why{font-size:.88em;color:#555;max-width:26em}
table.nums td{white-space:nowrap}table.key{width:100%}
table.key td.model{white-space:normal;overflow-wrap:anywhere}
table.key th{white-space:normal;vertical-align:bottom}
.ci{color:#777;font-size:.85em}.cite{margin:.1em 0}
dl.glossary dt{font-weight:600;margin-top:.4em}dl.glossary dd{margin-left:1.5em}
table{max-width:100%}table.verdicts .badge{white-space:normal}
table.verdicts td>.muted{display:block;white-space:nowrap}
.near{color:#a15c00;font-weight:700;margin-left:.3em;cursor:help}
"""

_BADGE = {
    "safe as is": ("safe", "✔ safe as is"),
    "safe after recalibration": ("repair", "✔ safe after recalibration"),
    "as trustworthy as fp32, which is not: recalibrate": (
        "asfp32",
        "✔ as trustworthy as fp32, which is not: recalibrate",
    ),
    "as trustworthy as fp32, which is not: cannot be repaired": (
        "asfp32",
        "✘ as trustworthy as fp32, which is not: cannot be repaired",
    ),
    "not safe: accuracy lost": ("lost", "✘ not safe: accuracy lost"),
    "not safe: confidence cannot be repaired": (
        "broken",
        "✘ not safe: confidence cannot be repaired",
    ),
}


def _budget(config_text: str):
    """The study's verdict budget from its config.toml ([report]), else the defaults."""
    import tomllib

    from quantcal.findings.verdicts import Budget

    try:
        section = tomllib.loads(config_text).get("report", {}) if config_text else {}
        return Budget(
            **{
                k: section[k]
                for k in ("max_accuracy_drop", "max_ece_rise", "max_ece")
                if k in section
            }
        )
    except (tomllib.TOMLDecodeError, TypeError, ValueError):
        return Budget()


def run_budget(run_dir: str | Path):
    """The verdict budget of a run folder (its config.toml's [report]), else the defaults."""
    path = Path(run_dir) / "config.toml"
    try:
        text = path.read_text(encoding="utf-8") if path.is_file() else ""
    except OSError:
        text = ""
    return _budget(text)


def _muted(text: str) -> str:
    return f"<span class='muted'>{html.escape(text)}</span>"


def _estimate_html(e, fp32=None) -> str:
    """A compact cell: the estimate (its interval as a tooltip), then fp32's in grey."""
    if e.value is None:
        return "–"
    tip = f"{e.text()} ({e.n_seeds} seed{'s' if e.n_seeds != 1 else ''})"
    out = f"<span title='{html.escape(tip)}'>{pct(e.value)}</span>"
    if fp32 is not None and fp32.value is not None:
        out += f" {_muted(f'fp32 {pct(fp32.value)}')}"
    return out


def _verdict_section(rows: list[dict], budget) -> str:
    """The verdict table: per model and precision, the outcome (colour and text), the numbers
    behind it (intervals as tooltips and in the key numbers below) and the reason."""
    from quantcal.findings.verdicts import LIKE_FP32_RECAL, SAFE_AFTER_RECAL, verdicts
    from quantcal.findings.verdicts import summary as summary_notes

    vs = verdicts(rows, budget)
    if not vs:
        return "<p>No quantized cell with an fp32 reference: no verdict.</p>"
    multi_ds = len({v.dataset for v in vs}) > 1
    body = []
    for v in vs:
        cls, label = _BADGE[v.outcome]
        after = ""
        if v.outcome in (SAFE_AFTER_RECAL, LIKE_FP32_RECAL):
            fix = f"{v.recal} → {pct(v.best_ece.value)} %, fitted on {v.recal_fit}"
            after = f"<br>{_muted(fix)}"
        near = (
            " <span class='near' title='"
            + html.escape(f"borderline: {v.basis or 'the deciding interval'} crosses its line")
            + "'>≈</span>"
            if v.borderline
            else ""
        )
        model = f"{_ds_label(v.dataset)} / {v.model}" if multi_ds else v.model
        best = f"{html.escape(v.recal)} {_estimate_html(v.best_ece)}" if v.recal else "–"
        body.append(
            f"<tr><td class='text'>{html.escape(model)}</td>"
            f"<td class='text'>{html.escape(v.precision)}</td>"
            f"<td class='text verdict'><span class='badge {cls}'>{label}</span>{near}{after}</td>"
            f"<td>{_estimate_html(v.accuracy, v.fp32_accuracy)}</td>"
            f"<td>{_estimate_html(v.ece, v.fp32_ece)}</td>"
            f"<td>{best}</td><td class='text why'>{html.escape(v.reason)}</td></tr>"
        )
    head = "".join(
        f"<th>{h}</th>"
        for h in (
            "model",
            "precision",
            "verdict",
            "accuracy %",
            "ECE % as is",
            "best recalibrator: ECE %",
            "why",
        )
    )
    counts = {o: sum(v.outcome == o for v in vs) for o in _BADGE}
    summary = "; ".join(f"{n} {o}" for o, n in counts.items() if n)
    datasets = "" if multi_ds else f" on {html.escape(_ds_label(vs[0].dataset))}"
    return (
        f"<p><b>{len(vs)} quantized cells{datasets}: {html.escape(summary)}.</b></p>"
        + "".join(f"<p>{html.escape(s)}</p>" for s in summary_notes(rows, budget))
        + f"<table class='verdicts'><tr>{head}</tr>{''.join(body)}</table>"
        f"<p class='muted'>Budget: at most {100 * budget.max_accuracy_drop:g} point(s) of "
        f"top-1 accuracy lost and {100 * budget.max_ece_rise:g} point(s) of ECE gained vs "
        f"fp32 (as is; after recalibration, vs fp32's best), and an ECE of at most "
        f"{100 * budget.max_ece:g} % whatever fp32's, from the study's [report] "
        "max_accuracy_drop, max_ece_rise and max_ece. A recalibrator that costs more accuracy "
        "than the budget, or whose fit raised the held-out ECE, is no repair. Point estimates "
        "decide; hover a number for its 95 % interval (the key numbers below list them); ≈ "
        "marks a verdict whose deciding interval crosses its line: the paired ΔECE vs fp32 "
        "where the rows have it (hover ≈ to see which).</p>"
    )


def _fitted_on(rows: list[dict]) -> str:
    """Where this run's recalibrators were fitted, in words (the ``recal_fit`` column)."""
    modes = {r.get("recal_fit") or "val" for r in rows if r.get("recal") != "none"}
    cross = "two halves of the test split, each recalibrated by a fit on the other (cross-fit)"
    if modes == {"test_crossfit"}:
        return cross
    if "test_crossfit" in modes:
        return f"the validation split, or {cross} where the recal_fit column says test_crossfit"
    return "the validation split"


def _figure_name(kind: str, dataset: str, model: str) -> str:
    """A short, safe file name: the dataset's file name (not its whole path), the model, and a
    hash of the full pair so two files with one name never collide."""
    import hashlib
    import re

    slug = re.sub(r"[^A-Za-z0-9.]+", "_", f"{_ds_label(dataset)}_{model}").strip("_")[:60]
    tag = hashlib.sha256(f"{dataset}\0{model}".encode()).hexdigest()[:8]
    return f"{kind}_{slug}_{tag}"


def _notes_section(rows: list[dict], run: Path) -> list[str]:
    """Each distinct note of the rows with the cells it applies to, and any cache entries that
    were damaged and rebuilt (their numbers equal a clean run's; listed so nothing is hidden)."""
    from quantcal.study.cache import healed_entries

    parts: list[str] = []
    by_note: dict[str, set[str]] = {}
    for r in rows:
        for note in filter(None, (n.strip() for n in str(r.get("notes") or "").split(" | "))):
            by_note.setdefault(note, set()).add(f"{_model_label(r)} {r['precision']}")
    if by_note:
        parts.append(
            "<h2>Notes</h2><p class='muted'>What a number may not mean as its name "
            "says (also in the notes column of results.csv).</p>"
        )
        parts.append(
            _html_table(
                ["note", "cells"],
                [
                    [n, ", ".join(sorted(c)[:6]) + (" …" if len(c) > 6 else "")]
                    for n, c in by_note.items()
                ],
            )
        )
    coverage: dict[str, set[str]] = {}
    for r in rows:
        if r.get("quantized_layers"):
            coverage.setdefault(_model_label(r), set()).add(
                f"{r['precision']} {r['quantized_layers']}"
            )
    if coverage:
        parts.append(
            "<h2>Quantization coverage</h2><p class='muted'>Conv/linear computations quantized "
            "of those in the deploy graph (k/n); any left in fp32 are named in the notes.</p>"
        )
        parts.append(
            _html_table(
                ["model", "quantized layers"],
                [
                    [m, ", ".join(sorted(c, key=lambda t: _prec_key(t.split()[0])))]
                    for m, c in coverage.items()
                ],
            )
        )
    healed = healed_entries(run / "cache")
    if healed:
        parts.append(
            "<h2>Cache entries rebuilt</h2><p class='muted'>Damaged entries found and "
            "computed again; the results equal a clean run's.</p>"
        )
        parts.append(
            _html_table(
                ["file", "what was wrong"],
                [[h.get("file", ""), h.get("reason", "")] for h in healed[-50:]],
            )
        )
    return parts


def _trains_nothing(config: dict[str, Any]) -> bool:
    """The study's training recipe reaches no result (``studyconfig.recipe_unused``), read off
    its config.toml as written (a moved run folder's checkpoints need not exist here)."""
    from quantcal.study.config import recipe_unused

    models = config.get("model")
    if not isinstance(models, list) or not all(isinstance(m, dict) for m in models):
        return False
    objectives = (config.get("train") or {}).get("objectives") or []
    names = [o if isinstance(o, str) else (o or {}).get("name") for o in objectives]
    return recipe_unused(
        [bool(m.get("checkpoint")) for m in models],
        (config.get("quant") or {}).get("methods") or ["ptq"],
        names,
    )


def _without_table(text: str, name: str) -> str:
    """``text`` (TOML) without the table ``name`` and its sub-tables (``[name]``,
    ``[name.x]``, ``[[name.x]]``)."""
    out, skip = [], False
    for line in text.splitlines():
        head = line.strip()
        if head.startswith("["):
            key = head.strip("[]").strip()
            skip = key == name or key.startswith(f"{name}.")
        if not skip:
            out.append(line)
    return "\n".join(out).rstrip() + "\n"


def _config(config_text: str) -> dict[str, Any]:
    """The study's config.toml as a dict ({} when it is missing or does not parse)."""
    import tomllib

    try:
        return tomllib.loads(config_text) if config_text else {}
    except tomllib.TOMLDecodeError:
        return {}


def _config_section(config_text: str) -> str:
    """The study's config.toml, less what does not apply: no training recipe when it reaches no
    result (config.toml of such a run leaves it out already; one of an earlier release has it)."""
    config = _config(config_text)
    note = ""
    if _trains_nothing(config) and "train" in config:
        config_text = _without_table(config_text, "train")
        note = (
            "<p class='muted'>No network was trained: every model came from a checkpoint "
            "([[model]] checkpoint), so the training recipe ([train]) does not apply and is "
            "left out here.</p>"
        )
    return "<h2>Configuration</h2>" + note + "<pre>" + html.escape(config_text) + "</pre>"


def write_report(run_dir: str | Path) -> Path:
    """Write ``figures/*.png`` and a self-contained ``report.html``; returns the HTML path."""
    run = Path(run_dir)
    rows = load_rows(run)
    details_path = run / "details.json"
    details = json.loads(details_path.read_text()) if details_path.exists() else {}
    env = json.loads((run / "env.json").read_text()) if (run / "env.json").exists() else {}
    config_text = (run / "config.toml").read_text() if (run / "config.toml").exists() else ""
    rows, details = short_labels(rows, details)
    figs: list[tuple[str, str, bytes]] = []
    ok = _ok(rows)
    if ok:
        figs.append(
            (
                "precision",
                "Accuracy and ECE vs precision (raw solid, after temperature "
                "scaling dashed; bars are 95 % bootstrap intervals)",
                fig_precision(rows),
            )
        )
        figs.append(("recal_gain", "ECE after each recalibration method", fig_recal_gain(rows)))
        figs.append(("acc_vs_ece", "Accuracy vs ECE", fig_acc_vs_ece(rows)))
        for ds, model in _groups(_main_rows(rows)):
            figs.append(
                (
                    _figure_name("reliability", ds, model),
                    f"Reliability diagrams: {_ds_label(ds)} / {model}. The number at the "
                    "foot of each bin is its test-image count; a bin with fewer than "
                    f"{FULL_COUNT} images is drawn fainter the fewer it holds, since its gap "
                    "weighs that little in ECE",
                    fig_reliability(rows, details, ds, model),
                )
            )
        worst, ins = worst_inspect(rows, details)
        if worst is not None:
            figs.append(
                (
                    "layers_worst",
                    "Per-layer sensitivity of the worst cell: each layer's output SQNR vs fp32 "
                    "and its activation clipping",
                    fig_layers(worst, ins),
                )
            )
    for name, _, png in figs:
        atomic_write_bytes(run / "figures" / f"{name}.png", png)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        "<title>quantcal report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>quantcal report</h1>",
        "<p class='muted'>When this network is quantized, can its confidence still be trusted? "
        "Calibration error (top-label ECE, 15 equal-width bins unless the config says otherwise) "
        "is measured on the test split; temperatures and other recalibrators are fitted on "
        + _fitted_on(rows)
        + "; quantization ranges come from a sample of the training split. The words are "
        "explained in the <a href='#glossary'>glossary</a> at the end.</p>",
        "<p class='muted'>"
        + " · ".join(
            html.escape(str(x))
            for x in (
                run.resolve(),
                f"quantcal {env.get('quantcal', '')}",
                f"torch {env.get('torch', '')}",
                f"device {env.get('device', '')}",
                env.get("time_utc", ""),
            )
        )
        + "</p>",
        "<h2>Verdict</h2>",
        _verdict_section(rows, _budget(config_text)) if ok else "<p>No successful cells.</p>",
        "<h2>Key numbers</h2>",
        _key_table(rows) if ok else "<p>No successful cells.</p>",
        "<h2>Findings</h2>",
    ]
    found = findings(rows, details) if ok else []
    if any(f.get("source", "quantcal") != "quantcal" for f in found):
        parts.append(
            "<p class='muted'>Each claim is tested on this run's numbers; those of the paper "
            f"come from {PAPER}.</p>"
        )
    for f in found:
        cite = paper_citation(f["source"]) if "source" in f else ""
        parts.append(
            f"<h3>{html.escape(f['claim'])}</h3>"
            + (f"<p class='muted cite'>{cite}</p>" if cite else "")
            + f"<p class='verdict'>Verdict: {html.escape(f['verdict'])}</p><ul>"
            + "".join(f"<li>{html.escape(e)}</li>" for e in f["evidence"])
            + "</ul>"
        )
    untested = untested_claims(rows, details) if ok else []
    if untested:
        parts.append(
            "<p class='muted'>Not tested by this study: "
            + "; ".join(
                html.escape(f"{c['claim'].split(' (')[0].rstrip('.')} ({c['evidence'][0]})")
                if c["evidence"]
                else html.escape(c["claim"])
                for c in untested
            )
            + ".</p>"
        )
    if ok:
        why_html, why_figs = why_section(rows, details, _budget(config_text))
        for stale in (run / "figures").glob("why_*.png"):  # from an earlier report
            stale.unlink()
        if why_html:
            parts.append(why_html)
            for name, _, png in why_figs:
                atomic_write_bytes(run / "figures" / f"{name}.png", png)
    if ok:
        plans_html, plan_figs = plans_section(rows, details)
        if plans_html:
            parts.append(plans_html)
            for name, _, png in plan_figs:
                atomic_write_bytes(run / "figures" / f"{name}.png", png)
        for section in (repair_section, ablation_section, attribution_section):
            section_html, section_figs = section(details)
            if section_html:
                parts.append(section_html)
                for name, _, png in section_figs:
                    atomic_write_bytes(run / "figures" / f"{name}.png", png)
    parts.append("<h2>Figures</h2>")
    for _, caption, png in figs:
        b64 = base64.b64encode(png).decode()
        parts.append(
            f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,{b64}'>"
            f"<figcaption class='muted'>{html.escape(caption)}</figcaption></figure>"
        )
    parts.append("<h2>Every recalibration method</h2>")
    parts.append(_all_methods_table(rows) if ok else "")
    errors = [r for r in rows if r.get("status") != "ok"]
    if errors:
        parts.append("<h2>Failed cells</h2>")
        parts.append(
            _html_table(
                ["dataset", "arch", "precision", "recal", "error"],
                [[r["dataset"], r["arch"], r["precision"], r["recal"], r["error"]] for r in errors],
            )
        )
    parts.extend(_notes_section(rows, run))
    parts.append(glossary_section(rows, _config(config_text), "\n".join(parts)))
    parts.append(_config_section(config_text))
    parts.append(
        "<p class='muted'>Full results: results.csv (one row per cell and method); "
        "reliability bins and per-layer data: details.json.</p></body></html>"
    )
    return atomic_write_text(run / "report.html", "\n".join(parts))
