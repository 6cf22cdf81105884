"""The report's "why recalibration fails" section, from ``details.json["diagnostics"]``.

For every quantized cell whose best recalibrator stays above the fp32 model's best ECE + the
budget (:mod:`quantcal.verdicts`), it shows what :mod:`quantcal.diagnose` measured: how much of
the miscalibration is accuracy collapse and how much confidence distortion, which fp32-confidence
groups the flipped predictions come from, both confidence histograms, the validation NLL as a
function of the temperature, and what each recalibrator reaches, with debiased ECE beside binned
ECE.
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any

from quantcal._rows import aggregate, main_rows, model_label, pct, pick
from quantcal.verdicts import Budget, Verdict, verdicts

__all__ = ["failing_cells", "fig_why", "why_section"]


def failing_cells(rows: list[dict], budget: Budget) -> list[Verdict]:
    """The verdicts whose lowest ECE, raw or after any recalibrator, stays above the fp32
    model's best ECE + ``max_ece_rise``."""
    out = []
    for v in verdicts(rows, budget):
        reached = min(x for x in (v.ece.value, v.best_ece.value) if x is not None)
        if reached is not None and reached > v.fp32_best_ece.value + budget.max_ece_rise:
            out.append(v)
    return out


def _diagnostic(details: dict, rows: list[dict], v: Verdict) -> dict[str, Any] | None:
    """The first seed's diagnostics of the verdict's cell."""
    for d in details.get("diagnostics", []):
        label = model_label(
            {"arch": d["arch"], "width": float(d["width"]), "objective": d.get("objective")}
        )
        if (d["dataset"], label, d["precision"]) == (v.dataset, v.model, v.precision):
            return d
    return None


