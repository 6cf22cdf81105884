"""The paper's three claims (Kuang & Wong, arXiv 2309.13866), judged on the rows of
``results.csv``: ECE grows as precision falls; GhostNet-VGG is the most robust; temperature
scaling helps quantized nets but fails for 4-bit MobileOne.

Each function is registered in report order with ``@register_claim``: a new claim on the rows
copies one of them (the registry is :mod:`quantcal.findings.claims.registry`, the shared pieces
:mod:`quantcal.findings.claims.evidence`) and is imported by :mod:`quantcal.findings.claims`.
"""

from __future__ import annotations

from quantcal.findings.claims.evidence import interval_verdict, number, precisions, seeds, summarise
from quantcal.findings.claims.registry import Claim, register_claim
from quantcal.findings.rows import aggregate, groups, main_rows, pct, pick

__all__ = ["ghostnet_most_robust", "precision_raises_ece", "temperature_scaling_helps"]


# ---------------------------------------------------------------------------------------------
# The paper's claims
# ---------------------------------------------------------------------------------------------
_CLAIM1 = (
    "1. Calibration error grows as precision falls (fp32 → W8A8 → W4A8 → W4A4), most with "
    "4-bit activations."
)


@register_claim
def precision_raises_ece(rows: list[dict]) -> Claim:
    """Paper claim 1, per model: the ECE difference (lowest precision − fp32, raw, paired) and
    its interval; supported when the interval lies above 0."""
    main = [r for r in main_rows(rows) if r["recal"] == "none"]
    evidence, verdicts, numbers = [], [], []
    for ds, model in groups(main):
        rs = pick(main, dataset=ds, model=model)
        precs = precisions(rs)
        quantized = [p for p in precs if p != "fp32"]
        if "fp32" not in precs or not quantized:
            continue
        lowest = quantized[-1]
        eces = {p: aggregate(pick(rs, precision=p), "ece") for p in precs}
        accs = {p: aggregate(pick(rs, precision=p), "accuracy") for p in precs}
        rise = aggregate(pick(rs, precision=lowest), "ece_diff_vs_fp32")
        v = interval_verdict(rise, "supported", "contradicted")
        verdicts.append(v.split()[0])
        numbers += [number(ds, model, p, "ece", eces[p]) for p in precs]
        numbers.append(number(ds, model, lowest, "ece_diff_vs_fp32", rise))
        evidence.append(
            f"{ds} / {model}: ECE % "
            + " → ".join(f"{p} {pct(eces[p].value)}" for p in precs)
            + f"; {lowest} − fp32 = {rise.text(2, sign=True)} points (paired bootstrap)"
            + f"{seeds(rise)} — {v}. Accuracy % "
            + " → ".join(pct(accs[p].value) for p in precs)
            + "."
        )
    if not verdicts:
        return Claim(
            "precision_raises_ece",
            _CLAIM1,
            "not tested",
            ("needs fp32 and a quantized precision of one model",),
            source="paper",
            tested=False,
        )
    return Claim(
        "precision_raises_ece",
        _CLAIM1,
        summarise(verdicts),
        tuple(evidence),
        tuple(numbers),
        source="paper",
    )


_CLAIM2 = (
    "2. GhostNet-VGG is the most robust to the accuracy drop and the ECE rise; the "
    "depthwise-separable nets (ShuffleNetV2, MobileOne) suffer more."
)


