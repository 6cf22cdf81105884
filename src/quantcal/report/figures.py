"""The report's figures, each drawn from result rows (and details.json) into PNG bytes:
ECE and accuracy vs precision (the study's Figure 1), reliability before and after temperature
scaling, the gain of each recalibrator, accuracy vs ECE, and the per-layer view of the worst
cell. ``report.write_report`` embeds them."""

from __future__ import annotations

import io
import math
from typing import Any

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

__all__ = [
    "fig_acc_vs_ece",
    "fig_layers",
    "fig_precision",
    "fig_recal_gain",
    "fig_reliability",
    "worst_inspect",
]


def _figure(w: float, h: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), dpi=110, layout="constrained")


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _cell_estimates(rows: list[dict], key: str) -> tuple[float, float, float]:
    """(value, lower error, upper error) in percent over the seeds of one cell."""
    e = aggregate(rows, key)
    if e.value is None:
        return math.nan, 0.0, 0.0
    lo = 100 * max(0.0, e.value - e.lo) if e.lo is not None else 0.0
    hi = 100 * max(0.0, e.hi - e.value) if e.hi is not None else 0.0
    return 100 * e.value, lo, hi


def _needs_log(values: list[float]) -> bool:
    """True when one value dwarfs the rest (max over median above 8): a log axis then keeps the
    small ones readable."""
    v = sorted(x for x in values if x == x and x > 0)
    return len(v) >= 3 and v[-1] / v[len(v) // 2] > 8


def fig_precision(rows: list[dict]) -> bytes:
    """The study's Figure 1: accuracy and ECE vs precision per architecture and dataset, both
    with their intervals (seeds aggregated); the ECE axis turns logarithmic when one cell
    dwarfs the rest; the legend sits below the panels, off the lines."""
    main = main_rows(rows)
    datasets = sorted({r["dataset"] for r in main})
    precs = sorted({r["precision"] for r in main}, key=prec_key)
    fig = _figure(9, 3.0 * len(datasets) + 0.9)
    axes = fig.subplots(len(datasets), 2, squeeze=False)
    handles: dict[str, Any] = {}
    for i, ds in enumerate(datasets):
        eces: list[float] = []
        for c, (_, model) in enumerate([g for g in groups(main) if g[0] == ds]):
            color = f"C{c % 10}"
            for recal, style in (("none", "-o"), ("temperature", "--s")):
                rs = pick(main, dataset=ds, model=model, recal=recal)
                xs = [k for k, p in enumerate(precs) if pick(rs, precision=p)]
                if not xs:
                    continue
                cells = [pick(rs, precision=precs[k]) for k in xs]
                if recal == "none":
                    acc = [_cell_estimates(cell, "accuracy") for cell in cells]
                    axes[i, 0].errorbar(
                        xs,
                        [a[0] for a in acc],
                        yerr=[[a[1] for a in acc], [a[2] for a in acc]],
                        fmt=style,
                        color=color,
                        capsize=3,
                    )
                ece = [_cell_estimates(cell, "ece") for cell in cells]
                eces += [e[0] for e in ece]
                label = f"{model}{' + TS' if recal != 'none' else ''}"
                handles[label] = axes[i, 1].errorbar(
                    xs,
                    [e[0] for e in ece],
                    yerr=[[e[1] for e in ece], [e[2] for e in ece]],
                    fmt=style,
                    color=color,
                    capsize=3,
                    alpha=1.0 if recal == "none" else 0.6,
                )
        if _needs_log(eces):
            axes[i, 1].set_yscale("log")
        for ax, name in zip(axes[i], ("accuracy (%)", "ECE (%)")):
            ax.set_xticks(range(len(precs)), precs)
            ax.set_ylabel(name + (", log scale" if ax.get_yscale() == "log" else ""))
            ax.set_title(f"{dataset_label(ds)}: {name.split()[0]}", fontsize=10)
            ax.grid(alpha=0.3, which="both")
    if handles:
        fig.legend(
            list(handles.values()),
            list(handles),
            loc="outside lower center",
            ncol=min(4, len(handles)),
            fontsize=8,
        )
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
    main = main_rows(rows)
    precs = sorted({r["precision"] for r in pick(main, dataset=dataset, model=model)}, key=prec_key)
    methods = [
        m for m in ("none", "temperature") if pick(main, dataset=dataset, model=model, recal=m)
    ]
    from quantcal.report.plots import draw_reliability

    fig = _figure(3.2 * max(1, len(methods)), 2.9 * max(1, len(precs)))
    axes = fig.subplots(max(1, len(precs)), max(1, len(methods)), squeeze=False)
    for i, p in enumerate(precs):
        for j, m in enumerate(methods):
            ax = axes[i, j]
            rs = pick(main, dataset=dataset, model=model, recal=m, precision=p)
            rel = details.get("reliability", {}).get(rs[0]["row_id"]) if rs else None
            title = f"{p}, {'raw' if m == 'none' else 'after TS'}"
            if rs:
                title += f": ECE {pct(rs[0]['ece'])}%"
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
    fig.suptitle(f"{dataset_label(dataset)} / {model}: reliability", fontsize=9)
    return _png(fig)


def fig_recal_gain(rows: list[dict]) -> bytes:
    """ECE after each recalibration method for every cell: one line per cell (model and
    precision, labels written horizontally), one marker per method, seeds aggregated; the
    axis turns logarithmic when one cell dwarfs the rest."""
    main = main_rows(rows)
    methods = list(dict.fromkeys(r["recal"] for r in main))
    cells = list(dict.fromkeys((r["dataset"], model_label(r), r["precision"]) for r in main))
    cells.sort(key=lambda c: (c[0], c[1], prec_key(c[2])))
    fig = _figure(7.5, 0.9 + 0.28 * len(cells))
    ax = fig.subplots()
    markers = "o^sDvP*Xh<>"
    values = []
    for k, m in enumerate(methods):
        ys, xs = [], []
        for i, (ds, model, p) in enumerate(cells):
            rs = pick(main, dataset=ds, model=model, precision=p, recal=m)
            if rs:
                xs.append(_cell_estimates(rs, "ece")[0])
                ys.append(len(cells) - 1 - i + (k - (len(methods) - 1) / 2) * 0.08)
        values += xs
        ax.scatter(xs, ys, marker=markers[k % len(markers)], s=26, label=m, color=f"C{k % 10}")
    multi_ds = len({c[0] for c in cells}) > 1
    ax.set_yticks(
        range(len(cells)),
        [
            f"{dataset_label(ds) + ' / ' if multi_ds else ''}{model} {p}"
            for ds, model, p in reversed(cells)
        ],
        fontsize=7,
    )
    if _needs_log(values):
        ax.set_xscale("log")
    ax.set_xlabel("test ECE (%)" + (", log scale" if ax.get_xscale() == "log" else ""))
    ax.set_title("ECE after each recalibration method", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    fig.legend(loc="outside lower center", ncol=min(6, len(methods)), fontsize=8)
    return _png(fig)


def fig_acc_vs_ece(rows: list[dict]) -> bytes:
    """Accuracy against ECE for every cell (raw logits), colour by model, marker by precision."""
    raw = [r for r in ok(rows) if r["recal"] == "none"]
    markers = "osD^v<>p*h"
    precs = sorted({r["precision"] for r in raw}, key=prec_key)
    fig = _figure(5.5, 4)
    ax = fig.subplots()
    for c, (ds, model) in enumerate(groups(raw)):
        for k, p in enumerate(precs):
            rs = pick(raw, dataset=ds, model=model, precision=p)
            if rs:
                ax.scatter(
                    [100 * r["accuracy"] for r in rs],
                    [100 * r["ece"] for r in rs],
                    color=f"C{c % 10}",
                    marker=markers[k % len(markers)],
                    s=28,
                    label=f"{dataset_label(ds)}/{model}" if k == 0 else None,
                )
    for k, p in enumerate(precs):
        ax.scatter([], [], color="grey", marker=markers[k % len(markers)], label=p)
    ax.set_xlabel("test accuracy (%)")
    ax.set_ylabel("test ECE (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    ax.set_title("accuracy vs calibration error (raw)")
    return _png(fig)


def worst_inspect(rows: list[dict], details: dict) -> tuple[dict | None, dict | None]:
    """The quantized cell with the highest raw ECE that has per-layer data in ``details``, and
    that data (None, None when none has)."""
    raw = [r for r in ok(rows) if r["recal"] == "none" and r["precision"] != "fp32"]
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
                ins.get("method") or "ptq",
                ins["ptq_sample"],
            ) == (
                r["dataset"],
                r["arch"],
                r["width"],
                r.get("objective") or "ce",
                r["seed"],
                r["precision"],
                r["observer"],
                r.get("method") or "ptq",
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
    ax.set_xticks(xs, names, rotation=90, fontsize=6)
    clipped = [100 * c if c is not None else float("nan") for c in clip]
    if any(c > 0 for c in clipped if c == c):  # an axis of zeros says nothing: leave it out
        ax2 = ax.twinx()
        ax2.plot(xs, clipped, "r.", ms=4)
        ax2.set_ylabel("activation clipping (%)", color="tab:red")
    else:
        ax.text(
            0.99,
            0.97,
            "no activation clipped on the range-calibration images",
            transform=ax.transAxes,
            ha="right",
            va="top",
            fontsize=7,
            color="tab:red",
        )
    ax.set_title(
        f"per-layer sensitivity: {dataset_label(row['dataset'])} / {model_label(row)} "
        f"{row['precision']} ({row['observer']}), ECE {pct(row['ece'])}%",
        fontsize=9,
    )
    return _png(fig)
