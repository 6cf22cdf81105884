"""Claims judged on ``details.json``: the controlled ablation's paired contrasts (is the
separable block the mechanism; does attention keep its calibration; which property makes
calibration fragile), the per-layer attribution (which layer types decide calibration) and
repair by stronger quantization (does it restore calibration or only accuracy).

Each function takes ``(rows, details)`` and is registered in report order with
``@register_claim``, after :mod:`quantcal.findings.claims.extras`.
"""

from __future__ import annotations

from typing import Any

from quantcal.findings.claims.evidence import summarise
from quantcal.findings.claims.registry import Claim, register_claim
from quantcal.findings.rows import prec_key

__all__ = [
    "ablation_properties",
    "attention_keeps_calibration",
    "attribution_layer_types",
    "repair_restores",
    "separable_mechanism",
]


# ---------------------------------------------------------------------------------------------
# The ablation and the attribution (``details.json``)
# ---------------------------------------------------------------------------------------------
def _pts(e: dict[str, float]) -> str:
    return f"{100 * e['value']:+.2f} [{100 * e['lo']:+.2f}, {100 * e['hi']:+.2f}]"


def _contrast_verdict(e: dict[str, float]) -> str:
    if e["lo"] > 0:
        return "more fragile"
    if e["hi"] < 0:
        return "less fragile"
    return "no measurable difference"


def _ablation_records(details: dict[str, Any], recal: str = "none") -> list[dict[str, Any]]:
    return [r for r in details.get("ablation", []) if r.get("recal") == recal]


def _property_claim(
    name: str,
    details: dict[str, Any],
    *,
    prop: str,
    labels: tuple[str, str],
    statement: str,
    source: str,
    worse_is: str,
) -> Claim:
    """A claim on one ablation property, judged per (dataset, width, objective, seed) by its
    ECE-rise contrast at the lowest precision, as is: above 0 (the variant loses more
    calibration than the base) is ``worse_is`` ("supported" or "contradicted"), below 0 the
    other, an interval holding 0 *undecided*. The evidence gives every precision, as is and
    after temperature scaling where the study has it."""
    recs = [r for r in _ablation_records(details) if r["property"] == prop]
    variant = next((r["variant"] for r in recs), f"the {prop} variant")
    if not recs:
        return Claim(
            name,
            statement,
            "not tested",
            (f"needs ablation_base and the {prop} variant in one study",),
            source=source,
            tested=False,
        )
    better_is = "contradicted" if worse_is == "supported" else "supported"
    after = {
        (r["dataset"], r["width"], r["objective"], r["seed"], r["precision"]): r
        for r in _ablation_records(details, "temperature")
        if r["property"] == prop
    }
    evidence, verdicts, numbers = [], [], []
    for key in dict.fromkeys((r["dataset"], r["width"], r["objective"], r["seed"]) for r in recs):
        sel = [r for r in recs if (r["dataset"], r["width"], r["objective"], r["seed"]) == key]
        sel.sort(key=lambda r: prec_key(r["precision"]))
        for r in sel:
            c = r["ece_rise"]["contrast"]
            ts = after.get((*key, r["precision"]))
            tail = (
                f"; after temperature scaling {_pts(ts['ece_rise']['contrast'])} "
                f"({_contrast_verdict(ts['ece_rise']['contrast'])})"
                if ts
                else ""
            )
            evidence.append(
                f"{key[0]} (width {key[1]:g}, seed {key[3]}), {r['precision']}: {labels[0]} ECE "
                f"rise {_pts(r['ece_rise']['variant'])} points vs {labels[1]} "
                f"{_pts(r['ece_rise']['base'])}; difference {_pts(c)} "
                f"({_contrast_verdict(c)}){tail}; accuracy drop difference "
                f"{_pts(r['accuracy_drop']['contrast'])} points."
            )
            for recal, est in (
                ("none", c),
                ("temperature", ts["ece_rise"]["contrast"] if ts else None),
            ):
                if est is not None:
                    numbers.append(
                        {
                            "dataset": key[0],
                            "model": f"{variant} - ablation_base",
                            "precision": r["precision"],
                            "recal": recal,
                            "quantity": "ece_rise_contrast",
                            **est,
                            "n_seeds": 1,
                        }
                    )
        low = sel[-1]["ece_rise"]["contrast"]  # the lowest precision (last in plan order)
        verdicts.append(
            worse_is
            if low["lo"] > 0
            else better_is
            if low["hi"] < 0
            else "undecided (interval contains 0)"
        )
    return Claim(
        name, statement, summarise(verdicts), tuple(evidence), tuple(numbers), source=source
    )


