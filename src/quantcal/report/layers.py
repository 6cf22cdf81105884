"""The report's architecture sections: the controlled ablation (``details.json["ablation"]``,
:mod:`quantcal.findings.ablation`) and the per-layer attribution of calibration loss
(``details.json["attribution"]``, :mod:`quantcal.quant.attribution`)."""

from __future__ import annotations

import html
from typing import Any

from quantcal.findings.rows import prec_key
from quantcal.report.markup import figure_html, figure_png, pts

__all__ = ["ablation_section", "attribution_section", "fig_ablation", "fig_attribution"]

#: Colours of the layer kinds in the attribution figure.
_KIND_COLOURS = {
    "depthwise conv": "tab:red",
    "pointwise conv": "tab:blue",
    "grouped conv": "tab:purple",
    "linear": "tab:green",
    "block": "tab:gray",
}
TOP = 10


# ----------------------------------------------------------------------------- ablation


def _order(r: dict[str, Any]) -> int:
    """The family's order of variants (ABLATION_VARIANTS), unknown ones last."""
    from quantcal.models.ablation import ABLATION_VARIANTS

    names = list(ABLATION_VARIANTS)
    return names.index(r["variant"]) if r["variant"] in names else len(names)


def fig_ablation(records: list[dict[str, Any]]) -> bytes:
    """Forest plot: per property (one row per variant), the ECE-rise and accuracy-drop contrasts
    against the base with their paired intervals, one marker per precision."""
    from matplotlib.figure import Figure

    variants = sorted(
        dict.fromkeys(r["variant"] for r in records), key=lambda v: _order({"variant": v})
    )
    precs = sorted({r["precision"] for r in records}, key=prec_key)
    fig = Figure(figsize=(9, 0.45 * len(variants) + 1.4), dpi=110, layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    markers = "osD^v"
    for ax, key, title in (
        (axes[0], "ece_rise", "ECE rise vs base (points)"),
        (axes[1], "accuracy_drop", "accuracy drop vs base (points)"),
    ):
        for j, p in enumerate(precs):
            for i, v in enumerate(variants):
                rs = [r for r in records if r["variant"] == v and r["precision"] == p]
                if not rs:
                    continue
                c = rs[0][key]["contrast"]
                y = i + (j - (len(precs) - 1) / 2) * 0.18
                ax.errorbar(
                    [100 * c["value"]],
                    [y],
                    xerr=[[100 * (c["value"] - c["lo"])], [100 * (c["hi"] - c["value"])]],
                    fmt=markers[j % len(markers)],
                    color=f"C{j}",
                    label=p if i == 0 else None,
                    capsize=2,
                )
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    labels = []
    for v in variants:
        r = next(r for r in records if r["variant"] == v)
        labels.append(f"{r['property']}: {r['base_value']} → {r['value']}")
    axes[0].set_yticks(range(len(variants)), labels, fontsize=8)
    axes[0].invert_yaxis()
    axes[1].legend(fontsize=7, loc="best")
    fig.suptitle(
        "Ablation: how much more each property loses than the base (> 0: more)", fontsize=10
    )
    return figure_png(fig)


def ablation_section(details: dict[str, Any]) -> tuple[str, list]:
    """The ablation's HTML (a table per recalibrator and a forest plot) and figures; empty when
    the study has no ablation pair."""
    records = details.get("ablation", [])
    if not records:
        return "", []
    parts = [
        "<h2>Ablation: which property makes a net fragile</h2><p class='muted'>Each variant "
        "changes one property of ablation_base at matched parameters and MACs. A contrast is "
        "the variant's change under quantization minus the base's (ECE rise, accuracy drop; "
        "points), with a 95 % paired bootstrap interval over the shared test images: above 0, "
        "the property makes the net more fragile. Intervals hold the test-set noise of one "
        "training run per seed, not the training variance.</p>"
    ]
    figs = []
    for recal in ("none", "temperature"):
        rs = [r for r in records if r["recal"] == recal]
        if not rs:
            continue
        rs.sort(key=lambda r: (r["dataset"], r["seed"], prec_key(r["precision"]), _order(r)))
        body = "".join(
            "<tr>"
            + "".join(
                f"<td class='text'>{html.escape(str(x))}</td>"
                for x in (
                    r["dataset"],
                    r["seed"],
                    r["precision"],
                    f"{r['property']}: {r['base_value']} → {r['value']}",
                )
            )
            + f"<td>{pts(r['ece_rise']['variant'])}</td>"
            + f"<td>{pts(r['ece_rise']['base'])}</td>"
            + f"<td><b>{pts(r['ece_rise']['contrast'])}</b></td>"
            + f"<td>{pts(r['accuracy_drop']['contrast'])}</td></tr>"
            for r in rs
        )
        head = "".join(
            f"<th>{h}</th>"
            for h in (
                "dataset",
                "seed",
                "precision",
                "property",
                "variant's ECE rise",
                "base's ECE rise",
                "ECE-rise contrast",
                "accuracy-drop contrast",
            )
        )
        what = "as is" if recal == "none" else "after temperature scaling"
        parts.append(f"<h3>ECE {what}</h3><table><tr>{head}</tr>{body}</table>")
        if recal == "none":
            caption = "Ablation contrasts against the base (raw ECE), 95 % paired intervals"
            png = fig_ablation(rs)
            figs.append(("ablation", caption, png))
            parts.append(figure_html(caption, png))
    return "\n".join(parts), figs


# ----------------------------------------------------------------------------- attribution


def fig_attribution(recs: list[dict[str, Any]]) -> bytes:
    """Per model (one panel each, at its lowest attributed precision): the top layers by NLL
    rise when quantized alone (bars, coloured by layer kind) and the NLL given back when that
    layer alone stays in fp32 (black ticks)."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    cols = 1 if len(recs) <= 3 else 2
    rows = -(-len(recs) // cols)
    fig = Figure(figsize=(9 * cols, 2.6 * rows + 0.6), dpi=110, layout="constrained")
    grid = fig.subplots(rows, cols, squeeze=False)
    axes = list(grid.flat)
    for ax in axes[len(recs) :]:
        ax.set_visible(False)
    kinds_seen: dict[str, str] = {}
    for ax, rec in zip(axes, recs):
        groups = sorted(rec["groups"], key=lambda g: -_num(g["alone_nll"]))[:TOP]
        names = [g["name"] for g in groups]
        colours = []
        for g in groups:
            c = _KIND_COLOURS.get(g["kind"], "tab:orange")  # dense convs: orange
            kinds_seen[g["kind"]] = c
            colours.append(c)
        ax.barh(range(len(groups)), [_num(g["alone_nll"]) for g in groups], color=colours)
        ax.scatter(
            [_num(g["recovery_nll"]) for g in groups],
            range(len(groups)),
            marker="|",
            color="black",
            s=120,
            zorder=3,
        )
        ax.set_yticks(range(len(groups)), names, fontsize=7)
        ax.invert_yaxis()
        ax.set_title(
            f"{rec['arch']}@{float(rec['width']):g} {rec['precision']} ({rec['dataset']}, "
            f"{rec['n_samples']} val images): whole model ΔNLL "
            f"{rec['quantized']['nll'] - rec['fp32']['nll']:+.3f}",
            fontsize=9,
        )
        ax.set_xlabel("ΔNLL (nats): bar = this layer alone quantized; | = given back by fp32")
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(alpha=0.3, axis="x")
    fig.legend(
        handles=[Patch(color=c, label=k) for k, c in kinds_seen.items()],
        loc="outside lower center",
        ncols=min(6, len(kinds_seen)),
        fontsize=7,
    )
    return figure_png(fig)


def _num(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and v == v else 0.0


def attribution_section(details: dict[str, Any], top: int = 5) -> tuple[str, list]:
    """The attribution's HTML (the top layers per model and precision, the share by layer kind,
    a figure) and figures; empty when the study attributed nothing."""
    recs = details.get("attribution", [])
    if not recs:
        return "", []
    parts = [
        "<h2>Which layers decide calibration</h2><p class='muted'>Each quantized layer (or "
        "block) alone quantized, the rest in fp32: the rise of validation NLL, ECE (points) and "
        "accuracy (points) against fp32. And the reverse: everything quantized but that layer; "
        "'given back' is how much of the whole model's loss keeping it in fp32 recovers. "
        "Measured on validation images, never the test split.</p>"
    ]
    errors = [r for r in recs if "error" in r]
    for r in errors:
        parts.append(
            f"<p class='warn'>Attribution of {html.escape(r['arch'])} {html.escape(r['precision'])}"
            f" failed: {html.escape(r['error'])}</p>"
        )
    good = [r for r in recs if "groups" in r]
    head = "".join(
        f"<th>{h}</th>"
        for h in (
            "model",
            "precision",
            "layer",
            "kind",
            "ΔNLL alone",
            "ΔECE alone",
            "Δacc alone",
            "NLL given back",
            "ECE given back",
        )
    )
    body = []
    for r in sorted(good, key=lambda r: (r["dataset"], r["arch"], prec_key(r["precision"]))):
        ranked = sorted(r["groups"], key=lambda g: -_num(g["alone_nll"]))[:top]
        for i, g in enumerate(ranked):
            model = f"{r['arch']}@{float(r['width']):g}" if i == 0 else ""
            body.append(
                "<tr>"
                + f"<td class='text'>{html.escape(model)}</td>"
                + f"<td class='text'>{html.escape(r['precision'] if i == 0 else '')}</td>"
                + f"<td class='text'>{html.escape(g['name'])}</td>"
                + f"<td class='text'>{html.escape(g['kind'])}</td>"
                + f"<td>{_num(g['alone_nll']):+.3f}</td>"
                + f"<td>{100 * _num(g['alone_ece']):+.2f}</td>"
                + f"<td>{100 * _num(g['alone_accuracy']):+.2f}</td>"
                + f"<td>{_num(g['recovery_nll']):+.3f}</td>"
                + f"<td>{100 * _num(g['recovery_ece']):+.2f}</td></tr>"
            )
    if body:
        parts.append(f"<table><tr>{head}</tr>{''.join(body)}</table>")
    figs = []
    lowest = {}
    for r in good:
        k = (r["dataset"], r["arch"], r["width"], r["seed"])
        if k not in lowest or prec_key(r["precision"]) > prec_key(lowest[k]["precision"]):
            lowest[k] = r
    if lowest:
        chosen = list(lowest.values())
        caption = (
            f"Top {TOP} layers by NLL rise when quantized alone, each model at its lowest "
            "attributed precision"
        )
        png = fig_attribution(chosen)
        figs.append(("attribution", caption, png))
        parts.append(figure_html(caption, png))
    return "\n".join(parts), figs