def fig_why(d: dict[str, Any], title: str) -> bytes:
    """Two panels: confidence histograms (fp32 vs quantized, share of images per bin) and the
    quantized model's NLL against the temperature on the recalibration split."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.1), dpi=110, layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    n_bins = len(d["histogram_q"])
    centers = [(i + 0.5) / n_bins for i in range(n_bins)]
    for hist, label, color in (
        (d["histogram_fp32"], "fp32", "tab:gray"),
        (d["histogram_q"], d["precision"], "tab:red"),
    ):
        total = sum(hist) or 1
        ax1.step(
            centers,
            [max(100 * h / total, 0.05) for h in hist],  # an empty bin sits on the floor
            where="mid",
            label=label,
            color=color,
            linewidth=1.8,
        )
    ax1.set_xlim(0, 1)
    ax1.set_yscale("log")
    ax1.set_ylim(0.05, 100)
    ax1.set_xlabel("top-label confidence")
    ax1.set_ylabel("share of test images (%), log scale")
    ax1.set_title("confidence distribution")
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3)
    ax2.plot(d["temperatures"], d["nll"], color="tab:red")
    ax2.set_xscale("log")
    ax2.axvline(1.0, color="tab:gray", linestyle=":", label="T = 1 (as is)")
    ax2.axvline(d["t_star"], color="tab:red", linestyle="--", label=f"T* = {d['t_star']:.3g}")
    ax2.set_yscale("log")
    ax2.set_xlabel("temperature T (log scale)")
    ax2.set_ylabel(f"NLL on {d['fit_split']} (log scale)")
    ax2.set_title("NLL of softmax(z / T)")
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _decomposition(g: dict[str, float], precision: str) -> str:
    """The gap change as its accuracy and confidence terms (see ``diagnose.gap_decomposition``),
    with what they say."""
    acc, conf = g["accuracy_term"], g["confidence_term"]
    rise = g["gap_q"] - g["gap_fp32"]
    if acc > 0.02 and -conf < 0.5 * acc:
        lead = (
            "Confidence did not follow accuracy down: the quantized model is wrong more often "
            "with much the same confidence (accuracy collapse)."
        )
    elif conf > 0.02:
        lead = "Quantization raised the confidences themselves (confidence distortion)."
    elif conf < -0.02 and g["gap_q"] < 0:
        lead = "Confidence fell further than accuracy: the quantized model is under-confident."
    else:
        lead = (
            "The mean gap hardly moved: what is left is in how confidence is spread over right "
            "and wrong predictions, which one temperature cannot reorder."
        )
    return (
        f"Mean confidence − accuracy went from {pct(g['gap_fp32'])} (fp32) to "
        f"{pct(g['gap_q'])} points ({precision}), a change of {100 * rise:+.1f} = accuracy term "
        f"{100 * acc:+.1f} (accuracy {pct(g['accuracy_fp32'])} → {pct(g['accuracy_q'])} %) + "
        f"confidence term {100 * conf:+.1f} (mean confidence {pct(g['confidence_fp32'])} → "
        f"{pct(g['confidence_q'])} %). {lead}"
    )


def _flips_table(flips: list[dict[str, float]]) -> str:
    head = "".join(
        f"<th>{h}</th>"
        for h in (
            "fp32 confidence",
            "share of images %",
            "prediction changed %",
            "right → wrong %",
            "wrong → right %",
        )
    )
    body = "".join(
        f"<tr><td>[{f['lo']:.1f}, {f['hi']:.1f}{']' if f['hi'] == 1.0 else ')'}</td>"
        f"<td>{pct(f['share'])}</td><td>{pct(f['flipped'])}</td>"
        f"<td>{pct(f['right_to_wrong'])}</td><td>{pct(f['wrong_to_right'])}</td></tr>"
        for f in flips
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _recal_table(rows: list[dict], v: Verdict) -> str:
    cell = pick(main_rows(rows), dataset=v.dataset, model=v.model, precision=v.precision)
    body = []
    for method in dict.fromkeys(r["recal"] for r in cell):
        rs = [r for r in cell if r["recal"] == method]
        ece, deb = aggregate(rs, "ece"), aggregate(rs, "debiased_ece")
        l2, smooth = aggregate(rs, "ece_l2"), aggregate(rs, "smooth_ece")
        acc = aggregate(rs, "accuracy")
        temps = [r["temperature"] for r in rs if r.get("temperature") is not None]
        body.append(
            f"<tr><td>{html.escape(method)}</td><td>{ece.text()}</td><td>{pct(smooth.value)}</td>"
            f"<td>{pct(l2.value)}</td><td>{pct(deb.value)}</td>"
            f"<td>{acc.text()}</td><td>{f'{sum(temps) / len(temps):.3g}' if temps else '–'}</td>"
            "</tr>"
        )
    head = "".join(
        f"<th>{h}</th>"
        for h in (
            "recalibrator",
            "ECE % (binned, l1)",
            "smooth ECE %",
            "binned l2 ECE %",
            "debiased l2 ECE %",
            "accuracy %",
            "T",
        )
    )
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _nll_sentence(d: dict[str, Any]) -> str:
    """NLL as is (T = 1) and at the best temperature, and how sharp that optimum is."""
    temps = d["temperatures"]
    at_one = d["nll"][min(range(len(temps)), key=lambda i: abs(temps[i] - 1.0))]
    rise = d["nll_rise_at_1.5x"]
    shape = (
        "a flat optimum: temperatures around T* fit about as well, so T* is loosely determined"
        if rise < 0.02 * d["nll_star"]
        else "a sharp optimum: T* is well determined"
    )
    return (
        f"On {d['fit_split']}, NLL is {at_one:.3f} as is (T = 1) and lowest, "
        f"{d['nll_star']:.3f}, at T* = {d['t_star']:.3g} (+{rise:.3f} at T*·1.5 or T*/1.5: "
        f"{shape}). A temperature rescales every confidence alike; what it cannot fix is the "
        "ECE left after it, in the table below."
    )


def why_section(rows: list[dict], details: dict, budget: Budget) -> tuple[str, list]:
    """The section's HTML and its figures ``[(name, caption, png)]``; empty when every cell's
    confidence can be repaired."""
    cells = failing_cells(rows, budget)
    if not cells:
        return "", []
    parts = [
        "<h2>Why recalibration fails</h2><p class='muted'>Cells whose best recalibrator stays "
        f"more than {100 * budget.max_ece_rise:g} point(s) above the fp32 model's best ECE. "
        "Diagnostics are for the first seed. The debiased l2 ECE (Kumar et al. 2019) is beside "
        "the plug-in binned l2 ECE on the same bins: where it is much lower, part of the binned "
        "value is the estimator's bias (few, noisy images per bin, as at low accuracy), not "
        "miscalibration. Smooth ECE (Błasiok & Nakkiran 2023) needs no bins.</p>"
    ]
    figs = []
    for v in cells:
        d = _diagnostic(details, rows, v)
        parts.append(f"<h3>{html.escape(f'{v.dataset} / {v.model} {v.precision}')}</h3>")
        if d is None:
            parts.append(
                "<p>No diagnostics recorded for this cell (its logits were not cached).</p>"
            )
            parts.append(_recal_table(rows, v))
            continue
        parts.append(f"<p>{html.escape(_decomposition(d['gap'], v.precision))}</p>")
        parts.append(
            "<p>Where the predictions that quantization changed come from, by the fp32 model's "
            "confidence in them:</p>" + _flips_table(d["flips"])
        )
        parts.append(f"<p>{html.escape(_nll_sentence(d))}</p>")
        parts.append(_recal_table(rows, v))
        caption = (
            f"{v.dataset} / {v.model} {v.precision}: confidence histograms and NLL vs temperature"
        )
        png = fig_why(d, f"{v.model} {v.precision}")
        name = f"why_{len(figs)}"
        figs.append((name, caption, png))
        b64 = base64.b64encode(png).decode()
        parts.append(
            f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,{b64}'>"
            f"<figcaption class='muted'>{html.escape(caption)}</figcaption></figure>"
        )
    return "\n".join(parts), figs
