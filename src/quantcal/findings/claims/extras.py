"""quantcal's extra claims on the rows of ``results.csv``: refit the temperature after
quantization or reuse the fp32 model's; the range-calibration sample as a source of variance;
training for calibration; mixed-precision plans budgeted on calibration.

Registered in report order with ``@register_claim``, after the paper's
(:mod:`quantcal.findings.claims.paper`).
"""

from __future__ import annotations

from quantcal.findings.claims.evidence import number, precisions, summarise
from quantcal.findings.claims.registry import Claim, register_claim
from quantcal.findings.rows import aggregate, groups, main_rows, ok, pct, pick

__all__ = [
    "calibration_budgeted_plans",
    "range_sample_variance",
    "refit_temperature",
    "training_objectives",
]


# ---------------------------------------------------------------------------------------------
# quantcal's extras
# ---------------------------------------------------------------------------------------------
@register_claim
def refit_temperature(rows: list[dict]) -> Claim:
    """After quantization, refit the temperature or reuse the fp32 model's? The ECE of each,
    per model and quantized precision (a measurement). The verdict counts the cells where each
    is lower; the rows pair each with no recalibration, not with each other, so a count is all
    it says (the statement takes no side)."""
    main = main_rows(rows)
    evidence, numbers = [], []
    refit_lower: list[str] = []
    reuse_lower: list[str] = []
    for ds, model in groups(main):
        for p in [p for p in precisions(pick(main, dataset=ds, model=model)) if p != "fp32"]:
            refit = pick(main, dataset=ds, model=model, recal="temperature", precision=p)
            reuse = pick(main, dataset=ds, model=model, recal="temperature_fp32", precision=p)
            if not (refit and reuse):
                continue
            a, b = aggregate(reuse, "ece"), aggregate(refit, "ece")
            if a.value is not None and b.value is not None and a.value != b.value:
                (refit_lower if b.value < a.value else reuse_lower).append(f"{model} {p}")
            t_reuse = reuse[0].get("temperature")
            t_refit = refit[0].get("temperature")
            numbers += [
                number(ds, model, p, "ece_reuse_fp32_T", a),
                number(ds, model, p, "ece_refit_T", b),
            ]
            evidence.append(
                f"{ds} / {model} {p}: ECE {a.text()} % reusing the fp32 T"
                + (f" = {t_reuse:.3g}" if t_reuse is not None else "")
                + f" vs {b.text()} % refitting"
                + (f" (T = {t_refit:.3g})" if t_refit is not None else "")
                + "."
            )
    statement = (
        "Extra: after quantization, refit the temperature or reuse the fp32 model's? "
        "(the ECE of each)"
    )
    if not evidence:
        return Claim(
            "refit_temperature",
            statement,
            "not tested",
            ("needs the temperature and temperature_fp32 recalibrators",),
            tested=False,
        )
    n = len(evidence)
    counts = f"refitting lower in {len(refit_lower)} of {n} cells, reusing in {len(reuse_lower)}"
    if len(reuse_lower) > len(refit_lower):
        counts += " (reusing the fp32 temperature did better more often)"
    elif len(refit_lower) > len(reuse_lower):
        counts += " (refitting did better more often)"
    if reuse_lower:
        evidence.append(
            "Reusing the fp32 temperature gave the lower ECE in: " + ", ".join(reuse_lower) + "."
        )
    return Claim(
        "refit_temperature",
        statement,
        f"see the numbers: {counts}",
        tuple(evidence),
        tuple(numbers),
    )


