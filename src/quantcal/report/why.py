"""The report's "why recalibration fails" section, from ``details.json["diagnostics"]``.

For every quantized cell whose lowest ECE (as is or after a usable recalibrator) stays above
the fp32 model's best ECE + ``max_ece_rise`` or above the absolute ``max_ece``
(:mod:`quantcal.findings.verdicts`), it shows what :mod:`quantcal.calibration.diagnose`
measured: how much of the miscalibration is accuracy collapse and how much confidence
distortion, which fp32-confidence groups the flipped predictions come from, both confidence
histograms, the validation NLL as a function of the temperature (with the temperature the study
fitted, the one every table prints), and what each recalibrator reaches, with debiased ECE
beside binned ECE and the notes on its fit.
"""

from __future__ import annotations

import base64
import html
import io
import math
from typing import Any

from quantcal.findings.rows import aggregate, main_rows, model_label, pct, pick
from quantcal.findings.verdicts import Budget, Verdict, repairs, verdicts

__all__ = ["failing_cells", "fig_why", "why_section"]


def failing_cells(rows: list[dict], budget: Budget) -> list[Verdict]:
    """The verdicts whose lowest ECE, raw or after the recalibrator the verdict names, stays
    above the fp32 model's best ECE + ``max_ece_rise`` or above ``max_ece``."""
    out = []
    for v in verdicts(rows, budget):
        reached = min(x for x in (v.ece.value, v.best_ece.value) if x is not None)
        line = min(v.fp32_best_ece.value + budget.max_ece_rise, budget.max_ece)
        if reached > line + 1e-12:
            out.append(v)
    return out


def fitted_temperature(rows: list[dict], v: Verdict) -> float | None:
    """The temperature the study fitted for the verdict's cell (the first seed's
    ``temperature`` row, as the diagnostics are the first seed's), or None."""
    cell = pick(main_rows(rows), dataset=v.dataset, model=v.model, precision=v.precision)
    ts = [r["temperature"] for r in cell if r["recal"] == "temperature" and r.get("temperature")]
    return float(ts[0]) if ts else None


def nll_at(d: dict[str, Any], t: float) -> float:
    """The validation NLL at ``t``, interpolated linearly in log T on the diagnostics' grid
    (clamped at its ends)."""
    temps, nll = d["temperatures"], d["nll"]
    if t <= temps[0]:
        return nll[0]
    for i in range(1, len(temps)):
        if t <= temps[i]:
            w = (math.log(t) - math.log(temps[i - 1])) / (
                math.log(temps[i]) - math.log(temps[i - 1])
            )
            return nll[i - 1] + w * (nll[i] - nll[i - 1])
    return nll[-1]


def _diagnostic(details: dict, rows: list[dict], v: Verdict) -> dict[str, Any] | None:
    """The first seed's diagnostics of the verdict's cell."""
    for d in details.get("diagnostics", []):
        label = model_label(
            {"arch": d["arch"], "width": float(d["width"]), "objective": d.get("objective")}
        )
        if (d["dataset"], label, d["precision"]) == (v.dataset, v.model, v.precision):
            return d
    return None


def fig_why(d: dict[str, Any], title: str, t_fit: float | None = None) -> bytes:
    """Two panels: confidence histograms (fp32 vs quantized, share of images per bin) and the
    quantized model's NLL against the temperature on the recalibration split, marked at the
    fitted temperature ``t_fit`` (else at the grid's lowest point, labelled as such)."""
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
    if t_fit is not None:
        ax2.axvline(t_fit, color="tab:red", linestyle="--", label=f"fitted T = {t_fit:.3g}")
    else:
        ax2.axvline(
            d["t_star"], color="tab:red", linestyle="--", label=f"grid minimum {d['t_star']:.3g}"
        )
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
    lead = _gap_lead(acc, conf, rise, g["gap_q"])
    return (
        f"Mean confidence − accuracy went from {pct(g['gap_fp32'])} (fp32) to "
        f"{pct(g['gap_q'])} points ({precision}), a change of {100 * rise:+.1f} = accuracy term "
        f"{100 * acc:+.1f} (accuracy {pct(g['accuracy_fp32'])} → {pct(g['accuracy_q'])} %) + "
        f"confidence term {100 * conf:+.1f} (mean confidence {pct(g['confidence_fp32'])} → "
        f"{pct(g['confidence_q'])} %). {lead}"
    )


#: A change of the mean gap smaller than this (1 point) "hardly moved".
_STILL = 0.01


