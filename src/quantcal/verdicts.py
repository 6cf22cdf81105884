"""The deployer's verdict per model and precision, from a budget the study sets.

For each quantized cell (dataset, model, precision; the first range estimator and
range-calibration sample; seeds aggregated by :func:`quantcal._rows.aggregate`), with the same
model's fp32 cell as the reference and a :class:`Budget` (defaults: 1 point each):

1. **not safe: accuracy lost** when fp32 accuracy − quantized accuracy > ``max_accuracy_drop``
   (no recalibrator changes a top-1 decision much, and temperature scaling none);
2. else **safe as is** when the quantized model's raw ECE ≤ the fp32 model's raw ECE +
   ``max_ece_rise`` (deploying it without recalibration is no less trustworthy than deploying
   the fp32 model without it);
3. else **safe after recalibration** when some recalibrator (the one with the lowest ECE is
   named, with where it was fitted) brings the quantized ECE to ≤ the fp32 model's best ECE (its
   raw or recalibrated ECE, whichever is lower) + ``max_ece_rise``, and does not cost more than
   ``max_accuracy_drop`` of accuracy vs fp32;
4. else **not safe: confidence cannot be repaired**.

Point estimates decide; each verdict carries the numbers and intervals behind it, and is
``borderline`` when the interval of the deciding quantity straddles its budget line.
"""

from __future__ import annotations

from dataclasses import dataclass

from quantcal._rows import Estimate, aggregate, groups, main_rows, pick, prec_key

__all__ = ["OUTCOMES", "Budget", "Verdict", "verdicts"]

SAFE = "safe as is"
SAFE_AFTER_RECAL = "safe after recalibration"
ACCURACY_LOST = "not safe: accuracy lost"
NOT_REPAIRABLE = "not safe: confidence cannot be repaired"
#: The outcomes, from best to worst.
OUTCOMES = (SAFE, SAFE_AFTER_RECAL, ACCURACY_LOST, NOT_REPAIRABLE)


