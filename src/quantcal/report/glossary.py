"""The report's glossary: the words it uses (precisions, SQNR, the recalibrators, the ECE
estimators), each explained once with the paper it comes from, and only those that this report
shows. Also the paper whose claims the findings test, cited where they appear."""

from __future__ import annotations

import html
import re
from typing import Any

__all__ = ["PAPER", "glossary_section", "paper_citation"]

#: The study this tool reproduces; its claims are tested in the findings.
PAPER = (
    'Kuang &amp; Wong, "On Calibration of Modern Quantized Efficient Neural Networks", '
    "<a href='https://arxiv.org/abs/2309.13866'>arXiv 2309.13866</a>"
)

#: The same, short, for each claim of the findings.
SHORT_CITE = "Kuang &amp; Wong, <a href='https://arxiv.org/abs/2309.13866'>arXiv 2309.13866</a>"

_GUO = "Guo et al. 2017, “On Calibration of Modern Neural Networks”, ICML"
_ZE01 = "Zadrozny &amp; Elkan 2001, ICML"
_ZE02 = "Zadrozny &amp; Elkan 2002, KDD"

#: recalibrator name (the ``recal`` column) -> what it does, with its source.
RECALIBRATORS: dict[str, str] = {
    "none": "the raw logits, no recalibration.",
    "temperature": "temperature scaling: the logits divided by one scalar T, fitted by "
    f"minimising the negative log-likelihood on the fit split ({_GUO}). T &gt; 1 softens an "
    "over-confident model; the ranking, hence accuracy, is unchanged.",
    "temperature_fp32": "the fp32 model's temperature reused on the quantized model, without "
    "refitting: what deploying the full-precision calibration as is would give.",
    "vector": f"vector scaling: a per-class scale and bias on the logits ({_GUO}).",
    "matrix": f"matrix scaling: a full affine map of the logits, kept near the identity ({_GUO}).",
    "histogram": "histogram binning: the top-label confidence replaced by the accuracy of its "
    f"confidence bin on the fit split ({_ZE01}).",
    "isotonic": "isotonic regression: a monotone step map from top-label confidence to "
    f"accuracy, fitted on the fit split ({_ZE02}).",
}

# (pattern that shows the report uses it, term, explanation)
_ESTIMATORS: list[tuple[str, str, str]] = [
    (
        r"\bECE\b",
        "ECE (binned)",
        "expected calibration error of the top label: the test images binned by confidence "
        "into {n_bins} equal-width bins, ECE = Σ_b (n_b / N) · |accuracy_b − confidence_b| "
        f"({_GUO}). In percent; 0 is perfect.",
    ),
    (
        r"\badaptive[ _]ECE\b|\badaptive_ece\b",
        "adaptive ECE",
        "ECE with equal-mass bins (each holds about as many images) instead of equal-width "
        "ones (Nixon et al. 2019, “Measuring Calibration in Deep Learning”).",
    ),
    (
        r"\bclass-?wise\b",
        "class-wise ECE",
        "the binned calibration error of every class's probability, averaged over classes "
        "(Kull et al. 2019; Nixon et al. 2019).",
    ),
    (
        r"\bdebiased\b",
        "debiased ECE",
        "the debiased estimate of the l2 binned calibration error, which removes the upward "
        "bias binned ECE has on few images (Kumar, Liang &amp; Ma 2019, “Verified Uncertainty "
        "Calibration”, NeurIPS).",
    ),
    (
        r"\bsmooth[ _]ECE\b|\bsmECE\b",
        "smooth ECE",
        "a binning-free calibration error from a kernel-smoothed reliability curve (Błasiok "
        "&amp; Nakkiran 2023, “Smooth ECE: Principled Reliability Diagrams via Kernel "
        "Smoothing”, arXiv 2309.12236).",
    ),
    (
        r"\bMCE\b",
        "MCE",
        f"maximum calibration error: the largest |accuracy_b − confidence_b| over non-empty "
        f"bins ({_GUO}).",
    ),
    (
        r"\bNLL\b",
        "NLL",
        "negative log-likelihood: the mean of −log p(true class); lower is better.",
    ),
    (
        r"\bBrier\b",
        "Brier score",
        "the mean squared distance between the predicted probability vector and the one-hot "
        "label (Brier 1950), between 0 and 2.",
    ),
]


