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
import io
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from quantcal._io import atomic_write_bytes, atomic_write_text

__all__ = ["findings", "load_rows", "summary_table", "write_report"]

_PREC_ORDER = {"fp32": 0, "W8A8": 1, "W4A8": 2, "W4A4": 3}
_TEXT_COLUMNS = {
    "dataset",
    "arch",
    "objective",
    "precision",
    "observer",
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


def load_rows(run_dir: str | Path) -> list[dict[str, Any]]:
    """results.csv as dicts, numeric columns as float (None where empty)."""
    path = Path(run_dir) / "results.csv"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist: run `quantcal run --out {run_dir}` first (or, for a sharded "
            "run, wait until every shard has finished)"
        )
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        for k in r.keys() - _TEXT_COLUMNS:
            r[k] = _num(r[k])
    return rows


def _prec_key(p: str) -> tuple:
    if p in _PREC_ORDER:
        return (_PREC_ORDER[p], p)
    w, _, a = p.upper().lstrip("W").partition("A")
    try:
        return (10, -int(w), -int(a))
    except ValueError:
        return (99, p)


def _ok(rows: Iterable[dict]) -> list[dict]:
    return [r for r in rows if r.get("status") == "ok"]


def _main_rows(rows: list[dict]) -> list[dict]:
    """One row per (dataset, arch, width, seed, precision, recal): the first range estimator and
    range-calibration sample (fp32 rows have neither)."""
    obs = [r["observer"] for r in rows if r["observer"] != "-"]
    first_obs = obs[0] if obs else "-"
    return [
        r for r in _ok(rows) if r["observer"] in ("-", first_obs) and r["ptq_sample"] in (-1, 0)
    ]


def _model_label(r: dict) -> str:
    """``arch@width``, with the training objective when it is not plain cross-entropy."""
    obj = r.get("objective") or "ce"
    return f"{r['arch']}@{r['width']:g}" + ("" if obj == "ce" else f" {obj}")


def _groups(rows: list[dict]) -> list[tuple[str, str]]:
    seen: dict[tuple[str, str], None] = {}
    for r in rows:
        seen.setdefault((r["dataset"], _model_label(r)), None)
    return list(seen)


def _pick(rows: list[dict], **eq) -> list[dict]:
    out = []
    for r in rows:
        if all((_model_label(r) if k == "model" else r.get(k)) == v for k, v in eq.items()):
            out.append(r)
    return sorted(out, key=lambda r: (_prec_key(r["precision"]), r.get("seed") or 0))


def _mean(values: list[float | None]) -> float | None:
    v = [x for x in values if x is not None and not math.isnan(x)]
    return sum(v) / len(v) if v else None


def _pct(x: float | None, digits: int = 1) -> str:
    return "–" if x is None else f"{100 * x:.{digits}f}"


def _diff(r: dict, key: str) -> str:
    """``"d [lo, hi]"`` in percentage points for a paired-difference column."""
    return f"{_pct(r.get(key), 2)} [{_pct(r.get(f'{key}_lo'), 2)}, {_pct(r.get(f'{key}_hi'), 2)}]"


def _ci(r: dict, key: str) -> str:
    lo, hi = r.get(f"{key}_lo"), r.get(f"{key}_hi")
    if lo is None or hi is None:
        return _pct(r.get(key))
    return f"{_pct(r.get(key))} [{_pct(lo)}, {_pct(hi)}]"


# ---------------------------------------------------------------------------------------------
# Findings: the study's claims (REFERENCE.md §1), judged on this run's numbers and intervals
# ---------------------------------------------------------------------------------------------
def _verdict(lo: float | None, hi: float | None, positive: str, negative: str) -> str:
    if lo is None or hi is None:
        return "undecided (no interval)"
    if lo > 0:
        return positive
    if hi < 0:
        return negative
    return "undecided (interval contains 0)"


def findings(rows: list[dict]) -> list[dict[str, Any]]:
    """One entry per claim: ``claim``, ``verdict``, ``evidence`` (list of sentences)."""
    main = _main_rows(rows)
    out: list[dict[str, Any]] = []
    precs = sorted({r["precision"] for r in main}, key=_prec_key)
    lowest = precs[-1] if precs else None
    n_test = _mean([r.get("n_test") for r in main]) or 0
    small = n_test < 2000

    # Claim 1: ECE grows as precision falls.
    ev, verdicts = [], []
    for ds, model in _groups(main):
        rs = [r for r in _pick(main, dataset=ds, model=model, recal="none")]
        by_p = {r["precision"]: r for r in rs if r.get("seed") == rs[0].get("seed")}
        if lowest is None or lowest == "fp32" or lowest not in by_p or "fp32" not in by_p:
            continue
        low = by_p[lowest]
        v = _verdict(
            low.get("ece_diff_vs_fp32_lo"),
            low.get("ece_diff_vs_fp32_hi"),
            "supported",
            "contradicted",
        )
        verdicts.append(v.split()[0])
        trail = " → ".join(f"{p} {_pct(by_p[p]['ece'])}" for p in precs if p in by_p)
        accs = " → ".join(f"{_pct(by_p[p]['accuracy'])}" for p in precs if p in by_p)
        ev.append(
            f"{ds} / {model}: ECE % {trail}; {lowest} − fp32 = {_diff(low, 'ece_diff_vs_fp32')} "
            f"points (paired bootstrap) — {v}. Accuracy % {accs}."
        )
    out.append(
        {
            "claim": "1. Calibration error grows as precision falls (fp32 → W8A8 → W4A8 → W4A4), "
            "most with 4-bit activations.",
            "verdict": _summarise(verdicts),
            "evidence": ev,
        }
    )

    # Claim 2: GhostNet-VGG is the most robust.
    ev, verdicts = [], []
    for ds in sorted({r["dataset"] for r in main}):
        deltas = []
        for _, model in [g for g in _groups(main) if g[0] == ds]:
            rs = {r["precision"]: r for r in _pick(main, dataset=ds, model=model, recal="none")}
            if lowest in rs and "fp32" in rs and lowest != "fp32":
                low = rs[lowest]
                deltas.append(
                    (
                        model,
                        low.get("ece_diff_vs_fp32"),
                        low.get("ece_diff_vs_fp32_lo"),
                        low.get("ece_diff_vs_fp32_hi"),
                        (rs["fp32"]["accuracy"] or 0) - (low["accuracy"] or 0),
                    )
                )
        ghosts = [d for d in deltas if d[0].startswith("ghostnet")]
        if not ghosts or len(deltas) < 2:
            continue
        g = ghosts[0]
        others = [d for d in deltas if d is not g]
        smallest_ece = all((g[1] or 0) <= (o[1] or 0) for o in others)
        smallest_acc = all(g[4] <= o[4] for o in others)
        separated = all(g[3] is not None and o[2] is not None and g[3] < o[2] for o in others)
        if smallest_ece and smallest_acc:
            verdicts.append("supported" if separated else "undecided")
        else:
            verdicts.append(
                "contradicted" if not smallest_ece and not smallest_acc else "undecided"
            )
        ev.append(
            f"{ds}, {lowest} − fp32: "
            + "; ".join(
                f"{m}: ΔECE {_pct(d, 2)} [{_pct(lo, 2)}, {_pct(hi, 2)}], "
                f"accuracy drop {_pct(acc, 1)}"
                for m, d, lo, hi, acc in deltas
            )
            + (
                ". GhostNet-VGG has the smallest rise in both"
                if smallest_ece and smallest_acc
                else ". GhostNet-VGG does not have the smallest rise in both"
            )
            + (
                "; its interval lies below every other's."
                if separated
                else "; the intervals overlap, so the ranking is not decided."
                if smallest_ece
                else "."
            )
        )
    out.append(
        {
            "claim": "2. GhostNet-VGG is the most robust to the accuracy drop and the ECE rise; "
            "the "
            "depthwise-separable nets (ShuffleNetV2, MobileOne) suffer more.",
            "verdict": _summarise(verdicts)
            if verdicts
            else "not tested (needs ghostnet_vgg16 and another arch)",
            "evidence": ev,
        }
    )

    # Claim 3: temperature scaling helps quantized nets but fails for 4-bit MobileOne.
    ev, verdicts = [], []
    for ds, model in _groups(main):
        for r in _pick(main, dataset=ds, model=model, recal="temperature"):
            if r["precision"] == "fp32":
                continue
            none = _pick(main, dataset=ds, model=model, recal="none", precision=r["precision"])
            v = _verdict(
                r.get("ece_diff_vs_none_lo"), r.get("ece_diff_vs_none_hi"), "made worse", "improved"
            )
            verdicts.append(
                "supported"
                if v == "improved"
                else "contradicted"
                if v == "made worse"
                else "undecided"
            )
            residual = _verdict(
                r.get("ece_diff_vs_fp32_lo"),
                r.get("ece_diff_vs_fp32_hi"),
                "still above fp32+TS",
                "below fp32+TS",
            )
            ev.append(
                f"{ds} / {model} {r['precision']}: ECE {_pct(none[0]['ece'] if none else None)} → "
                f"{_pct(r['ece'])} % with T = {r['temperature']:.3g} ({v}; change "
                f"{_pct(r.get('ece_diff_vs_none'), 2)} [{_pct(r.get('ece_diff_vs_none_lo'), 2)}, "
                f"{_pct(r.get('ece_diff_vs_none_hi'), 2)}]); vs fp32 after TS: {residual}."
                if r.get("temperature") is not None
                else f"{ds} / {model} {r['precision']}: no temperature"
            )
    mob = [e for e in ev if "mobileone" in e and (lowest or "") in e]
    out.append(
        {
            "claim": "3. Temperature scaling improves calibration of quantized nets, but fails to "
            "correct "
            "4-bit MobileOne.",
            "verdict": _summarise(verdicts)
            + (
                "; MobileOne at the lowest precision: "
                + (mob[0].split(": ", 1)[1] if mob else "not in this run")
            ),
            "evidence": ev,
        }
    )

    # Beyond the paper: reusing the fp32 temperature vs a refit.
    ev = []
    for ds, model in _groups(main):
        for p in precs:
            if p == "fp32":
                continue
            refit = _pick(main, dataset=ds, model=model, recal="temperature", precision=p)
            reuse = _pick(main, dataset=ds, model=model, recal="temperature_fp32", precision=p)
            if refit and reuse:
                ev.append(
                    f"{ds} / {model} {p}: ECE {_pct(reuse[0]['ece'])} % reusing the fp32 "
                    f"T = {reuse[0]['temperature']:.3g} vs {_pct(refit[0]['ece'])} % refitting "
                    f"(T = {refit[0]['temperature']:.3g})."
                )
    if ev:
        out.append(
            {
                "claim": "Extra: after quantization, refit the temperature rather than reuse the "
                "fp32 model's.",
                "verdict": "see the numbers",
                "evidence": ev,
            }
        )

    # Beyond the paper: the range-calibration sample as a source of variance.
    ev = []
    ok = _ok(rows)
    for ds, model in _groups(ok):
        for p in precs:
            rs = [
                r
                for r in _pick(ok, dataset=ds, model=model, recal="none", precision=p)
                if r["ptq_sample"] is not None and r["ptq_sample"] >= 0
            ]
            per_obs: dict[str, list[dict]] = {}
            for r in rs:
                per_obs.setdefault(r["observer"], []).append(r)
            for obs, rr in per_obs.items():
                if len(rr) > 1:
                    eces = [r["ece"] for r in rr]
                    accs = [r["accuracy"] for r in rr]
                    ev.append(
                        f"{ds} / {model} {p} ({obs}, {len(rr)} disjoint range-calibration "
                        f"samples): accuracy {_pct(min(accs))}–{_pct(max(accs))} %, ECE "
                        f"{_pct(min(eces))}–{_pct(max(eces))} %."
                    )
    out.append(
        {
            "claim": "Extra: the range-calibration sample is a source of variance.",
            "verdict": "see the numbers"
            if ev
            else "not measured (set quant.ptq_calib_samples > 1)",
            "evidence": ev,
        }
    )
    from quantcal.findings import FINDINGS

    out.extend(f for f in (finding(rows) for finding in FINDINGS) if f is not None)
    if small:
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


def _summarise(verdicts: list[str]) -> str:
    if not verdicts:
        return "not tested in this run"
    counts = {v: verdicts.count(v) for v in dict.fromkeys(verdicts)}
    if len(counts) == 1:
        return f"{verdicts[0]} ({len(verdicts)} of {len(verdicts)})"
    return "mixed: " + ", ".join(f"{v} {c} of {len(verdicts)}" for v, c in counts.items())


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------
def _figure(w: float, h: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), dpi=110, layout="constrained")


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def fig_precision(rows: list[dict]) -> bytes:
    """The study's Figure 1: accuracy and ECE vs precision per architecture and dataset."""
    main = _main_rows(rows)
    datasets = sorted({r["dataset"] for r in main})
    precs = sorted({r["precision"] for r in main}, key=_prec_key)
    fig = _figure(9, 3.2 * len(datasets))
    axes = fig.subplots(len(datasets), 2, squeeze=False)
    for i, ds in enumerate(datasets):
        for c, (_, model) in enumerate([g for g in _groups(main) if g[0] == ds]):
            for recal, style in (("none", "-o"), ("temperature", "--s")):
                rs = _pick(main, dataset=ds, model=model, recal=recal)
                by_p = {r["precision"]: r for r in rs}
                xs = [k for k, p in enumerate(precs) if p in by_p]
                if not xs:
                    continue
                rr = [by_p[precs[k]] for k in xs]
                if recal == "none":
                    axes[i, 0].plot(
                        xs, [100 * r["accuracy"] for r in rr], style, label=model, color=f"C{c}"
                    )
                line = axes[i, 1].errorbar(
                    xs,
                    [100 * r["ece"] for r in rr],
                    yerr=_yerr(rr, "ece"),
                    fmt=style,
                    color=f"C{c}",
                    capsize=3,
                    label=f"{model}{' + TS' if recal != 'none' else ''}",
                    alpha=1.0 if recal == "none" else 0.6,
                )
                del line
        for j, (ax, name) in enumerate(zip(axes[i], ("accuracy (%)", "ECE (%)"))):
            ax.set_xticks(range(len(precs)), precs)
            ax.set_ylabel(name)
            ax.set_title(f"{_ds_label(ds)}: {name.split()[0]}")
            ax.grid(alpha=0.3)
            if j == 1 or i == 0:
                ax.legend(fontsize=7)
    return _png(fig)