@register_claim
def range_sample_variance(rows: list[dict]) -> Claim:
    """The range-calibration sample as a source of variance: accuracy and ECE over disjoint
    samples of the same cell (a measurement)."""
    evidence, numbers = [], []
    good = ok(rows)
    for ds, model in groups(good):
        for p in precisions(pick(good, dataset=ds, model=model)):
            rs = [
                r
                for r in pick(good, dataset=ds, model=model, recal="none", precision=p)
                if r["ptq_sample"] is not None and r["ptq_sample"] >= 0
            ]
            per: dict[tuple, list[dict]] = {}
            for r in rs:
                per.setdefault((r["observer"], r.get("seed"), r.get("method")), []).append(r)
            for (obs, seed, _method), rr in per.items():
                if len(rr) < 2:
                    continue
                eces = [r["ece"] for r in rr]
                accs = [r["accuracy"] for r in rr]
                numbers.append(
                    {
                        "dataset": ds,
                        "model": model,
                        "precision": p,
                        "quantity": "ece_range_over_samples",
                        "value": max(eces) - min(eces),
                        "lo": min(eces),
                        "hi": max(eces),
                        "n_seeds": 1,
                    }
                )
                evidence.append(
                    f"{ds} / {model} {p} ({obs}, seed {int(seed or 0)}, {len(rr)} disjoint "
                    f"range-calibration samples): accuracy {pct(min(accs))}–{pct(max(accs))} %, "
                    f"ECE {pct(min(eces))}–{pct(max(eces))} %."
                )
    statement = "Extra: the range-calibration sample is a source of variance."
    if not evidence:
        return Claim(
            "range_sample_variance",
            statement,
            "not tested",
            ("needs quant.ptq_calib_samples > 1",),
            tested=False,
        )
    return Claim(
        "range_sample_variance", statement, "see the numbers", tuple(evidence), tuple(numbers)
    )


@register_claim
def training_objectives(rows: list[dict]) -> Claim:
    """Training for calibration keeps quantized models calibrated (the study's third next
    check; Müller et al. 2019, Mukhoti et al. 2020, Thulasidasan et al. 2019). Tested when a
    model was trained with cross-entropy and at least one other objective.

    Per model and objective: fp32 ECE; the ECE rise at each quantized precision vs the same
    objective's fp32 model (paired); the temperature-scaling gain at that precision. Verdict per
    objective at the lowest precision, on the quantized model's raw ECE (is it calibrated, not
    only less damaged than its own fp32 model, which may have started far worse): *supported*
    when its ECE interval lies wholly below cross-entropy's, *contradicted* when wholly above,
    else *undecided*. The two intervals come from different models on the same test images, so
    demanding no overlap is conservative.
    """
    statement_base = "Training for calibration keeps quantized models calibrated"
    good = main_rows(rows)
    objectives = list(dict.fromkeys(r.get("objective") or "ce" for r in good))
    quantized = [p for p in precisions(good) if p != "fp32"]
    if "ce" not in objectives or len(objectives) < 2 or not quantized:
        return Claim(
            "training_objectives",
            statement_base + ".",
            "not tested",
            ("needs a model trained with cross-entropy and another objective",),
            tested=False,
        )
    lowest = quantized[-1]
    bases = list(dict.fromkeys((r["dataset"], r["arch"], r["width"]) for r in good))

    def sel(base, obj, prec, recal):
        return [
            r
            for r in good
            if (r["dataset"], r["arch"], r["width"]) == base
            and (r.get("objective") or "ce") == obj
            and r["precision"] == prec
            and r["recal"] == recal
        ]

    evidence, verdicts, numbers = [], [], []
    for base in bases:
        ds, arch, width = base
        ece_ce = aggregate(sel(base, "ce", lowest, "none"), "ece")
        for obj in objectives:
            fp32 = sel(base, obj, "fp32", "none")
            if not fp32:
                continue
            f_ece, f_acc = aggregate(fp32, "ece"), aggregate(fp32, "accuracy")
            parts = [f"fp32 ECE {pct(f_ece.value)} %, accuracy {pct(f_acc.value)} %"]
            for p in quantized:
                raw, ts = sel(base, obj, p, "none"), sel(base, obj, p, "temperature")
                if not raw:
                    continue
                ece = aggregate(raw, "ece")
                numbers.append(number(ds, f"{arch}@{width:g} {obj}", p, "ece", ece))
                txt = (
                    f"{p}: ECE {ece.text()} %, rise "
                    f"{aggregate(raw, 'ece_diff_vs_fp32').text(2, sign=True)}"
                )
                if ts:
                    txt += f", TS gain {aggregate(ts, 'ece_diff_vs_none').text(2, sign=True)}"
                parts.append(txt)
            verdict = ""
            if obj != "ce":
                mine = aggregate(sel(base, obj, lowest, "none"), "ece")
                if not (mine.decided and ece_ce.decided):
                    verdict = "undecided (no interval)"
                elif mine.hi < ece_ce.lo:
                    verdict = "supported (its ECE interval lies below cross-entropy's)"
                elif mine.lo > ece_ce.hi:
                    verdict = "contradicted (its ECE interval lies above cross-entropy's)"
                else:
                    verdict = "undecided (the ECE intervals overlap)"
                verdicts.append(verdict.split()[0])
                verdict = f" — at {lowest}: {verdict}"
            evidence.append(f"{ds} / {arch}@{width:g} / {obj}: " + "; ".join(parts) + verdict)
    if not verdicts:
        return Claim("training_objectives", statement_base + ".", "not tested", tested=False)
    counts = {v: verdicts.count(v) for v in dict.fromkeys(verdicts)}
    evidence.append(
        "Rises and TS gains are in ECE points with 95 % paired-bootstrap intervals (the first "
        "range estimator and range-calibration sample; several seeds combined as everywhere in "
        "the report). A negative TS gain means temperature scaling lowered ECE."
    )
    return Claim(
        "training_objectives",
        f"{statement_base} (each objective's ECE at {lowest} compared with cross-entropy's; its "
        "rise vs its own fp32 model beside).",
        ", ".join(f"{v} {k} of {len(verdicts)}" for v, k in counts.items()),
        tuple(evidence),
        tuple(numbers),
    )


