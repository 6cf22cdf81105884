"""The rules that judge each quantized cell (stated in :mod:`quantcal.findings.verdicts`): the
checks of a difference against its budget line, the recalibrators measured on a cell
(:func:`repairs`) and which of them may count as a repair, the fp32 reference, and the verdict of
every cell (:func:`verdicts`) with the reason in words."""

from __future__ import annotations

from dataclasses import dataclass, replace

from quantcal.calibration import recal as _recal
from quantcal.findings.rows import Estimate, aggregate, groups, main_rows, pick, prec_key
from quantcal.findings.verdict_types import (
    ACCURACY_LOST,
    LIKE_FP32_BROKEN,
    LIKE_FP32_RECAL,
    NONE,
    NOT_REPAIRABLE,
    SAFE,
    SAFE_AFTER_RECAL,
    Budget,
    Repair,
    Verdict,
)

__all__ = ["confidence_side", "pts", "repairs", "verdicts"]


def pts(x: float) -> str:
    """A fraction in points with one decimal: ``0.1234`` → ``12.3``."""
    return f"{100 * x:.1f}"


def _signed(e: Estimate) -> str:
    """``+0.02 [-0.62, +0.32]`` in points."""
    if e.value is None:
        return "–"
    if not e.decided:
        return f"{100 * e.value:+.2f}"
    return f"{100 * e.value:+.2f} [{100 * e.lo:+.2f}, {100 * e.hi:+.2f}]"


def _straddles(e: Estimate, line: float) -> bool:
    return e.decided and e.lo <= line <= e.hi


def _shift(e: Estimate, by: float) -> Estimate:
    """``e − by`` (an unpaired difference against a number)."""
    if e.value is None:
        return e
    lo = None if e.lo is None else e.lo - by
    hi = None if e.hi is None else e.hi - by
    return Estimate(e.value - by, lo, hi, e.n_seeds)


@dataclass(frozen=True)
class _Check:
    """A difference that decides a verdict, against its budget line (passes when ≤ line);
    ``words`` says it for a person."""

    words: str
    diff: Estimate
    line: float

    @property
    def passed(self) -> bool:
        return self.diff.value is not None and self.diff.value <= self.line + 1e-12

    @property
    def straddles(self) -> bool:
        return _straddles(self.diff, self.line)

    def text(self) -> str:
        return self.words


def _paired(what: str, d: Estimate, line: float) -> _Check:
    return _Check(f"{what} {_signed(d)} points (paired) vs the budget {100 * line:+g}", d, line)


def _against(what: str, e: Estimate, ref: float, line: float, why: str) -> _Check:
    """``e − ref ≤ line`` on ``e``'s own interval (``why``: why no paired one)."""
    return _Check(
        f"{what} {e.text()} % vs {pts(ref)} % {100 * line:+g} (its own interval: {why})",
        _shift(e, ref),
        line,
    )


def _absolute(what: str, e: Estimate, budget: Budget) -> _Check:
    return _Check(
        f"{what} {e.text()} % vs the absolute {100 * budget.max_ece:g} %",
        _shift(e, budget.max_ece),
        0.0,
    )


def _fit_size(rs: list[dict]) -> tuple[int | None, int | None]:
    """(images the recalibrator was fitted on, classes) of a cell's rows, where known: the
    ``n_fit`` and ``n_classes`` columns, else half of test when cross-fitted."""
    r = rs[0]
    n_fit = r.get("n_fit")
    if n_fit is None and r.get("recal_fit") == "test_crossfit" and r.get("n_test"):
        n_fit = int(r["n_test"]) // 2
    n_classes = r.get("n_classes")
    return (
        None if n_fit is None else int(n_fit),
        None if n_classes is None else int(n_classes),
    )