@dataclass(frozen=True)
class Budget:
    """What a deployer accepts vs fp32: top-1 accuracy lost and ECE gained (fractions: 0.01 is
    one point)."""

    max_accuracy_drop: float = 0.01
    max_ece_rise: float = 0.01

    def __post_init__(self) -> None:
        for name in ("max_accuracy_drop", "max_ece_rise"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be a fraction in [0, 1] (0.01 = 1 point), got {v!r}")


@dataclass(frozen=True)
class Verdict:
    """One quantized cell's outcome (see the module docstring) and the numbers behind it.

    ``recal`` and ``recal_fit`` name the best recalibrator and where it was fitted (empty when
    none was measured); ``best_ece`` is its ECE, ``fp32_best_ece`` the fp32 model's best.
    """

    dataset: str
    model: str
    precision: str
    outcome: str
    accuracy: Estimate
    fp32_accuracy: Estimate
    ece: Estimate
    fp32_ece: Estimate
    best_ece: Estimate
    fp32_best_ece: Estimate
    recal: str
    recal_fit: str
    borderline: bool
    reason: str

    @property
    def safe(self) -> bool:
        return self.outcome in (SAFE, SAFE_AFTER_RECAL)


def _straddles(e: Estimate, line: float) -> bool:
    return e.decided and e.lo <= line <= e.hi


def _best(rows: list[dict]) -> tuple[str, str, Estimate, Estimate]:
    """(method, fitted on, ECE, accuracy) of the recalibrator with the lowest mean ECE."""
    best: tuple[str, str, Estimate, Estimate] | None = None
    for method in dict.fromkeys(r["recal"] for r in rows if r["recal"] != "none"):
        rs = [r for r in rows if r["recal"] == method]
        e = aggregate(rs, "ece")
        if e.value is not None and (best is None or e.value < best[2].value):
            best = (method, rs[0].get("recal_fit") or "val", e, aggregate(rs, "accuracy"))
    return best or ("", "", Estimate(None, None, None, 0), Estimate(None, None, None, 0))


def verdicts(rows: list[dict], budget: Budget | None = None) -> list[Verdict]:
    """The verdict of every quantized cell that has an fp32 reference, in model then precision
    order (see the module docstring)."""
    budget = budget or Budget()
    main = main_rows(rows)
    out: list[Verdict] = []
    for ds, model in groups(main):
        rs = pick(main, dataset=ds, model=model)
        fp = pick(rs, precision="fp32")
        fp_raw = [r for r in fp if r["recal"] == "none"]
        if not fp_raw:
            continue
        fp_acc, fp_ece = aggregate(fp_raw, "accuracy"), aggregate(fp_raw, "ece")
        _, _, fp_best, _ = _best(fp)
        fp_best = fp_best if fp_best.value is not None and fp_best.value < fp_ece.value else fp_ece
        for p in sorted({r["precision"] for r in rs} - {"fp32"}, key=prec_key):
            cell = pick(rs, precision=p)
            raw = [r for r in cell if r["recal"] == "none"]
            if not raw:
                continue
            acc, ece = aggregate(raw, "accuracy"), aggregate(raw, "ece")
            method, fit, best, best_acc = _best(cell)
            drop = fp_acc.value - acc.value
            acc_line = fp_acc.value - budget.max_accuracy_drop
            ece_line = fp_ece.value + budget.max_ece_rise
            repair_line = fp_best.value + budget.max_ece_rise
            if drop > budget.max_accuracy_drop:
                outcome = ACCURACY_LOST
                borderline = _straddles(acc, acc_line)
                reason = (
                    f"accuracy {100 * acc.value:.1f} % vs fp32 {100 * fp_acc.value:.1f} %: "
                    f"{100 * drop:.1f} points lost, budget {100 * budget.max_accuracy_drop:g}"
                )
            elif ece.value <= ece_line:
                outcome = SAFE
                borderline = _straddles(ece, ece_line)
                reason = (
                    f"ECE {100 * ece.value:.1f} % vs fp32 {100 * fp_ece.value:.1f} % (budget +"
                    f"{100 * budget.max_ece_rise:g}); accuracy {100 * acc.value:.1f} % vs fp32 "
                    f"{100 * fp_acc.value:.1f} %"
                )
            elif (
                best.value is not None
                and best.value <= repair_line
                and fp_acc.value - best_acc.value <= budget.max_accuracy_drop
            ):
                outcome = SAFE_AFTER_RECAL
                borderline = _straddles(best, repair_line)
                reason = (
                    f"raw ECE {100 * ece.value:.1f} % is over budget; {method} (fitted on {fit}) "
                    f"brings it to {100 * best.value:.1f} % vs fp32's best "
                    f"{100 * fp_best.value:.1f} % (budget +{100 * budget.max_ece_rise:g})"
                )
            else:
                outcome = NOT_REPAIRABLE
                borderline = best.value is not None and _straddles(best, repair_line)
                if best.value is None:
                    tried = "no recalibrator was measured"
                elif best.value >= ece.value:
                    tried = (
                        f"no recalibrator lowers it (the best, {method}, reaches "
                        f"{100 * best.value:.1f} %)"
                    )
                else:
                    tried = f"the best recalibrator, {method}, reaches {100 * best.value:.1f} %"
                reason = (
                    f"raw ECE {100 * ece.value:.1f} %; {tried}; fp32's best is "
                    f"{100 * fp_best.value:.1f} % (budget +{100 * budget.max_ece_rise:g})"
                )
            out.append(
                Verdict(
                    ds,
                    model,
                    p,
                    outcome,
                    acc,
                    fp_acc,
                    ece,
                    fp_ece,
                    best,
                    fp_best,
                    method,
                    fit,
                    borderline,
                    reason,
                )
            )
    return out
