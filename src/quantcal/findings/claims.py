"""Claims as objects: each finding is a small function over result rows returning a ``Claim``.

A claim function takes the rows of ``results.csv`` (as :func:`quantcal.report.load_rows` reads
them) and returns a :class:`Claim`: the statement, a verdict, the evidence as sentences and as
rows of numbers with intervals, and whether this study tests it at all. They are registered in
order in ``CLAIMS`` (``register_claim`` adds one); :func:`evaluate` runs them all.

Which claims a study tests is decided from its rows, never from its name:

- the paper's claim 1 (ECE grows as precision falls) needs, for some model, fp32 and a quantized
  precision (the verdict is on the lowest one);
- claim 2 (GhostNet-VGG is the most robust) needs ``ghostnet_vgg16`` and another architecture
  on the same dataset, each at fp32 and the lowest precision;
- claim 3 (temperature scaling helps quantized nets but fails for 4-bit MobileOne) needs
  temperature scaling at a quantized precision; its MobileOne half needs ``mobileone_s0``;
- the extras need what they compare (a reused fp32 temperature; several range-calibration
  samples; several training objectives).

Seeds are aggregated one way everywhere (:func:`quantcal.findings.rows.aggregate`): per-seed values
(each a paired difference with its bootstrap interval where the column is one), then their mean
with an interval that holds the test-image variance within seeds and the training variance
between them. The paper: Kuang & Wong, "On Calibration of Modern Quantized Efficient Neural
Networks", arXiv 2309.13866.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from quantcal.findings.rows import Estimate, aggregate, groups, main_rows, ok, pct, pick, prec_key

__all__ = ["CLAIMS", "Claim", "evaluate", "register_claim"]


@dataclass(frozen=True)
class Claim:
    """A claim judged on one study's numbers.

    ``verdict`` is ``supported``, ``contradicted``, ``undecided`` (with the reason), ``mixed:
    ...`` (a count per verdict over models), ``see the numbers`` (a measurement, not a test) or
    ``not tested`` (``tested`` False; ``evidence`` then says what the study would need).
    ``rows``: the numbers behind it, one dict per model and precision with ``quantity``,
    ``value``, ``lo``, ``hi`` and ``n_seeds``.
    """

    key: str
    statement: str
    verdict: str
    evidence: tuple[str, ...] = ()
    rows: tuple[dict[str, Any], ...] = ()
    source: str = "quantcal"
    tested: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """``{"claim", "verdict", "evidence", "key", "source", "tested", "rows"}``."""
        return {
            "claim": self.statement,
            "verdict": self.verdict,
            "evidence": list(self.evidence),
            "key": self.key,
            "source": self.source,
            "tested": self.tested,
            "rows": [dict(r) for r in self.rows],
        }


#: ``fn(rows)``, or ``fn(rows, details)`` for a claim judged on ``details.json`` as well (the
#: ablation's paired contrasts, the per-layer attribution).
ClaimFn = Callable[..., Claim]
#: The registered claims, in report order.
CLAIMS: list[ClaimFn] = []


def register_claim(fn: ClaimFn) -> ClaimFn:
    """Add a claim function to ``CLAIMS`` (a decorator)."""
    CLAIMS.append(fn)
    return fn


def evaluate(rows: list[dict], details: dict[str, Any] | None = None) -> list[Claim]:
    """Every registered claim on the rows (and ``details``, for those that read it), in
    order."""
    import inspect

    out = []
    for fn in CLAIMS:
        takes_details = len(inspect.signature(fn).parameters) > 1
        out.append(fn(rows, details or {}) if takes_details else fn(rows))
    return out


def _interval_verdict(e: Estimate, positive: str, negative: str) -> str:
    """``positive`` when the interval lies above 0, ``negative`` below, else undecided."""
    if not e.decided:
        return "undecided (no interval)"
    if e.lo > 0:
        return positive
    if e.hi < 0:
        return negative
    return "undecided (interval contains 0)"


def summarise(verdicts: list[str]) -> str:
    """One verdict for several models: the common one, or a count per verdict."""
    if not verdicts:
        return "not tested in this run"
    counts = {v: verdicts.count(v) for v in dict.fromkeys(verdicts)}
    if len(counts) == 1:
        return f"{verdicts[0]} ({len(verdicts)} of {len(verdicts)})"
    return "mixed: " + ", ".join(f"{v} {c} of {len(verdicts)}" for v, c in counts.items())


def _number(ds: str, model: str, precision: str, quantity: str, e: Estimate) -> dict[str, Any]:
    return {
        "dataset": ds,
        "model": model,
        "precision": precision,
        "quantity": quantity,
        "value": e.value,
        "lo": e.lo,
        "hi": e.hi,
        "n_seeds": e.n_seeds,
    }


def _seeds(e: Estimate) -> str:
    return f" (mean of {e.n_seeds} seeds)" if e.n_seeds > 1 else ""


def _precisions(rows: list[dict]) -> list[str]:
    return sorted({r["precision"] for r in rows}, key=prec_key)


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
        precs = _precisions(rs)
        quantized = [p for p in precs if p != "fp32"]
        if "fp32" not in precs or not quantized:
            continue
        lowest = quantized[-1]
        eces = {p: aggregate(pick(rs, precision=p), "ece") for p in precs}
        accs = {p: aggregate(pick(rs, precision=p), "accuracy") for p in precs}
        rise = aggregate(pick(rs, precision=lowest), "ece_diff_vs_fp32")
        v = _interval_verdict(rise, "supported", "contradicted")
        verdicts.append(v.split()[0])
        numbers += [_number(ds, model, p, "ece", eces[p]) for p in precs]
        numbers.append(_number(ds, model, lowest, "ece_diff_vs_fp32", rise))
        evidence.append(
            f"{ds} / {model}: ECE % "
            + " → ".join(f"{p} {pct(eces[p].value)}" for p in precs)
            + f"; {lowest} − fp32 = {rise.text(2, sign=True)} points (paired bootstrap)"
            + f"{_seeds(rise)} — {v}. Accuracy % "
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
        quantized = [p for p in _precisions(in_ds) if p != "fp32"]
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
            numbers.append(_number(ds, model, lowest, "ece_diff_vs_fp32", rise))
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
        quantized = [p for p in _precisions(ts_rows) if p != "fp32"]
        for p in quantized:
            ts = pick(ts_rows, precision=p)
            raw = aggregate(pick(main, dataset=ds, model=model, recal="none", precision=p), "ece")
            after = aggregate(ts, "ece")
            change = aggregate(ts, "ece_diff_vs_none")
            residual = aggregate(ts, "ece_diff_vs_fp32")
            temps = [r["temperature"] for r in ts if r.get("temperature") is not None]
            v = _interval_verdict(change, "made worse", "improved")
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
            res = _interval_verdict(residual, "still above fp32+TS", "below fp32+TS")
            numbers.append(_number(ds, model, p, "ece_diff_vs_none", change))
            numbers.append(_number(ds, model, p, "ece_diff_vs_fp32", residual))
            t = f" with T = {sum(temps) / len(temps):.3g}" if temps else ""
            sentence = (
                f"{ds} / {model} {p}: ECE {pct(raw.value)} → {pct(after.value)} %{t} ({v}; "
                f"change {change.text(2, sign=True)}){_seeds(change)}; vs fp32 after TS: {res}."
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
        for p in [p for p in _precisions(pick(main, dataset=ds, model=model)) if p != "fp32"]:
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
                _number(ds, model, p, "ece_reuse_fp32_T", a),
                _number(ds, model, p, "ece_refit_T", b),
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
        for p in _precisions(pick(good, dataset=ds, model=model)):
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
    quantized = [p for p in _precisions(good) if p != "fp32"]
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
                numbers.append(_number(ds, f"{arch}@{width:g} {obj}", p, "ece", ece))
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
            _number(ds, model, "plan:calib", "ece_after_ts", e_cal),
            _number(ds, model, "plan:accuracy", "ece_after_ts", e_acc),
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


@register_claim
def separable_mechanism(rows: list[dict], details: dict[str, Any]) -> Claim:
    """The paper's explanation of its architecture ranking, judged on the controlled ablation:
    the separable variant against the dense base at matched parameters and MACs, everything
    else equal. Per precision: the ECE-rise contrast (variant's ECE rise under quantization
    minus the base's, as is, paired bootstrap over the test images). *supported* when it lies
    above 0 at the lowest precision, *contradicted* when below, else *undecided*."""
    statement = (
        "Depthwise-separable convolutions lose more calibration under quantization than dense "
        "ones (the paper's explanation), at matched parameters and MACs."
    )
    recs = [r for r in _ablation_records(details) if r["property"] == "block"]
    if not recs:
        return Claim(
            "separable_mechanism",
            statement,
            "not tested",
            ("needs ablation_base and ablation_separable in one study (the ablation preset)",),
            source="Kuang & Wong, arXiv 2309.13866",
            tested=False,
        )
    evidence, verdicts, numbers = [], [], []
    for key in dict.fromkeys((r["dataset"], r["width"], r["objective"], r["seed"]) for r in recs):
        sel = [r for r in recs if (r["dataset"], r["width"], r["objective"], r["seed"]) == key]
        sel.sort(key=lambda r: prec_key(r["precision"]))
        for r in sel:
            c = r["ece_rise"]["contrast"]
            evidence.append(
                f"{key[0]} (width {key[1]:g}, seed {key[3]}), {r['precision']}: separable ECE "
                f"rise {_pts(r['ece_rise']['variant'])} points vs dense "
                f"{_pts(r['ece_rise']['base'])}; difference {_pts(c)} "
                f"({_contrast_verdict(c)}); accuracy drop difference "
                f"{_pts(r['accuracy_drop']['contrast'])} points."
            )
            numbers.append(
                {
                    "dataset": key[0],
                    "model": "ablation_separable - ablation_base",
                    "precision": r["precision"],
                    "quantity": "ece_rise_contrast",
                    **c,
                    "n_seeds": 1,
                }
            )
        low = sel[-1]["ece_rise"]["contrast"]  # the lowest precision (last in plan order)
        verdicts.append(
            "supported"
            if low["lo"] > 0
            else "contradicted"
            if low["hi"] < 0
            else "undecided (interval contains 0)"
        )
    return Claim(
        "separable_mechanism",
        statement,
        summarise(verdicts),
        tuple(evidence),
        tuple(numbers),
        source="Kuang & Wong, arXiv 2309.13866",
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