def _yerr(rr: list[dict], key: str):
    lo = [
        100 * max(0.0, r[key] - r[f"{key}_lo"]) if r.get(f"{key}_lo") is not None else 0 for r in rr
    ]
    hi = [
        100 * max(0.0, r[f"{key}_hi"] - r[key]) if r.get(f"{key}_hi") is not None else 0 for r in rr
    ]
    return [lo, hi]


def fig_reliability(rows: list[dict], details: dict, dataset: str, model: str) -> bytes:
    """Reliability diagrams: one row per precision, before and after temperature scaling."""
    main = _main_rows(rows)
    precs = sorted(
        {r["precision"] for r in _pick(main, dataset=dataset, model=model)}, key=_prec_key
    )
    methods = [
        m for m in ("none", "temperature") if _pick(main, dataset=dataset, model=model, recal=m)
    ]
    from quantcal.plots import draw_reliability

    fig = _figure(3.2 * max(1, len(methods)), 2.9 * max(1, len(precs)))
    axes = fig.subplots(max(1, len(precs)), max(1, len(methods)), squeeze=False)
    for i, p in enumerate(precs):
        for j, m in enumerate(methods):
            ax = axes[i, j]
            rs = _pick(main, dataset=dataset, model=model, recal=m, precision=p)
            rel = details.get("reliability", {}).get(rs[0]["row_id"]) if rs else None
            title = f"{p}, {'raw' if m == 'none' else 'after TS'}"
            if rs:
                title += f": ECE {_pct(rs[0]['ece'])}%"
            if rel:
                draw_reliability(
                    ax,
                    rel["edges"],
                    rel["count"],
                    rel["confidence"],
                    rel["accuracy"],
                    title=title,
                    legend=(i == 0 and j == 0),
                )
            else:
                ax.set_title(title + " (no bins)", fontsize=8)
                ax.set_axis_off()
    fig.suptitle(f"{_ds_label(dataset)} / {model}: reliability", fontsize=9)
    return _png(fig)