@register_claim
def ghostnet_most_robust(rows: list[dict]) -> Claim:
    """Paper claim 2, per dataset (and training objective) at its lowest precision: GhostNet-VGG
    has the smallest ECE rise and accuracy drop among the architectures (supported when its rise
    interval lies below every other's)."""
    main = [r for r in main_rows(rows) if r["recal"] == "none"]
    evidence, verdicts, numbers = [], [], []
    for ds, obj in dict.fromkeys((r["dataset"], r.get("objective") or "ce") for r in main):
        # architectures compared with the same training objective
        in_ds = [r for r in pick(main, dataset=ds) if (r.get("objective") or "ce") == obj]
        quantized = [p for p in precisions(in_ds) if p != "fp32"]
        if not quantized:
            continue
        lowest = quantized[-1]
        deltas = []
        for _, model in [g for g in groups(in_ds) if g[0] == ds]:
            low = pick(in_ds, model=model, precision=lowest)
            fp = pick(in_ds, model=model, precision="fp32")
            if not (low and fp):
                continue
            rise = aggregate(low, "ece_diff_vs_fp32")
            drop = aggregate(fp, "accuracy").value - aggregate(low, "accuracy").value
            deltas.append((model, rise, drop))
            numbers.append(number(ds, model, lowest, "ece_diff_vs_fp32", rise))
        ghosts = [d for d in deltas if d[0].startswith("ghostnet")]
        if not ghosts or len(deltas) < 2:
            continue
        g = ghosts[0]
        others = [d for d in deltas if d is not g]
        smallest_ece = all((g[1].value or 0) <= (o[1].value or 0) for o in others)
        smallest_acc = all(g[2] <= o[2] for o in others)
        separated = all(g[1].decided and o[1].decided and g[1].hi < o[1].lo for o in others)
        if smallest_ece and smallest_acc:
            verdicts.append("supported" if separated else "undecided")
        else:
            verdicts.append(
                "contradicted" if not smallest_ece and not smallest_acc else "undecided"
            )
        evidence.append(
            f"{ds}{'' if obj == 'ce' else f' ({obj})'}, {lowest} − fp32: "
            + "; ".join(
                f"{m}: ΔECE {rise.text(2, sign=True)}, accuracy drop {pct(drop)}"
                for m, rise, drop in deltas
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
    if not verdicts:
        return Claim(
            "ghostnet_most_robust",
            _CLAIM2,
            "not tested",
            ("needs ghostnet_vgg16 and another architecture on the same dataset",),
            source="paper",
            tested=False,
        )
    return Claim(
        "ghostnet_most_robust",
        _CLAIM2,
        summarise(verdicts),
        tuple(evidence),
        tuple(numbers),
        source="paper",
    )


_CLAIM3 = (
    "3. Temperature scaling improves calibration of quantized nets, but fails to correct "
    "4-bit MobileOne."
)


@register_claim
def temperature_scaling_helps(rows: list[dict]) -> Claim:
    """Paper claim 3, per model and quantized precision: the ECE change from temperature
    scaling (paired; supported when its interval lies below 0) and whether the result is still
    above the fp32 model's after temperature scaling.

    The cells where it raised ECE (point estimate above 0; *measurably* when the paired
    interval lies above 0) are counted and named. When it measurably raised ECE in more than half
    of the cells the verdict is *not supported*, when it raised it in more than half but mostly
    within noise *undecided*, whatever the other cells say; fits on fewer images
    than :func:`quantcal.recal.min_fit_images` (the ``n_fit`` column) are counted too."""
    from quantcal.calibration import recal

    main = main_rows(rows)
    evidence, verdicts, numbers = [], [], []
    worse: list[str] = []
    measurably: list[str] = []
    small: list[int] = []
    mobileone = ""
    for ds, model in groups(main):
        ts_rows = pick(main, dataset=ds, model=model, recal="temperature")
        quantized = [p for p in precisions(ts_rows) if p != "fp32"]
        for p in quantized:
            ts = pick(ts_rows, precision=p)
            raw = aggregate(pick(main, dataset=ds, model=model, recal="none", precision=p), "ece")
            after = aggregate(ts, "ece")
            change = aggregate(ts, "ece_diff_vs_none")
            residual = aggregate(ts, "ece_diff_vs_fp32")
            temps = [r["temperature"] for r in ts if r.get("temperature") is not None]
            v = interval_verdict(change, "made worse", "improved")
            if change.value is not None and change.value > 0:
                worse.append(f"{model} {p}")
                if v == "made worse":
                    measurably.append(f"{model} {p}")
            n_fit = ts[0].get("n_fit")
            if n_fit is not None and n_fit < recal.min_fit_images("temperature"):
                small.append(int(n_fit))
            verdicts.append(
                "supported"
                if v == "improved"
                else "contradicted"
                if v == "made worse"
                else "undecided"
            )
            res = interval_verdict(residual, "still above fp32+TS", "below fp32+TS")
            numbers.append(number(ds, model, p, "ece_diff_vs_none", change))
            numbers.append(number(ds, model, p, "ece_diff_vs_fp32", residual))
            t = f" with T = {sum(temps) / len(temps):.3g}" if temps else ""
            sentence = (
                f"{ds} / {model} {p}: ECE {pct(raw.value)} → {pct(after.value)} %{t} ({v}; "
                f"change {change.text(2, sign=True)}){seeds(change)}; vs fp32 after TS: {res}."
            )
            evidence.append(sentence)
            if model.startswith("mobileone") and p == quantized[-1]:
                mobileone = sentence.split(": ", 1)[1]
    if not verdicts:
        return Claim(
            "temperature_scaling_helps",
            _CLAIM3,
            "not tested",
            ("needs temperature scaling at a quantized precision",),
            source="paper",
            tested=False,
        )
    n = len(verdicts)
    raised = (
        f"it raised ECE in {len(worse)} of {n} cells ({len(measurably)} measurably, the paired "
        "interval above 0)"
    )
    if 2 * len(measurably) > n:
        head = f"not supported: {raised}"
    elif 2 * len(worse) > n:  # most rises within the noise of the paired interval
        head = f"undecided: {raised}"
    else:
        head = summarise(verdicts) + (f"; {raised}" if worse else "")
    if worse:
        evidence.insert(
            0,
            f"Temperature scaling raised ECE in {len(worse)} of {n} cells: "
            + ", ".join(f"{c}{' (measurably)' if c in measurably else ''}" for c in worse)
            + ".",
        )
    if small:
        span = f"{min(small)}" if min(small) == max(small) else f"{min(small)}–{max(small)}"
        head += f"; fitted on {span} images in {len(small)} of {n} cells"
        evidence.insert(
            0,
            f"The temperature was fitted on {span} images in {len(small)} "
            f"of {n} cells, fewer than the {recal.min_fit_images('temperature')} this report "
            "trusts: with few errors among them the NLL favours a low T that sharpens a model "
            "already calibrated, and a rise in ECE on test is what that looks like.",
        )
    verdict = head + "; MobileOne at the lowest precision: " + (mobileone or "not in this run")
    return Claim(
        "temperature_scaling_helps",
        _CLAIM3,
        verdict,
        tuple(evidence),
        tuple(numbers),
        source="paper",
    )
