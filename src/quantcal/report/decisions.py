"""The report's decisions section (issue #25): what the confidence of each precision is worth
for the decisions a deployer makes with it.

- the abstention threshold carried from fp32 (the ``threshold_*`` columns): its test risk and
  coverage as is and after temperature scaling, and re-set on the quantized model's own
  validation logits, with the outcome;
- risk–coverage curves, fp32 against each quantized precision (``details.json`` ``risk_coverage``);
- ECE and AURC against corruption severity per precision, mean over the corruption types
  (the rows whose ``shift`` is a corruption);
- unknown-input detection per precision and set (``details.json`` ``ood``).
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

from quantcal.findings.rows import (
    clean_rows,
    dataset_label,
    main_rows,
    model_label,
    pct,
    prec_key,
    shifted_rows,
)
from quantcal.report.markup import figure_png, html_table

__all__ = [
    "decisions_section",
    "fig_risk_coverage",
    "fig_severity",
    "ood_table",
    "threshold_table",
]


def _num(x: Any, digits: int = 1) -> str:
    return pct(x, digits) if isinstance(x, (int, float)) else "–"


def _threshold(t: Any) -> str:
    if not isinstance(t, (int, float)) or math.isnan(t):
        return "–"
    return "none reaches it" if math.isinf(t) else f"{t:.3f}"


def threshold_table(rows: list[dict], target: float | None) -> str:
    """One line per model, precision and recalibrator (none, temperature) of the clean rows."""
    pick = [
        r
        for r in main_rows(clean_rows(rows))
        if r.get("recal") in ("none", "temperature") and r.get("threshold_outcome")
    ]
    pick.sort(
        key=lambda r: (r["dataset"], model_label(r), prec_key(r["precision"]), r["recal"] != "none")
    )
    body = [
        [
            dataset_label(r["dataset"]),
            model_label(r),
            r["precision"],
            "as is" if r["recal"] == "none" else "after temperature scaling",
            _threshold(r.get("threshold")),
            _num(r.get("threshold_risk")),
            _num(r.get("threshold_coverage")),
            _num(r.get("threshold_reset_risk")),
            _num(r.get("threshold_reset_coverage")),
            r["threshold_outcome"],
        ]
        for r in pick
    ]
    if not body:
        return ""
    goal = f"{100 * target:g} %" if target is not None else "the study's target risk"
    return (
        "<h3>The abstention threshold, carried from fp32</h3>"
        f"<p class='muted'>A threshold on confidence is set on the fp32 model's validation "
        f"logits (recalibrated like the row) so that at most {goal} of the accepted images are "
        "wrong; below it the device abstains. Each line gives what that threshold does on this "
        "precision's test images (risk: error rate among accepted; coverage: share accepted), "
        "and what a threshold re-set on this precision's own validation logits does. "
        "Validation and test are different images, so even fp32 can miss its target by "
        "sampling noise: read the fp32 lines first.</p>"
        + html_table(
            [
                "dataset",
                "model",
                "precision",
                "confidence",
                "fp32 threshold",
                "risk %",
                "coverage %",
                "re-set: risk %",
                "re-set: coverage %",
                "outcome",
            ],
            body,
            "thresholds",
        )
    )


def _colors(precisions: list[str]) -> dict[str, str]:
    """One colour per precision, the same in every figure of the section: fp32 black, the
    quantized precisions in plan order from matplotlib's cycle."""
    import matplotlib.pyplot as plt

    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    quantized = [p for p in sorted(set(precisions), key=prec_key) if p != "fp32"]
    return {"fp32": "black", **{p: cycle[i % len(cycle)] for i, p in enumerate(quantized)}}