def _gap_lead(acc: float, conf: float, rise: float, gap_q: float) -> str:
    """What the gap change says, by its sign and its larger term (``rise = acc + conf``)."""
    if abs(rise) < _STILL:
        both = (
            f" Accuracy and confidence fell together (by {100 * acc:.1f} and {-100 * conf:.1f} "
            "points)."
            if acc > 2 * _STILL
            else ""
        )
        return (
            f"The mean gap hardly moved (under {100 * _STILL:g} point).{both} What is left is "
            "in how confidence is spread over right and wrong predictions, which one "
            "temperature cannot reorder."
        )
    if rise > 0:
        still_under = (
            " The quantized model is still under-confident, less than fp32." if gap_q < 0 else ""
        )
        if acc >= conf:
            return (
                "Confidence did not follow accuracy down: the quantized model is wrong more "
                f"often with much the same confidence (accuracy collapse).{still_under}"
            )
        return (
            f"Quantization raised the confidences themselves (confidence distortion).{still_under}"
        )
    if gap_q < 0:
        return "Confidence fell further than accuracy: the quantized model is under-confident."
    why = "confidence fell more than accuracy" if conf < 0 else "accuracy rose more than confidence"
    return f"The gap narrowed: {why}, so the quantized model is less over-confident than fp32."


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
    trust = {c.method: c for c in repairs(cell)}
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
            f"<td class='text'>{html.escape(_trust(trust.get(method)))}</td></tr>"
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
            "T (fitted)",
            "fit",
        )
    )
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _trust(c) -> str:
    """The fit's notes in a few words: 'raised ECE (paired)', 'fitted on 180 < 500 images'."""
    if c is None:
        return ""
    from quantcal.calibration import recal

    words = []
    if c.raised_ece:
        words.append("raised ECE (paired interval above 0): not a repair")
    if c.small_fit:
        words.append(f"fitted on {c.n_fit} < {recal.min_fit_images(c.method, c.n_classes)} images")
    if not c.keeps_predictions:
        words.append("changes predictions")
    return "; ".join(words) or "ok"


def _nll_sentence(d: dict[str, Any], t_fit: float | None = None) -> str:
    """NLL as is (T = 1) and at the fitted temperature ``t_fit`` (read off the grid), and how
    sharp the optimum is; without a fitted temperature, at the grid's lowest point, said so."""
    temps = d["temperatures"]
    at_one = d["nll"][min(range(len(temps)), key=lambda i: abs(temps[i] - 1.0))]
    rise = d["nll_rise_at_1.5x"]
    shape = (
        "a flat optimum: temperatures around it fit about as well, so T is loosely determined"
        if rise < 0.02 * d["nll_star"]
        else "a sharp optimum: T is well determined"
    )
    if t_fit is not None:
        where = (
            f"at the fitted temperature T = {t_fit:.3g} it is {nll_at(d, t_fit):.3f} (read off "
            f"a grid of {len(temps)} temperatures)"
        )
    else:
        where = (
            f"lowest, {d['nll_star']:.3f}, at T = {d['t_star']:.3g} on a grid of {len(temps)} "
            "temperatures (no temperature was fitted in this study)"
        )
    return (
        f"On {d['fit_split']}, NLL is {at_one:.3f} as is (T = 1); {where}; it rises by "
        f"+{rise:.3f} at 1.5 times or 1/1.5 times the best temperature: {shape}. A temperature "
        "rescales every confidence alike; what it cannot fix is the ECE left after it, in the "
        "table below."
    )


def why_section(rows: list[dict], details: dict, budget: Budget) -> tuple[str, list]:
    """The section's HTML and its figures ``[(name, caption, png)]``; empty when every cell's
    confidence can be repaired."""
    cells = failing_cells(rows, budget)
    if not cells:
        return "", []
    parts = [
        "<h2>Why recalibration fails</h2><p class='muted'>Cells whose best recalibrator stays "
        f"more than {100 * budget.max_ece_rise:g} point(s) above the fp32 model's best ECE, or "
        f"above the absolute {100 * budget.max_ece:g} %. "
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
        t_fit = fitted_temperature(rows, v)
        parts.append(f"<p>{html.escape(_nll_sentence(d, t_fit))}</p>")
        parts.append(_recal_table(rows, v))
        caption = (
            f"{v.dataset} / {v.model} {v.precision}: confidence histograms and NLL vs temperature"
        )
        png = fig_why(d, f"{v.model} {v.precision}", t_fit)
        name = f"why_{len(figs)}"
        figs.append((name, caption, png))
        b64 = base64.b64encode(png).decode()
        parts.append(
            f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,{b64}'>"
            f"<figcaption class='muted'>{html.escape(caption)}</figcaption></figure>"
        )
    return "\n".join(parts), figs