def repairs(cell: list[dict]) -> list[Repair]:
    """Every recalibrator measured on one cell's rows (all seeds), in the rows' order."""
    out = []
    for method in dict.fromkeys(r["recal"] for r in cell if r["recal"] != "none"):
        rs = [r for r in cell if r["recal"] == method]
        e = aggregate(rs, "ece")
        if e.value is None:
            continue
        n_fit, n_classes = _fit_size(rs)
        d_none = aggregate(rs, "ece_diff_vs_none")
        notes = _recal.fit_notes(method, n_fit, n_classes, (d_none.value, d_none.lo, d_none.hi))
        out.append(
            Repair(
                method,
                rs[0].get("recal_fit") or "val",
                e,
                aggregate(rs, "accuracy"),
                aggregate(rs, "ece_diff_vs_fp32"),
                d_none,
                _recal.keeps_predictions(method),
                _recal.fit_parameters(method, n_classes),
                tuple(notes),
                n_fit,
                n_classes,
            )
        )
    return out


def _usable(c: Repair, raw_acc: Estimate, budget: Budget) -> str:
    """Why ``c`` cannot be a repair whatever its ECE ('' when it can)."""
    if c.raised_ece:
        return (
            f"{c.method} raised the held-out ECE ({_signed(c.diff_vs_none)} points vs none, "
            "paired): not counted"
        )
    if c.accuracy.value is not None and raw_acc.value - c.accuracy.value > budget.max_accuracy_drop:
        return (
            f"{c.method} reaches {pts(c.ece.value)} % but changes predictions and costs "
            f"{pts(raw_acc.value - c.accuracy.value)} points of accuracy (budget "
            f"{100 * budget.max_accuracy_drop:g})"
        )
    return ""


def _prefer(cs: list[Repair]) -> Repair | None:
    """The lowest-ECE recalibrator, or one that keeps predictions with fewer parameters within
    noise of it (its ECE above the lowest by at most half its own interval)."""
    if not cs:
        return None
    low = min(cs, key=lambda c: c.ece.value)

    def noise(c: Repair) -> float:
        return (c.ece.hi - c.ece.lo) / 2 if c.ece.decided else 0.0

    near = [c for c in cs if c.ece.value - low.ece.value <= noise(c)]
    return min(
        near,
        key=lambda c: (
            not c.keeps_predictions,
            c.parameters if c.parameters is not None else 10**9,
            c.ece.value,
        ),
    )


def confidence_side(rows: list[dict]) -> str:
    """' (over-confident: mean confidence 3.2 points above accuracy)' or under-, or ''."""
    conf, acc = aggregate(rows, "mean_confidence"), aggregate(rows, "accuracy")
    if conf.value is None or acc.value is None:
        return ""
    gap = conf.value - acc.value
    if pts(abs(gap)) == "0.0":  # nothing to call over- or under-confident at this precision
        return " (mean confidence within 0.1 points of accuracy)"
    side, where = ("over", "above") if gap > 0 else ("under", "below")
    return f" ({side}-confident: mean confidence {pts(abs(gap))} points {where} accuracy)"


@dataclass(frozen=True)
class _Reference:
    """The fp32 model of a (dataset, model): accuracy, ECE, its best usable recalibrator."""

    accuracy: Estimate
    ece: Estimate
    best: Estimate
    best_method: str
    rows: tuple[dict, ...]


def _reference(fp: list[dict], budget: Budget) -> _Reference | None:
    raw = [r for r in fp if r["recal"] == "none"]
    if not raw:
        return None
    acc, ece = aggregate(raw, "accuracy"), aggregate(raw, "ece")
    if acc.value is None or ece.value is None:
        return None
    usable = [c for c in repairs(fp) if not _usable(c, acc, budget)]
    best = min(usable, key=lambda c: c.ece.value, default=None)
    if best is not None and best.ece.value < ece.value:
        return _Reference(acc, ece, best.ece, best.method, tuple(raw))
    return _Reference(acc, ece, ece, "none", tuple(raw))