def fig_risk_coverage(rows: list[dict], details: dict[str, Any], ds: str, model: str) -> bytes:
    """Risk against coverage for fp32 and each quantized precision of one model, as is."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = details.get("risk_coverage", {})
    mine = [
        r
        for r in main_rows(clean_rows(rows))
        if r["dataset"] == ds and model_label(r) == model and r.get("recal") == "none"
    ]
    mine.sort(key=lambda r: (r["precision"] == "fp32", prec_key(r["precision"])))  # fp32 on top
    colors = _colors([r["precision"] for r in mine])
    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    for r in mine:
        c = curves.get(r.get("row_id"))
        if not c:
            continue
        fp32 = r["precision"] == "fp32"
        style = {"color": colors[r["precision"]], "lw": 1.2 if fp32 else 1.6}
        if fp32:
            style["ls"] = "--"
        ax.plot(
            [100 * x for x in c["coverage"]],
            [100 * y for y in c["risk"]],
            label=r["precision"],
            **style,
        )
    ax.set_xlabel("coverage: share of test images accepted (%)")
    ax.set_ylabel("risk: error among accepted (%)")
    ax.set_xlim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return figure_png(fig)


def _by_severity(rows: list[dict], metric: str) -> dict[str, dict[int, float]]:
    """precision -> severity -> mean of ``metric`` over the corruption types (0 = clean)."""
    out: dict[str, dict[int, list[float]]] = {}
    for r in rows:
        sev = 0 if (r.get("shift") or "clean") == "clean" else int(r["shift"].rsplit(":", 1)[1])
        v = r.get(metric)
        if isinstance(v, (int, float)) and not math.isnan(v):
            out.setdefault(r["precision"], {}).setdefault(sev, []).append(v)
    return {p: {s: sum(v) / len(v) for s, v in d.items()} for p, d in out.items()}


def fig_severity(rows: list[dict], ds: str, model: str) -> bytes:
    """ECE and AURC against severity (0 = clean) per precision, as is (solid) and after
    temperature scaling (dashed), each point the mean over the corruption types."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mine = [r for r in main_rows(rows) if r["dataset"] == ds and model_label(r) == model]
    fig, axes = plt.subplots(1, 2, figsize=(9.6, 3.6))
    precs = sorted(
        {r["precision"] for r in mine if not r["precision"].startswith("plan:")}, key=prec_key
    )
    colors = _colors(precs)
    for ax, metric in zip(axes, ("ece", "aurc"), strict=True):
        for recal, dash in (("none", "-"), ("temperature", "--")):
            curves = _by_severity([r for r in mine if r.get("recal") == recal], metric)
            for p in precs:
                pts_ = sorted(curves.get(p, {}).items())
                if len(pts_) < 2:
                    continue
                ax.plot(
                    [s for s, _ in pts_],
                    [100 * v for _, v in pts_],
                    dash,
                    marker="o",
                    ms=3,
                    color=colors[p],
                    label=p if recal == "none" else None,
                )
        ax.set_xlabel("corruption severity (0 = clean; mean over types)")
        ax.set_ylabel(f"{metric.upper()} (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return figure_png(fig)


def ood_table(details: dict[str, Any]) -> str:
    """Unknown-input detection per model, precision and set: AUROC and FPR95 of MSP as is and
    after temperature scaling, and of the energy score, with MSP's change vs fp32."""
    recs = [r for r in details.get("ood", []) if "error" not in r]
    if not recs:
        return ""
    first = {}
    for r in recs:
        first.setdefault((r["dataset"], r["arch"], r["width"], r["precision"]), r["observer"])
    index = {
        (
            r["dataset"],
            r["arch"],
            r["width"],
            r["seed"],
            r["precision"],
            r["ood_set"],
            r["recal"],
            r["score"],
        ): r
        for r in recs
        if r["observer"] == first[(r["dataset"], r["arch"], r["width"], r["precision"])]
        and r.get("ptq_sample") in (-1, 0)
    }
    cells = sorted(
        {k[:6] for k in index}, key=lambda k: (k[0], k[1], k[2], k[3], k[5], prec_key(k[4]))
    )

    def get(k: tuple, recal: str, score: str) -> dict | None:
        return index.get((*k, recal, score))

    body = []
    for k in cells:
        msp, ts, energy = (
            get(k, "none", "msp"),
            get(k, "temperature", "msp"),
            get(k, "none", "energy"),
        )
        diff = "–"
        if msp and msp.get("auroc_diff_vs_fp32_lo") is not None and k[4] != "fp32":
            lo, hi = msp["auroc_diff_vs_fp32_lo"], msp["auroc_diff_vs_fp32_hi"]
            diff = f"{100 * msp['auroc_diff_vs_fp32']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"
        body.append(
            [
                f"{k[1]}@{k[2]:g}",
                k[4],
                k[5],
                _num(msp and msp["auroc"]),
                _num(msp and msp["fpr95"]),
                diff,
                _num(ts and ts["auroc"]),
                _num(energy and energy["auroc"]),
                _num(energy and energy["fpr95"]),
            ]
        )
    return (
        "<h3>Unknown inputs</h3><p class='muted'>How well the confidence tells test images from "
        "images of no known class: AUROC (50 % = chance) and the share of unknown images "
        "accepted when 95 % of test images are (FPR95), for the maximum softmax probability "
        "(MSP; Hendrycks &amp; Gimpel 2017) as is and after temperature scaling, and for the "
        "energy score (Liu et al. 2020). Every row also in ood.csv, with max logit and each "
        "recalibrator.</p>"
        + html_table(
            [
                "model",
                "precision",
                "unknown set",
                "MSP AUROC %",
                "MSP FPR95 %",
                "MSP AUROC vs fp32 (points)",
                "MSP AUROC % after TS",
                "energy AUROC %",
                "energy FPR95 %",
            ],
            body,
        )
    )


def decisions_section(
    rows: list[dict], details: dict[str, Any], target: float | None = None
) -> tuple[str, list[tuple[str, str, bytes]]]:
    """The section's HTML and its figures ``(name, caption, png)``; ``rows`` are every row,
    clean and shifted. Empty when the rows carry no selective-prediction columns."""
    from quantcal.report.markup import figure_html

    clean = main_rows(clean_rows(rows))
    if not any(r.get("aurc") is not None for r in clean):
        return "", []
    parts = [
        "<h2>Decisions: abstaining, corrupted inputs, unknown inputs</h2>",
        "<p class='muted'>A deployer acts on confidence: below a threshold the device abstains "
        "or asks a person; cameras deliver noisy, blurred or compressed images; some inputs "
        "belong to no known class. AURC is the area under the risk–coverage curve (lower is "
        "better; Geifman et al. 2019); excess AURC subtracts that of a perfect ranking at the "
        "same accuracy.</p>",
    ]
    figs: list[tuple[str, str, bytes]] = []
    table = threshold_table(rows, target)
    if table:
        parts.append(table)
    models = list(dict.fromkeys((r["dataset"], model_label(r)) for r in clean))
    shifted = [r for r in shifted_rows(rows) if r.get("status") == "ok"]
    for ds, model in models:
        tag = hashlib.sha256(f"{ds}\0{model}".encode()).hexdigest()[:8]
        caption = f"Risk–coverage curves: {dataset_label(ds)} / {model}, as is (no recalibration)"
        png = fig_risk_coverage(rows, details, ds, model)
        figs.append((f"risk_coverage_{tag}", caption, png))
        parts.append(figure_html(caption, png))
        if any(r["dataset"] == ds and model_label(r) == model for r in shifted):
            caption = (
                f"ECE and AURC against corruption severity: {dataset_label(ds)} / {model}; solid "
                "as is, dashed after a temperature fitted on clean validation images; each "
                "point the mean over the corruption types of the study"
            )
            mine = [r for r in rows if r["dataset"] == ds and model_label(r) == model]
            png = fig_severity(mine, ds, model)
            figs.append((f"severity_{tag}", caption, png))
            parts.append(figure_html(caption, png))
    parts.append(ood_table(details))
    return "\n".join(p for p in parts if p), figs