def _share(cost: float | None, ref: float | None) -> str:
    return f"{100 * cost / ref:.0f} %" if cost is not None and ref else "–"


@register_claim
def calibration_budgeted_plans(rows: list[dict]) -> Claim:
    """Budgeting calibration chooses a different, safer mixed-precision plan than budgeting
    accuracy alone (the ``[quant] plans`` cells). Per model: each plan's cost (BOPs) relative to
    uniform W8A8, test accuracy and test ECE after temperature scaling. *supported* when the
    calibration plan's ECE interval lies wholly below the accuracy plan's, *contradicted* when
    wholly above, *same plan* when both chose the same bits (equal cost and logits), else
    *undecided*; the price is the cost ratio of the two plans."""
    statement = (
        "Budgeting calibration chooses a different, safer mixed-precision plan than budgeting "
        "accuracy alone, at a stated cost."
    )
    main = main_rows(rows)
    evidence, verdicts, numbers = [], [], []
    for ds, model in groups(main):
        rs = pick(main, dataset=ds, model=model)
        cal = pick(rs, precision="plan:calib", recal="temperature")
        acc = pick(rs, precision="plan:accuracy", recal="temperature")
        ref = pick(rs, precision="W8A8", recal="none") or pick(rs, precision="plan:calib")
        if not (cal and acc):
            continue
        e_cal, e_acc = aggregate(cal, "ece"), aggregate(acc, "ece")
        a_cal, a_acc = aggregate(cal, "accuracy"), aggregate(acc, "accuracy")
        c_cal, c_acc = cal[0].get("bops"), acc[0].get("bops")
        c_ref = ref[0].get("bops") if ref else None
        numbers += [
            number(ds, model, "plan:calib", "ece_after_ts", e_cal),
            number(ds, model, "plan:accuracy", "ece_after_ts", e_acc),
        ]
        if c_cal == c_acc and e_cal.value == e_acc.value and a_cal.value == a_acc.value:
            v = "same plan"
        elif not (e_cal.decided and e_acc.decided):
            v = "undecided (no interval)"
        elif e_cal.hi < e_acc.lo:
            v = "supported"
        elif e_cal.lo > e_acc.hi:
            v = "contradicted"
        else:
            v = "undecided (the ECE intervals overlap)"
        verdicts.append(v.split(" (")[0])

        evidence.append(
            f"{ds} / {model}: calibration plan at {_share(c_cal, c_ref)} of W8A8's BOPs, "
            f"accuracy {a_cal.text()} %, ECE after TS {e_cal.text()} %; accuracy-only plan at "
            f"{_share(c_acc, c_ref)}, accuracy {a_acc.text()} %, ECE after TS {e_acc.text()} % "
            f"— {v}."
        )
    if not verdicts:
        return Claim(
            "calibration_budgeted_plans",
            statement,
            "not tested",
            ("needs [quant] plans",),
            tested=False,
        )
    return Claim(
        "calibration_budgeted_plans",
        statement,
        summarise(verdicts),
        tuple(evidence),
        tuple(numbers),
    )