@register_claim
def separable_mechanism(rows: list[dict], details: dict[str, Any]) -> Claim:
    """The paper's explanation of its architecture ranking, judged on the controlled ablation:
    the separable variant against the dense base at matched parameters and MACs, everything
    else equal. Per precision: the ECE-rise contrast (variant's ECE rise under quantization
    minus the base's, as is, paired bootstrap over the test images). *supported* when it lies
    above 0 at the lowest precision, *contradicted* when below, else *undecided*."""
    return _property_claim(
        "separable_mechanism",
        details,
        prop="block",
        labels=("separable", "dense"),
        statement=(
            "Depthwise-separable convolutions lose more calibration under quantization than "
            "dense ones (the paper's explanation), at matched parameters and MACs."
        ),
        source="Kuang & Wong, arXiv 2309.13866",
        worse_is="supported",
    )


@register_claim
def attention_keeps_calibration(rows: list[dict], details: dict[str, Any]) -> Claim:
    """Minderer et al. (NeurIPS 2021) found attention models better calibrated than
    convolutional ones; does that survive quantization? Judged on the controlled ablation: the
    attention variant (self-attention in place of the last stage's second 3x3 convs, its
    products Q·Kᵀ and A·V quantized on both operands) against the convolutional base at matched
    parameters and MACs. *contradicted* when its ECE rise under quantization exceeds the base's
    at the lowest precision (interval above 0), *supported* when it is smaller (below 0), else
    *undecided*; as is, with the after-temperature-scaling contrasts in the evidence."""
    return _property_claim(
        "attention_keeps_calibration",
        details,
        prop="attention",
        labels=("attention", "convolution"),
        statement=(
            "Self-attention loses less calibration under quantization than the convolution it "
            "replaces, at matched parameters and MACs (attention models are better calibrated "
            "in float: Minderer et al. 2021)."
        ),
        source="Minderer et al., NeurIPS 2021",
        worse_is="contradicted",
    )


@register_claim
def ablation_properties(rows: list[dict], details: dict[str, Any]) -> Claim:
    """Every property of the ablation at the lowest precision: the ECE-rise and accuracy-drop
    contrasts against the base, as is and after temperature scaling (a measurement: the
    verdict per property is *more fragile*, *less fragile* or *no measurable difference*)."""
    statement = (
        "Which architectural property makes calibration fragile under quantization (one "
        "property changed at a time, matched parameters and MACs)."
    )
    recs = _ablation_records(details)
    if not recs:
        return Claim(
            "ablation_properties",
            statement,
            "not tested",
            ("needs ablation_base and at least one variant in one study (the ablation preset)",),
            tested=False,
        )
    lowest = max((r["precision"] for r in recs), key=prec_key)
    ts = {
        (r["variant"], r["seed"], r["width"], r["dataset"]): r
        for r in _ablation_records(details, "temperature")
        if r["precision"] == lowest
    }
    evidence = []
    for r in (r for r in recs if r["precision"] == lowest):
        c = r["ece_rise"]["contrast"]
        after = ts.get((r["variant"], r["seed"], r["width"], r["dataset"]))
        tail = f"; after temperature scaling {_pts(after['ece_rise']['contrast'])}" if after else ""
        evidence.append(
            f"{r['property']} {r['base_value']} → {r['value']} ({r['dataset']}, {lowest}): ECE "
            f"rise vs base {_pts(c)} points — {_contrast_verdict(c)}{tail}; accuracy drop vs "
            f"base {_pts(r['accuracy_drop']['contrast'])} points."
        )
    return Claim("ablation_properties", statement, "see the numbers", tuple(evidence))


