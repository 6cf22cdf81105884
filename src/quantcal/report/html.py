"""Figures, tables, findings and a self-contained ``report.html`` from a study's output folder.

Inputs (all written by :func:`quantcal.study.run_study`): ``results.csv``, ``details.json``
(reliability bins, per-layer quantization data, training curves), ``config.toml``, ``env.json``.
Figures use matplotlib's object API (no pyplot state, no display needed) and are embedded in the
HTML as base64 PNG, and also written to ``figures/``.

This module reads ``results.csv`` (:func:`load_rows`) and assembles the page
(:func:`write_report`, its stylesheet); each section is built in its own module (``verdict``,
``numbers``, ``claims``, ``why``, ``plans``, ``repair``, ``layers``, ``notes``, ``glossary``,
``configuration``).
"""

from __future__ import annotations

import base64
import csv
import html
import json
from pathlib import Path
from typing import Any

from quantcal._io import atomic_write_bytes, atomic_write_text
from quantcal.findings.rows import clean_rows, dataset_label, groups, main_rows, ok
from quantcal.report.claims import findings, untested_claims
from quantcal.report.configuration import config_section, parse_config
from quantcal.report.decisions import decisions_section
from quantcal.report.figures import (
    fig_acc_vs_ece,
    fig_layers,
    fig_precision,
    fig_recal_gain,
    fig_reliability,
    worst_inspect,
)
from quantcal.report.glossary import PAPER, glossary_section, paper_citation
from quantcal.report.labels import short_labels
from quantcal.report.layers import ablation_section, attribution_section
from quantcal.report.markup import html_table
from quantcal.report.notes import notes_section
from quantcal.report.numbers import all_methods_table, key_table, summary_table
from quantcal.report.plans import plans_section
from quantcal.report.plots import FULL_COUNT
from quantcal.report.repair import repair_section
from quantcal.report.verdict import config_budget, run_budget, verdict_section
from quantcal.report.why import why_section

__all__ = [
    "check_results_columns",
    "findings",
    "load_rows",
    "run_budget",
    "short_labels",
    "summary_table",
    "untested_claims",
    "write_report",
]

_TEXT_COLUMNS = {
    "dataset",
    "arch",
    "objective",
    "precision",
    "observer",
    "method",
    "recal",
    "recal_fit",
    "shift",
    "threshold_outcome",
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
    from quantcal.findings.rows import RESULT_COLUMNS

    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            header = next(csv.reader(fh), [])
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ValueError(f"{path} cannot be read as a CSV file ({exc})") from None
    need = [
        *(c for c in RESULT_COLUMNS[: RESULT_COLUMNS.index("recal") + 1] if c != "shift"),
        "status",
    ]  # a results.csv from before the shift axis is all clean
    missing = [c for c in need if c not in header]
    if missing:
        raise ValueError(
            f"{path} is not a results.csv that quantcal wrote: it lacks the columns "
            f"{', '.join(missing)}. Give the folder of a quantcal run (or re-run it)"
        )


def load_rows(run_dir: str | Path, *, shifted: bool = False) -> list[dict[str, Any]]:
    """results.csv as dicts, numeric columns as float (None where empty): the rows scored on
    the clean test split, and with ``shifted`` those on its corrupted copies too (the ``shift``
    column; every table, verdict and claim of the clean study reads the clean rows)."""
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
    return rows if shifted else clean_rows(rows)


_ok = ok
_main_rows = main_rows
_groups = groups
_ds_label = dataset_label


# ---------------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------------
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
table.thresholds td:nth-child(4),table.thresholds td:last-child{text-align:left}
"""


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


def write_report(run_dir: str | Path) -> Path:
    """Write ``figures/*.png`` and a self-contained ``report.html``; returns the HTML path."""
    run = Path(run_dir)
    every = load_rows(run, shifted=True)
    details_path = run / "details.json"
    details = json.loads(details_path.read_text()) if details_path.exists() else {}
    env = json.loads((run / "env.json").read_text()) if (run / "env.json").exists() else {}
    config_text = (run / "config.toml").read_text() if (run / "config.toml").exists() else ""
    every, details = short_labels(every, details)
    rows = clean_rows(every)
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
        verdict_section(rows, config_budget(config_text)) if ok else "<p>No successful cells.</p>",
        "<h2>Key numbers</h2>",
        key_table(rows) if ok else "<p>No successful cells.</p>",
        "<h2>Findings</h2>",
    ]
    found = findings(every, details) if ok else []
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
        why_html, why_figs = why_section(rows, details, config_budget(config_text))
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
        target = parse_config(config_text).get("metrics", {}).get("target_risk")
        decisions_html, decision_figs = decisions_section(every, details, target)
        for stale in (run / "figures").glob("risk_coverage_*.png"):
            stale.unlink()
        for stale in (run / "figures").glob("severity_*.png"):
            stale.unlink()
        if decisions_html:
            parts.append(decisions_html)
            for name, _, png in decision_figs:
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
    parts.append(all_methods_table(rows) if ok else "")
    errors = [r for r in rows if r.get("status") != "ok"]
    if errors:
        parts.append("<h2>Failed cells</h2>")
        parts.append(
            html_table(
                ["dataset", "arch", "precision", "recal", "error"],
                [[r["dataset"], r["arch"], r["precision"], r["recal"], r["error"]] for r in errors],
            )
        )
    parts.extend(notes_section(rows, run))
    parts.append(glossary_section(rows, parse_config(config_text), "\n".join(parts)))
    parts.append(config_section(config_text))
    parts.append(
        "<p class='muted'>Full results: results.csv (one row per cell and method); "
        "reliability bins and per-layer data: details.json.</p></body></html>"
    )
    return atomic_write_text(run / "report.html", "\n".join(parts))
