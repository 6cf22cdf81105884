"""The verdicts written for a person: the terminal table (:func:`verdict_table`) and the
sentences about several cells at its top (:func:`summary`)."""

from __future__ import annotations

from quantcal.calibration import recal as _recal
from quantcal.findings.rows import aggregate, groups, main_rows, pick
from quantcal.findings.verdict_rules import confidence_side, pts, repairs, verdicts
from quantcal.findings.verdict_types import LIKE_FP32_RECAL, SAFE_AFTER_RECAL, Budget

__all__ = ["summary", "verdict_table"]


def verdict_table(rows: list[dict], budget: Budget | None = None) -> str:
    """The verdicts as plain text for the terminal: one line per model and precision (outcome,
    the recalibrator that repairs it, ≈ when the deciding interval straddles its line), then the
    summary sentences; "" when no cell has an fp32 reference."""
    from quantcal.report.tables import short_models

    vs = verdicts(rows, budget)
    if not vs:
        return ""
    archs = short_models([v.model.rpartition("@")[0] or v.model for v in vs])
    labels = {
        v.model: archs[v.model.rpartition("@")[0] or v.model]
        + ("@" + v.model.rpartition("@")[2] if "@" in v.model else "")
        for v in vs
    }
    mw = max(len(m) for m in labels.values())
    pw = max(5, *(len(v.precision) for v in vs))
    b = budget or Budget()
    lines = [
        f"verdicts (budget: accuracy -{100 * b.max_accuracy_drop:g}, ECE +"
        f"{100 * b.max_ece_rise:g} vs fp32, ECE at most {100 * b.max_ece:g} %):"
    ]
    for v in vs:
        how = (
            f" ({v.recal} -> {100 * v.best_ece.value:.1f} %)"
            if (v.outcome in (SAFE_AFTER_RECAL, LIKE_FP32_RECAL) and v.best_ece.value is not None)
            else ""
        )
        mark = " ≈" if v.borderline else ""
        gate = f"; abstention: {v.threshold}" if v.threshold else ""
        lines.append(f"  {labels[v.model]:<{mw}} {v.precision:<{pw}} {v.outcome}{how}{mark}{gate}")
    lines.extend(f"  {s}" for s in summary(rows, budget))
    return "\n".join(lines)


def summary(rows: list[dict], budget: Budget | None = None) -> list[str]:
    """Sentences for the top of the verdict table, each about several cells: an fp32 model
    over the absolute budget and what temperature scaling does to all its cells; a recalibrator
    that changes predictions and wins accuracy back; recalibrators fitted on too few images or
    whose fit raised the held-out ECE."""
    budget = budget or Budget()
    vs = verdicts(rows, budget)
    main = main_rows(rows)
    out = []
    for ds, model in dict.fromkeys((v.dataset, v.model) for v in vs):
        rs = pick(main, dataset=ds, model=model)
        fp_raw = pick(rs, precision="fp32", recal="none")
        fp_ece = aggregate(fp_raw, "ece")
        if fp_ece.value is None or fp_ece.value <= budget.max_ece:
            continue
        side = confidence_side(fp_raw)
        text = (
            f"{model}: the fp32 model itself is over the absolute budget, ECE "
            f"{pts(fp_ece.value)} %{side}; quantized cells no worse than it are marked "
            "“as trustworthy as fp32, which is not”"
        )
        ts = [
            aggregate(pick(rs, precision=p, recal="temperature"), "ece")
            for p in dict.fromkeys(r["precision"] for r in rs)
        ]
        if ts and all(e.value is not None for e in ts):
            worst = max(e.value for e in ts)
            text += (
                f". Temperature scaling takes every cell, fp32 included, to ≤ {pts(worst)} %"
                if worst <= budget.max_ece
                else f". Temperature scaling leaves up to {pts(worst)} %"
            )
        out.append(text + ".")
    for v in vs:
        if v.recal and v.recal_accuracy.value is not None and v.accuracy.value is not None:
            gain = v.recal_accuracy.value - v.accuracy.value
            if gain > budget.max_accuracy_drop and not _recal.keeps_predictions(v.recal):
                out.append(
                    f"{v.model} {v.precision}: {v.recal} changes predictions and wins back "
                    f"{pts(gain)} points of accuracy ({pts(v.accuracy.value)} → "
                    f"{pts(v.recal_accuracy.value)} %, fp32 {pts(v.fp32_accuracy.value)} %)."
                )
    small: dict[str, list[int]] = {}
    raised: dict[str, list[str]] = {}
    for ds, model in groups(main):
        rs = pick(main, dataset=ds, model=model)
        for p in dict.fromkeys(r["precision"] for r in rs):
            for c in repairs(pick(rs, precision=p)):
                if c.small_fit:
                    small.setdefault(c.method, []).append(c.n_fit)
                if c.raised_ece:
                    raised.setdefault(c.method, []).append(f"{model} {p}")
    if small:
        out.append(
            "Fitted on fewer images than this report trusts (at least "
            f"{_recal.MIN_FIT_IMAGES}, and {_recal.MIN_FIT_PER_PARAMETER} per fitted "
            "parameter): "
            + "; ".join(
                f"{m} on {_span(ns)} images ({_recal.min_fit_images(m, c)} needed) in "
                f"{len(ns)} cell(s)"
                for m, ns in small.items()
                for c in [_classes(main)]
            )
            + " (fp32 cells included). Their fits may not reproduce on another sample: a larger "
            "recalibration split settles it (data.val_size; when cross-fitted on test, a larger "
            "test split)."
        )
    for method, cells in raised.items():
        out.append(
            f"{method}'s fit measurably raised the held-out ECE in {len(cells)} cell(s) "
            f"({', '.join(cells)}); the verdicts do not count it as a repair there."
        )
    return out


def _span(ns: list[int]) -> str:
    return f"{min(ns)}" if min(ns) == max(ns) else f"{min(ns)}–{max(ns)}"


def _classes(main: list[dict]) -> int | None:
    ks = [r.get("n_classes") for r in main if r.get("n_classes") is not None]
    return int(max(ks)) if ks else None