@register_claim
def attribution_layer_types(rows: list[dict], details: dict[str, Any]) -> Claim:
    """From the per-layer attribution (``[quant] attribution``): per model at its lowest
    attributed precision, the layer kind with the largest share of the summed single-layer NLL
    rise, the kind with the largest mean rise per layer, and the single most harmful layer
    (said to be of another kind when it is). What keeping that layer in fp32 gives back is
    stated so that positive is better for each metric: NLL and ECE fall by ``recovery_nll``
    and ``recovery_ece``; accuracy rises by −``recovery_accuracy`` (that field is quantized −
    all-but-this-layer, so its sign is the opposite of a gain). A measurement."""
    statement = "Which layer types decide calibration at low precision (per-layer attribution)."
    recs = [
        r
        for r in details.get("attribution", [])
        if "groups" in r and r.get("granularity") == "layer"
    ]
    if not recs:
        return Claim(
            "attribution_layer_types",
            statement,
            "not tested",
            ('needs [quant] attribution (granularity = "layer")',),
            tested=False,
        )
    from quantcal.quant.attribution import AttributionResult

    evidence = []
    per_layer_top: list[str] = []
    for key in dict.fromkeys((r["dataset"], r["arch"], r["width"], r["seed"]) for r in recs):
        sel = [r for r in recs if (r["dataset"], r["arch"], r["width"], r["seed"]) == key]
        rec = max(sel, key=lambda r: prec_key(r["precision"]))
        res = AttributionResult.from_dict(
            {
                k: v
                for k, v in rec.items()
                if k not in ("dataset", "arch", "width", "objective", "seed")
            }
        )
        kinds = res.by_kind()
        if not kinds:
            continue
        share = max(kinds, key=lambda k: _nan_low(kinds[k]["share"]))
        mean = max(kinds, key=lambda k: kinds[k]["mean"])
        per_layer_top.append(mean)
        top = res.ranked()[0]
        other = (
            f" — a {top.kind} layer: {mean} layers lead only on average" if top.kind != mean else ""
        )
        evidence.append(
            f"{key[1]}@{key[2]:g} ({key[0]}, {rec['precision']}): {share} layers carry "
            f"{100 * _nan_low(kinds[share]['share'], 0):.0f} % of the summed single-layer NLL rise "
            f"({kinds[share]['count']} layers); {mean} layers the largest mean rise per layer "
            f"({kinds[mean]['mean']:.3f} nats over {kinds[mean]['count']}); the single most "
            f"harmful layer is {top.name} ({top.kind}, NLL {top.alone_nll:+.3f}, ECE "
            f"{100 * top.alone_ece:+.2f} points when quantized alone){other}. Keeping it in "
            f"fp32 gives back {_gain(top.recovery_nll, 1, '.3f')} nats of NLL, "
            f"{_gain(top.recovery_ece, 100, '.2f')} points of ECE and "
            f"{_gain(-top.recovery_accuracy, 100, '.1f')} points of accuracy (positive: better)."
        )
    if per_layer_top:
        counts = {k: per_layer_top.count(k) for k in dict.fromkeys(per_layer_top)}
        evidence.insert(
            0,
            "Layer kind with the largest mean NLL rise per layer, across models: "
            + ", ".join(f"{k} in {n} of {len(per_layer_top)}" for k, n in counts.items())
            + " (an average over the kind's layers: the single most harmful layer, named "
            "below, can be of another kind).",
        )
    return Claim("attribution_layer_types", statement, "see the numbers", tuple(evidence))


def _gain(v: float, scale: float, fmt: str) -> str:
    """``v·scale`` signed, or ``–`` when it was not measured (NaN)."""
    return "–" if v != v else f"{scale * v:+{fmt}}"


def _nan_low(v: float, default: float = -1.0) -> float:
    return v if v == v else default


# Repair by stronger quantization (``details.json["repair"]``, :mod:`quantcal.findings.repair`)
# ---------------------------------------------------------------------------------------------
def _restores(gap: dict[str, float], budget: float) -> bool:
    """What is still lost (vs fp32) is within ``budget``, or not measurably above 0."""
    return gap["lo"] <= 0 or gap["value"] <= budget