def fig_recal_gain(rows: list[dict]) -> bytes:
    """ECE per recalibration method for every quantized cell (bars grouped by cell)."""
    main = _main_rows(rows)
    methods = list(dict.fromkeys(r["recal"] for r in main))
    cells = list(dict.fromkeys((r["dataset"], _model_label(r), r["precision"]) for r in main))
    cells.sort(key=lambda c: (c[0], c[1], _prec_key(c[2])))
    fig = _figure(max(6.0, 0.55 * len(cells) * max(1, len(methods)) / 3), 3.6)
    ax = fig.subplots()
    w = 0.8 / max(1, len(methods))
    for k, m in enumerate(methods):
        ys = []
        for ds, model, p in cells:
            rs = _pick(main, dataset=ds, model=model, precision=p, recal=m)
            ys.append(100 * rs[0]["ece"] if rs else 0.0)
        ax.bar([i + k * w for i in range(len(cells))], ys, width=w, label=m)
    ax.set_xticks(
        [i + 0.4 - w / 2 for i in range(len(cells))],
        [f"{model}\n{p}" for _, model, p in cells],
        fontsize=6,
        rotation=60,
    )
    ax.set_ylabel("test ECE (%)")
    ax.set_title("ECE after each recalibration method")
    ax.legend(fontsize=7, ncol=min(6, len(methods)))
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def fig_acc_vs_ece(rows: list[dict]) -> bytes:
    """Accuracy against ECE for every cell (raw logits), colour by model, marker by precision."""
    ok = [r for r in _ok(rows) if r["recal"] == "none"]
    markers = "osD^v<>p*h"
    precs = sorted({r["precision"] for r in ok}, key=_prec_key)
    fig = _figure(5.5, 4)
    ax = fig.subplots()
    for c, (ds, model) in enumerate(_groups(ok)):
        for k, p in enumerate(precs):
            rs = _pick(ok, dataset=ds, model=model, precision=p)
            if rs:
                ax.scatter(
                    [100 * r["accuracy"] for r in rs],
                    [100 * r["ece"] for r in rs],
                    color=f"C{c % 10}",
                    marker=markers[k % len(markers)],
                    s=28,
                    label=f"{_ds_label(ds)}/{model}" if k == 0 else None,
                )
    for k, p in enumerate(precs):
        ax.scatter([], [], color="grey", marker=markers[k % len(markers)], label=p)
    ax.set_xlabel("test accuracy (%)")
    ax.set_ylabel("test ECE (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    ax.set_title("accuracy vs calibration error (raw)")
    return _png(fig)


def _worst_inspect(rows: list[dict], details: dict) -> tuple[dict | None, dict | None]:
    raw = [r for r in _ok(rows) if r["recal"] == "none" and r["precision"] != "fp32"]
    for r in sorted(raw, key=lambda r: -(r["ece"] or 0)):
        for ins in details.get("inspect", []):
            if (
                ins["dataset"],
                ins["arch"],
                ins["width"],
                ins.get("objective", "ce"),
                ins["seed"],
                ins["precision"],
                ins["observer"],
                ins["ptq_sample"],
            ) == (
                r["dataset"],
                r["arch"],
                r["width"],
                r.get("objective") or "ce",
                r["seed"],
                r["precision"],
                r["observer"],
                r["ptq_sample"],
            ):
                return r, ins
    return None, None


def fig_layers(row: dict, ins: dict) -> bytes:
    """Per-layer SQNR (dB) and clipping fraction of the worst cell: which layer hurts."""
    layers = ins["layers"]
    names = [str(x.get("name", i)) for i, x in enumerate(layers)]
    sqnr = [x.get("sqnr_db") for x in layers]
    clip = [x.get("clip_fraction") for x in layers]
    fig = _figure(max(6.0, 0.18 * len(names)), 4.2)
    ax = fig.subplots()
    xs = list(range(len(names)))
    ax.bar(xs, [s if s is not None and math.isfinite(s) else 0 for s in sqnr], color="tab:blue")
    ax.set_ylabel("output SQNR vs fp32 (dB)")
    ax.set_xticks(xs, names, rotation=90, fontsize=5)
    ax2 = ax.twinx()
    ax2.plot(xs, [100 * c if c is not None else float("nan") for c in clip], "r.", ms=4)
    ax2.set_ylabel("activation clipping (%)", color="tab:red")
    ax.set_title(
        f"per-layer sensitivity: {_ds_label(row['dataset'])} / {_model_label(row)} "
        f"{row['precision']} ({row['observer']}), ECE {_pct(row['ece'])}%",
        fontsize=9,
    )
    return _png(fig)


# ---------------------------------------------------------------------------------------------
# Tables and HTML
# ---------------------------------------------------------------------------------------------
def _ds_label(ds: str) -> str:
    """``npz:/long/path/cifar100.npz`` -> ``npz:cifar100.npz`` for narrow tables."""
    return f"npz:{Path(ds[4:]).name}" if ds.startswith("npz:") else ds


def _temp(rows: list[dict]) -> str:
    t = rows[0].get("temperature") if rows else None
    return "–" if t is None else format(t, ".3g")


def summary_table(rows: list[dict]) -> str:
    """A compact plain-text table of the key numbers, for the terminal."""
    main = _main_rows(rows)
    mw = max([22, *(len(m) for _, m in _groups(main))])  # the model column fits every label
    header = (
        f"{'dataset':<16} {'model':<{mw}} {'prec':<5} {'acc%':>6} {'ECE%':>6} {'[95% CI]':>14} "
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
                f"{_ds_label(ds)[:16]:<16} {model:<{mw}} {r['precision']:<5} "
                f"{_pct(r['accuracy']):>6} "
                f"{_pct(r['ece']):>6} {ci:>14} {_pct(ts[0]['ece']) if ts else '–':>6} "
                f"{_pct(f32[0]['ece']) if f32 else '–':>6} "
                f"{_temp(ts):>6}"
            )
    errors = [r for r in rows if r.get("status") != "ok"]
    if errors:
        lines.append(f"{len(errors)} result rows failed; see the 'error' column of results.csv")
    return "\n".join(lines)


def _html_table(headers: list[str], body: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    trs = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in body
    )
    return f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"


def _key_table(rows: list[dict]) -> str:
    main = _main_rows(rows)
    body = []
    for ds, model in _groups(main):
        for r in _pick(main, dataset=ds, model=model, recal="none"):
            same = {"dataset": ds, "model": model, "precision": r["precision"]}
            ts = _pick(main, recal="temperature", **same)
            f32 = _pick(main, recal="temperature_fp32", **same)
            body.append(
                [
                    ds,
                    model,
                    r["precision"],
                    _ci(r, "accuracy"),
                    _ci(r, "ece"),
                    _diff(r, "ece_diff_vs_fp32"),
                    _ci(ts[0], "ece") if ts else "–",
                    _pct(f32[0]["ece"]) if f32 else "–",
                    _temp(ts),
                    f"{(r.get('params') or 0) / 1e3:.0f} k",
                    f"{(r.get('weight_bytes') or 0) / 1e3:.0f} kB",
                ]
            )
    return _html_table(
        [
            "dataset",
            "model",
            "precision",
            "accuracy % [CI]",
            "ECE % [CI]",
            "ΔECE vs fp32 [CI]",
            "ECE after TS",
            "ECE reusing fp32 T",
            "T",
            "params",
            "weights",
        ],
        body,
    )


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


def _notes_section(rows: list[dict], run: Path) -> list[str]:
    """Each distinct note of the rows with the cells it applies to, and any cache entries that
    were damaged and rebuilt (their numbers equal a clean run's; listed so nothing is hidden)."""
    from quantcal._cache import healed_entries

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


def write_report(run_dir: str | Path) -> Path:
    """Write ``figures/*.png`` and a self-contained ``report.html``; returns the HTML path."""
    run = Path(run_dir)
    rows = load_rows(run)
    details_path = run / "details.json"
    details = json.loads(details_path.read_text()) if details_path.exists() else {}
    env = json.loads((run / "env.json").read_text()) if (run / "env.json").exists() else {}
    config_text = (run / "config.toml").read_text() if (run / "config.toml").exists() else ""
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
                    f"Reliability diagrams: {ds} / {model}",
                    fig_reliability(rows, details, ds, model),
                )
            )
        worst, ins = _worst_inspect(rows, details)
        if worst is not None:
            figs.append(
                ("layers_worst", "Per-layer sensitivity of the worst cell", fig_layers(worst, ins))
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
        + "; quantization ranges come from a sample of the training split.</p>",
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
        "<h2>Key numbers</h2>",
        _key_table(rows) if ok else "<p>No successful cells.</p>",
        "<h2>Findings</h2>",
    ]
    for f in findings(rows) if ok else []:
        parts.append(
            f"<h3>{html.escape(f['claim'])}</h3><p class='verdict'>Verdict: "
            f"{html.escape(f['verdict'])}</p><ul>"
            + "".join(f"<li>{html.escape(e)}</li>" for e in f["evidence"])
            + "</ul>"
        )
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
    parts.append("<h2>Configuration</h2><pre>" + html.escape(config_text) + "</pre>")
    parts.append(
        "<p class='muted'>Full results: results.csv (one row per cell and method); "
        "reliability bins and per-layer data: details.json.</p></body></html>"
    )
    return atomic_write_text(run / "report.html", "\n".join(parts))