def _ece_checks(c: Repair, ref: _Reference, budget: Budget) -> list[_Check]:
    """The checks of a recalibrated ECE: vs fp32's best + rise (paired when fp32's best is the
    same recalibrator), and vs the absolute ``max_ece``."""
    if ref.best_method == c.method and c.diff_vs_fp32.value is not None:
        rel = _paired(f"ΔECE vs fp32, both with {c.method},", c.diff_vs_fp32, budget.max_ece_rise)
    else:
        fb = "raw" if ref.best_method == "none" else f"with {ref.best_method}"
        rel = _against(
            f"ECE with {c.method}",
            c.ece,
            ref.best.value,
            budget.max_ece_rise,
            f"fp32's best is {fb}, the rows pair {c.method} only with fp32 + {c.method}",
        )
    return [rel, _absolute(f"ECE with {c.method}", c.ece, budget)]


def _accuracy_check(acc: Estimate, ref: _Reference, budget: Budget, who: str) -> _Check:
    drop = Estimate(
        ref.accuracy.value - acc.value,
        None if acc.hi is None else ref.accuracy.value - acc.hi,
        None if acc.lo is None else ref.accuracy.value - acc.lo,
        acc.n_seeds,
    )
    return _Check(
        f"accuracy {who}{acc.text()} % vs fp32 {pts(ref.accuracy.value)} % − "
        f"{100 * budget.max_accuracy_drop:g} (its own interval: no paired accuracy column)",
        drop,
        budget.max_accuracy_drop,
    )


def _repairs_cell(c: Repair, ref: _Reference, budget: Budget, raw_acc: Estimate) -> bool:
    acc = c.accuracy.value
    if acc is None:  # no accuracy column: only a recalibrator that keeps predictions is known
        acc = raw_acc.value if c.keeps_predictions else None
    acc_ok = acc is not None and ref.accuracy.value - acc <= budget.max_accuracy_drop + 1e-12
    return acc_ok and all(k.passed for k in _ece_checks(c, ref, budget))


def _accuracy_change(c: Repair, raw_acc: Estimate) -> str:
    """'vector changes predictions: accuracy 21.9 → 88.8 %' when it moves accuracy, or ''."""
    if c.keeps_predictions or c.accuracy.value is None or raw_acc.value is None:
        return ""
    if abs(c.accuracy.value - raw_acc.value) < 0.0005:
        return ""
    return (
        f"{c.method} changes predictions: accuracy {pts(raw_acc.value)} → {pts(c.accuracy.value)} %"
    )


def _fit_clause(c: Repair) -> str:
    """'; fitted on only 180 images, under the 500 trusted' or ''."""
    if not c.small_fit:
        return ""
    need = _recal.min_fit_images(c.method, c.n_classes)
    return f"; fitted on only {c.n_fit} images, under the {need} trusted"


def _repair_text(c: Repair, ref: _Reference, raw_acc: Estimate) -> str:
    fp = "raw" if ref.best_method == "none" else f"with {ref.best_method}"
    text = (
        f"{c.method} (fitted on {c.fit}) brings it to {pts(c.ece.value)} % vs fp32's best "
        f"{pts(ref.best.value)} % ({fp})"
    )
    change = _accuracy_change(c, raw_acc)
    text += f"; {change}" if change else "; it keeps every prediction" * c.keeps_predictions
    return text + _fit_clause(c)


def _passed_over(named: Repair | None, cands: list[Repair], set_aside: dict[str, str]) -> str:
    """Why lower-ECE recalibrators were not named: set aside (accuracy, a fit that raised
    ECE), or within noise of one that keeps predictions or fits fewer parameters."""
    if named is None:
        return ""
    lower = [c for c in cands if c is not named and c.ece.value < named.ece.value]
    parts = [set_aside[c.method] for c in lower if set_aside.get(c.method)]
    near = [c for c in lower if not set_aside.get(c.method)]
    if near:
        tail = "" if named.keeps_predictions else f"; {named.method} fits fewer parameters"
        parts.append(
            ", ".join(f"{c.method} {pts(c.ece.value)} %" for c in near)
            + f" {'is' if len(near) == 1 else 'are'} lower, within noise{tail}"
        )
    return f" ({'; '.join(parts)})" if parts else ""


