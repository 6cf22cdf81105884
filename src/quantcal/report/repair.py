"""The report's repair section: accuracy, ECE and ECE after temperature scaling per
quantization method and precision (``details.json["repair"]``, :mod:`quantcal.findings.repair`), the
gaps to fp32 with paired intervals, and a figure of accuracy against ECE per method."""

from __future__ import annotations

import html
from typing import Any

from quantcal.findings.rows import prec_key
from quantcal.report.markup import figure_html, figure_png, pts

__all__ = ["fig_repair", "repair_section", "repair_summary"]


_CELL = ("dataset", "arch", "width", "seed", "precision", "observer", "method")


def _cell(r: dict[str, Any]) -> tuple:
    """The quantized cell a record or row belongs to (everything but the recalibrator)."""
    return tuple(r[k] for k in _CELL)


def _order(methods: list[str]):
    """Sort key: dataset, model, seed, precision (most bits first), range, method order."""
    return lambda r: (
        r["dataset"],
        r["arch"],
        r["width"],
        r["seed"],
        prec_key(r["precision"]),
        r["observer"],
        methods.index(r["method"]),
    )


def _pairs(records: list[dict[str, Any]]) -> list[tuple[dict, dict | None]]:
    """(as-is record, after-temperature record or None) per cell, in report order."""
    ts = {_cell(r): r for r in records if r["recal"] == "temperature"}
    raw = [r for r in records if r["recal"] == "none"]
    raw.sort(key=_order(list(dict.fromkeys(r["method"] for r in raw))))
    return [(r, ts.get(_cell(r))) for r in raw]


def fig_repair(records: list[dict[str, Any]]) -> bytes:
    """Accuracy (x) against ECE (y) per method and precision, as is (filled) and after
    temperature scaling (hollow), with the fp32 model as a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = _pairs(records)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    methods = list(dict.fromkeys(r["method"] for r, _ in pairs))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = {
        p: m for p, m in zip(sorted({r["precision"] for r, _ in pairs}, key=prec_key), "osD^v")
    }
    for r, t in pairs:
        c = colors[methods.index(r["method"]) % len(colors)]
        mk = markers.get(r["precision"], "o")
        ax.scatter(100 * r["accuracy"], 100 * r["ece"], color=c, marker=mk, s=36)
        if t is not None:
            ax.scatter(
                100 * t["accuracy"],
                100 * t["ece"],
                facecolors="none",
                edgecolors=c,
                marker=mk,
                s=36,
            )
    if pairs:
        r0 = pairs[0][0]
        ax.scatter(
            100 * r0["fp32_accuracy"],
            100 * r0["fp32_ece"],
            marker="*",
            s=120,
            color="black",
            label="fp32",
        )
    for i, m in enumerate(methods):
        ax.scatter([], [], color=colors[i % len(colors)], label=m)
    for p, mk in markers.items():
        ax.scatter([], [], color="gray", marker=mk, label=p)
    ax.set_xlabel("accuracy (%)")
    ax.set_ylabel("ECE (%); hollow: after temperature scaling")
    ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return figure_png(fig)


def repair_section(details: dict[str, Any]) -> tuple[str, list]:
    """The repair's HTML and figures; empty when the study has one quantization method."""
    records = details.get("repair", [])
    if not records:
        return "", []
    parts = [
        "<h2>Repair: does better quantization restore calibration, or only accuracy?</h2>"
        "<p class='muted'>Each quantization method at each precision and range estimator, "
        "scored on the same test images: accuracy and ECE as is and after temperature scaling, "
        "the gap to fp32 and the change over min-max PTQ (points, 95 % paired bootstrap "
        "intervals). Read ECE beside accuracy: a collapsed model can look calibrated at "
        "chance.</p>"
    ]
    head = "".join(
        f"<th>{h}</th>"
        for h in (
            "model",
            "precision",
            "range",
            "method",
            "accuracy %",
            "accuracy vs ptq",
            "ECE %",
            "ECE gap to fp32",
            "ECE % after TS",
            "gap to fp32 after TS",
        )
    )
    body = []
    for r, t in _pairs(records):
        vs = r.get("accuracy_vs_ptq")
        cells = [
            f"{r['arch']}@{r['width']:g}",
            r["precision"],
            r["observer"],
            r["method"],
        ]
        body.append(
            "<tr>"
            + "".join(f"<td class='text'>{html.escape(str(x))}</td>" for x in cells)
            + f"<td>{100 * r['accuracy']:.1f}</td><td>{pts(vs) if vs else '–'}</td>"
            + f"<td>{100 * r['ece']:.1f}</td><td>{pts(r['ece_gap'])}</td>"
            + (
                f"<td>{100 * t['ece']:.1f}</td><td>{pts(t['ece_gap'])}</td>"
                if t
                else "<td>–</td><td>–</td>"
            )
            + "</tr>"
        )
    first = records[0]
    ts = next((r for r in records if r["recal"] == "temperature"), None)
    after = f", {100 * ts['fp32_ece']:.1f} % after temperature scaling" if ts else ""
    parts.append(
        f"<p>fp32: accuracy {100 * first['fp32_accuracy']:.1f} %, ECE "
        f"{100 * first['fp32_ece']:.1f} % as is{after}.</p>"
        f"<table><tr>{head}</tr>{''.join(body)}</table>"
    )
    caption = "Accuracy against ECE per quantization method (filled: as is; hollow: after TS)"
    png = fig_repair(records)
    parts.append(figure_html(caption, png))
    return "\n".join(parts), [("repair", caption, png)]


def repair_summary(rows: list[dict]) -> str:
    """A terminal table of accuracy, ECE and ECE after TS per method and precision (range
    sample 0); empty when the rows have one quantization method."""
    good = [
        r
        for r in rows
        if r.get("status") == "ok"
        and (r.get("method") or "-") != "-"
        and r.get("ptq_sample") in (0, 0.0)
    ]
    methods = list(dict.fromkeys(r["method"] for r in good))
    if len(methods) < 2:
        return ""
    head = (
        f"{'model':<22} {'prec':<6} {'range':<10} {'method':<10} {'acc%':>6} {'ECE%':>6} {'+TS':>6}"
    )
    lines = ["", "quantization methods (range-calibration sample 0):", head, "-" * len(head)]
    ts = {_cell(t): t for t in good if t["recal"] == "temperature"}
    for r in sorted((r for r in good if r["recal"] == "none"), key=_order(methods)):
        t = ts.get(_cell(r))
        model = f"{r['arch']}@{float(r['width']):g}"
        lines.append(
            f"{model:<22} {r['precision']:<6} {r['observer']:<10} {r['method']:<10} "
            f"{100 * r['accuracy']:>6.1f} {100 * r['ece']:>6.1f} "
            f"{(format(100 * t['ece'], '6.1f') if t else '–'):>6}"
        )
    return "\n".join(lines)