def _recal_text(name: str) -> str:
    """The glossary line of a recalibrator: ours, else its class docstring's first line."""
    if name in RECALIBRATORS:
        return RECALIBRATORS[name]
    try:
        from quantcal.calibration import recal

        doc = (recal.get(name).__doc__ or "").strip().split("\n")[0]
    except (ValueError, KeyError):
        doc = ""
    return html.escape(doc or "a registered recalibrator (see quantcal list).")


def _precisions(rows: list[dict], config: dict[str, Any]) -> list[tuple[str, str]]:
    quant = config.get("quant") or {}
    per = "per tensor" if quant.get("weight_granularity") == "tensor" else "per output channel"
    precs = list(dict.fromkeys(r["precision"] for r in rows))
    uniform = [p for p in precs if re.fullmatch(r"[Ww]\d+[Aa]\d+", p)]
    out = []
    if "fp32" in precs:
        out.append(("fp32", "the trained network, unquantized (32-bit floating point)."))
    if uniform:
        first_last = (
            " The first and last layers stay at 8 bits ([quant] first_last_8bit)."
            if quant.get("first_last_8bit")
            else ""
        )
        out.append(
            (
                "WxAy (" + ", ".join(html.escape(p) for p in uniform) + ")",
                f"post-training quantization with x-bit weights, symmetric, one scale {per}, "
                "and y-bit activations, asymmetric (a scale and a zero-point) per tensor, their "
                "ranges set on range-calibration images from the training split; biases are "
                "32-bit integers. W8A8 is 8-bit weights and activations." + first_last,
            )
        )
    plans = [p for p in precs if p.startswith("plan:")]
    if plans:
        out.append(
            (
                ", ".join(html.escape(p) for p in plans),
                "mixed precision: each layer at its own level of the plan's precisions, "
                "searched on validation (see Mixed precision).",
            )
        )
    return out


def glossary_section(rows: list[dict], config: dict[str, Any], shown: str) -> str:
    """A ``<h2>Glossary</h2>`` section naming each precision, recalibrator and estimator the
    report shows (``shown`` is the report's HTML so far, searched for the estimators and SQNR),
    with their sources; the n_bins of the config."""
    n_bins = int((config.get("metrics") or {}).get("n_bins") or 15)
    entries = _precisions(rows, config)
    if re.search(r"\bSQNR\b", shown):
        entries.append(
            (
                "SQNR",
                "signal-to-quantization-noise ratio of a layer's output: 10·log10(Σ y² / "
                "Σ (y − y_q)²) in dB, y the fp32 network's output of the layer and y_q the "
                "quantized network's. Higher is closer to fp32; each bit adds about 6 dB.",
            )
        )
    recals = list(dict.fromkeys(r["recal"] for r in rows if r.get("recal")))
    for name in recals:
        entries.append((f"{html.escape(name)} (recalibrator)", _recal_text(name)))
    for pattern, term, text in _ESTIMATORS:
        if re.search(pattern, shown):
            entries.append((term, text.replace("{n_bins}", str(n_bins))))
    if re.search(r"\binterval\b", shown):
        entries.append(
            (
                "interval",
                "a percentile bootstrap interval over the test images (Efron &amp; Tibshirani "
                "1993); a difference vs fp32 resamples both models on the same images "
                "(paired).",
            )
        )
    items = "".join(f"<dt>{t}</dt><dd>{d}</dd>" for t, d in entries)
    return (
        "<h2 id='glossary'>Glossary</h2><p class='muted'>The words of this report. The study "
        f"it reproduces: {PAPER}.</p><dl class='glossary'>{items}</dl>"
    )


def paper_citation(source: str) -> str:
    """Where a finding's claim comes from, as HTML: the paper (cited) or quantcal's own."""
    if source == "paper" or "2309.13866" in source:
        extra = ""
        if "(" in source:
            extra = " " + html.escape(source[source.index("(") :])
        return f"Claim of {SHORT_CITE}{extra}."
    if source and source != "quantcal":
        return f"Source: {html.escape(source)}."
    return "A check of quantcal's own, beyond the paper."