@register_claim
def repair_restores(rows: list[dict], details: dict[str, Any]) -> Claim:
    """Does better quantization restore calibration, or only accuracy? Per model, range
    estimator and method other than ``ptq``, at the lowest quantized precision: the accuracy it
    gains over min-max PTQ and what is still lost against fp32, as is and after temperature
    scaling, each with a paired interval over the test images (:mod:`quantcal.findings.repair`).

    A method *gains accuracy* when its accuracy gain over ptq lies above 0, and *restores* it
    when it is also within 5 points of fp32; it *restores calibration* when its ECE gap to
    fp32 is not measurably above 0 or at most 1 point (read beside accuracy: a collapsed model
    can be calibrated at chance). The verdict, per method, as is (recal none): *accuracy and
    calibration*, *calibration, accuracy partly* (calibrated, accuracy gained but still more
    than 5 points short), *accuracy only*, *calibration only* (no accuracy gained) or
    *neither*."""
    statement = (
        "Better quantization (CLE + bias correction, AdaRound, QAT) restores calibration as "
        "well as accuracy, not accuracy alone."
    )
    recs = [r for r in details.get("repair", []) if "accuracy_vs_ptq" in r]
    if not recs:
        return Claim(
            "repair_restores",
            statement,
            "not tested",
            ('needs quant.methods with "ptq" and another method (the repair preset)',),
            tested=False,
        )
    evidence, verdicts, numbers = [], [], []
    keyf = lambda r: (r["dataset"], r["arch"], r["width"], r["objective"], r["seed"])  # noqa: E731
    for key in dict.fromkeys(keyf(r) for r in recs):
        sel = [r for r in recs if keyf(r) == key]
        low = sorted({r["precision"] for r in sel}, key=prec_key)[-1]
        for observer in dict.fromkeys(r["observer"] for r in sel):
            for method in dict.fromkeys(r["method"] for r in sel):
                by = {
                    r["recal"]: r
                    for r in sel
                    if (r["precision"], r["observer"], r["method"]) == (low, observer, method)
                }
                r = by.get("none")
                if r is None:
                    continue
                gains = r["accuracy_vs_ptq"]["lo"] > 0
                near = r["accuracy_gap"]["value"] <= 0.05  # within 5 points of fp32
                cal_ok = _restores(r["ece_gap"], 0.01)
                verdict = (
                    ("accuracy and calibration" if near else "calibration, accuracy partly")
                    if gains and cal_ok
                    else "accuracy only"
                    if gains
                    else "calibration only"
                    if cal_ok and not near
                    else "neither"
                    if not cal_ok
                    else "no loss to restore"
                )
                verdicts.append(verdict)
                ts = by.get("temperature")
                after = (
                    f"; after temperature scaling ECE gap {_pts(ts['ece_gap'])} points"
                    if ts
                    else ""
                )
                evidence.append(
                    f"{key[0]} {key[1]}@{key[2]:g} {low} ({observer}), {method}: accuracy "
                    f"{100 * r['accuracy']:.1f} % (fp32 {100 * r['fp32_accuracy']:.1f} %), "
                    f"{_pts(r['accuracy_vs_ptq'])} points over ptq; ECE gap to fp32 "
                    f"{_pts(r['ece_gap'])} points{after}: {verdict}."
                )
                for quantity in ("accuracy_vs_ptq", "ece_gap"):
                    numbers.append(
                        {
                            "dataset": key[0],
                            "model": f"{key[1]}@{key[2]:g} {method} ({observer})",
                            "precision": low,
                            "quantity": quantity,
                            **r[quantity],
                            "n_seeds": 1,
                        }
                    )
    counts: dict[str, int] = {}
    for v in verdicts:
        counts[v] = counts.get(v, 0) + 1
    verdict = (
        f"{verdicts[0]}"
        if len(counts) == 1
        else "mixed: " + ", ".join(f"{n} {v}" for v, n in counts.items())
    )
    return Claim(
        "repair_restores",
        statement,
        verdict,
        tuple(evidence),
        tuple(numbers),
        source="Kuang & Wong, arXiv 2309.13866 (their next check)",
    )