def _budget_words(budget: Budget) -> str:
    return f"budget +{100 * budget.max_ece_rise:g}, at most {100 * budget.max_ece:g} %"


def _judge(
    ds: str, model: str, p: str, cell: list[dict], ref: _Reference, budget: Budget
) -> Verdict | None:
    raw = [r for r in cell if r["recal"] == "none"]
    if not raw:
        return None
    acc, ece = aggregate(raw, "accuracy"), aggregate(raw, "ece")
    if acc.value is None or ece.value is None:
        return None
    cands = repairs(cell)
    set_aside = {c.method: _usable(c, acc, budget) for c in cands}
    usable = [c for c in cands if not set_aside[c.method]]
    fixes = [c for c in usable if _repairs_cell(c, ref, budget, acc)]
    choice = _prefer(fixes)
    shown = choice or _prefer(usable) or min(cands, key=lambda c: c.ece.value, default=None)
    notes = tuple(n for c in cands for n in c.notes)

    d_raw = aggregate(raw, "ece_diff_vs_fp32")
    if d_raw.value is not None:
        rel = _paired("ΔECE vs fp32", d_raw, budget.max_ece_rise)
    else:
        rel = _against("ECE", ece, ref.ece.value, budget.max_ece_rise, "no ece_diff_vs_fp32")
    absolute = _absolute("ECE", ece, budget)
    acc_check = _accuracy_check(acc, ref, budget, "")
    fp32_bad = ref.ece.value > budget.max_ece
    gain = [t for c in usable if (t := _accuracy_change(c, acc)) and c.accuracy.value > acc.value]

    def vs_fp32() -> str:
        return (
            f"ECE {pts(ece.value)} % vs fp32 {pts(ref.ece.value)} % (paired difference "
            f"{_signed(d_raw)} points; {_budget_words(budget)})"
            if d_raw.value is not None
            else f"ECE {pts(ece.value)} % vs fp32 {pts(ref.ece.value)} % ({_budget_words(budget)})"
        )

    if not acc_check.passed and choice is None:
        outcome, checks = ACCURACY_LOST, [acc_check]
        reason = (
            f"accuracy {pts(acc.value)} % vs fp32 {pts(ref.accuracy.value)} %: "
            f"{pts(ref.accuracy.value - acc.value)} points lost, budget "
            f"{100 * budget.max_accuracy_drop:g}"
        )
        best_gain = max(
            (c for c in usable if c.accuracy.value is not None),
            key=lambda c: c.accuracy.value,
            default=None,
        )
        if gain and best_gain is not None:
            short = ref.accuracy.value - best_gain.accuracy.value
            reason += f"; {_accuracy_change(best_gain, acc)}, " + (
                f"still {pts(short)} points short of fp32"
                if short > budget.max_accuracy_drop
                else f"but its ECE {pts(best_gain.ece.value)} % is over budget"
            )
    elif not acc_check.passed:  # a recalibrator that changes predictions wins accuracy back
        outcome = SAFE_AFTER_RECAL
        checks = [
            _accuracy_check(choice.accuracy, ref, budget, "after it "),
            *_ece_checks(choice, ref, budget),
        ]
        reason = (
            f"accuracy {pts(acc.value)} % is {pts(ref.accuracy.value - acc.value)} points "
            f"under fp32's {pts(ref.accuracy.value)} %, but "
            + _repair_text(choice, ref, acc)
            + f" ({_budget_words(budget)})"
        )
    elif rel.passed and absolute.passed:
        outcome, checks = SAFE, [rel, absolute]
        reason = f"{vs_fp32()}; accuracy {pts(acc.value)} % vs fp32 {pts(ref.accuracy.value)} %"
    elif rel.passed and fp32_bad:
        side = confidence_side(list(ref.rows))
        head = (
            f"{vs_fp32()}: no worse than fp32, but fp32 itself is over the absolute budget "
            f"{100 * budget.max_ece:g} %{side}"
        )
        if choice is not None:
            outcome, checks = LIKE_FP32_RECAL, [rel, *_ece_checks(choice, ref, budget)]
            reason = f"{head}. Recalibrate: {_repair_text(choice, ref, acc)}"
        else:
            outcome, checks = LIKE_FP32_BROKEN, [rel, absolute]
            tried = (
                f"the best usable, {shown.method}, reaches {pts(shown.ece.value)} %"
                if shown is not None and not set_aside[shown.method]
                else "no usable recalibrator was measured"
            )
            reason = f"{head}; no recalibrator brings it within budget ({tried})"
    elif choice is not None:
        outcome, checks = SAFE_AFTER_RECAL, _ece_checks(choice, ref, budget)
        over = (
            f"over fp32's {pts(ref.ece.value)} % + {100 * budget.max_ece_rise:g}"
            if not rel.passed
            else f"over the absolute {100 * budget.max_ece:g} %"
        )
        reason = f"raw ECE {pts(ece.value)} % is {over}; {_repair_text(choice, ref, acc)}"
    else:
        outcome = NOT_REPAIRABLE
        checks = [k for k in (rel, absolute) if not k.passed]
        checks += [k for k in _ece_checks(shown, ref, budget) if not k.passed] if shown else []
        if shown is None:
            tried = "no recalibrator was measured"
        elif set_aside[shown.method]:
            tried = f"no usable recalibrator ({set_aside[shown.method]})"
        elif shown.ece.value >= ece.value:
            tried = (
                f"no recalibrator lowers it (the best, {shown.method}, reaches "
                f"{pts(shown.ece.value)} %)"
            )
        else:
            tried = f"the best recalibrator, {shown.method}, reaches {pts(shown.ece.value)} %"
            change = _accuracy_change(shown, acc)
            tried += f" ({change})" if change else ""
        reason = (
            f"raw ECE {pts(ece.value)} %; {tried}; fp32's best is {pts(ref.best.value)} % "
            f"({_budget_words(budget)})"
        )
    named = choice or shown
    if outcome not in (SAFE, ACCURACY_LOST):
        reason += _passed_over(named, cands, set_aside)
    borderline = any(k.straddles for k in checks)
    basis = "; ".join(k.text() for k in checks if k.straddles or not borderline)
    return Verdict(
        ds,
        model,
        p,
        outcome,
        acc,
        ref.accuracy,
        ece,
        ref.ece,
        named.ece if named else NONE,
        ref.best,
        named.method if named else "",
        named.fit if named else "",
        borderline,
        reason,
        named.accuracy if named else NONE,
        basis,
        notes,
    )


def verdicts(rows: list[dict], budget: Budget | None = None) -> list[Verdict]:
    """The verdict of every quantized cell that has an fp32 reference, in model then precision
    order (see :mod:`quantcal.findings.verdicts`)."""
    budget = budget or Budget()
    main = main_rows(rows)
    out: list[Verdict] = []
    for ds, model in groups(main):
        rs = pick(main, dataset=ds, model=model)
        ref = _reference(pick(rs, precision="fp32"), budget)
        if ref is None:
            continue
        for p in sorted({r["precision"] for r in rs} - {"fp32"}, key=prec_key):
            v = _judge(ds, model, p, pick(rs, precision=p), ref, budget)
            if v is not None:
                deployed = v.recal if v.outcome in (SAFE_AFTER_RECAL, LIKE_FP32_RECAL) else "none"
                out.append(replace(v, threshold=_threshold(pick(rs, precision=p, recal=deployed))))
    return out


def _threshold(rows: list[dict]) -> str:
    """The worst threshold-transfer outcome over the rows' seeds ("" when none measured)."""
    from quantcal.findings.threshold import OUTCOMES

    seen = [r.get("threshold_outcome") for r in rows if r.get("threshold_outcome") in OUTCOMES]
    return max(seen, key=OUTCOMES.index) if seen else ""
