"""Calibration-budgeted mixed precision: the cheapest per-layer bit plan whose accuracy *and*
calibration stay within a budget.

Mixed-precision searches in the style of HAWQ (Dong et al., ICCV 2019; HAWQ-V3, ICML 2021),
AIMET's AMP or NNCF budget accuracy only. :func:`plan_mixed_precision` budgets the ECE after
recalibration as well, because accuracy and calibration do not fall together under quantization
(Kuang & Wong, arXiv 2309.13866).

**Layers are independent here**: ``quantize`` observes each layer's range on its *fp32* input, so a
layer quantized at some bits is the same module whatever the other layers' bits. A plan is
therefore evaluated by composing, layer by layer, the modules of uniform quantizations at each
level (bit-identical to ``quantize`` with the plan; tested), and never needs requantizing.

**The search**, for levels ordered from most to fewest bits (default W8A8, W4A8, W4A4):

1. *Sensitivities*: each layer alone dropped to each lower level, the rest at the top level; its
   penalty is the rise in validation NLL (smooth in the logits, where a single layer rarely moves
   accuracy or ECE measurably) plus, for a calibration budget, its rise in ECE after the
   recalibrator.
2. *Order*: moves (layer, level) sorted by penalty per byte (or BOP) saved.
3. *Binary search* for the longest prefix of that order whose whole model keeps the budget, then
   *greedy extension* with single further moves, each verified, and *back-off* (the prefix
   shrinks) when interactions break a budget the parts kept.

**A budget is kept with its uncertainty**, not as a point estimate: a plan keeps it only where
the one-sided upper confidence bound (``PlanBudget.confidence``, default 90 %) of its accuracy
loss vs fp32, and of its ECE rise after the recalibrator when that is budgeted, stays within the
budget on the check half (and so does the point estimate). The bounds are percentiles of a
paired bootstrap over the check images (``metrics.paired_bootstrap_diff``, ``BOUND_RESAMPLES``
resamples, seeded): every resample scores the plan and fp32 on the same images, so the noise
they share cancels. They hold the sampling of the check images, not the variability of the
recalibrator's fit on the fit half. A point-estimate search on 2,500 images let plans lose 1.5
to 1.8 points on test against a 1-point budget; ``confidence=None`` restores it.

**Overfitting the validation set**: validation is split in two stratified halves; recalibrators
are fitted on one (``fit``) and every budget is checked on the other (``check``), so a plan is
never judged on the images its recalibrator saw. The search never reads the images it is scored
on: a study passes ``val`` (or, for a checkpoint trained elsewhere whose ``val`` was carved from
the train split it has seen, one stratified half of test, and scores the plan on the other half;
see ``quantcal.training.images``) and reports the found plan's numbers beside the uniform precisions
(``[quant] plans``), which shows whether the budget held out of sample.

**Costs** (:func:`layer_costs`): weight bytes (each quantized layer's weight at its bits, rounded
up per tensor, plus one fp32 scale per output channel; other parameters at 32 bits, as
``models.describe``) or BOPs (Σ MACs · weight bits · activation bits per image, Baskin et al.
2021).

This module holds the search (and :func:`compose_plan`, which it evaluates plans with). The
settings' checks, ``PlanBudget`` and ``PlanResult`` live in ``quant.plan_budget`` and the costs in
``quant.plan_costs``; all stay importable from here.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from quantcal.quant.config import QuantConfig
from quantcal.quant.plan_budget import (
    BOUND_RESAMPLES,
    Label,
    PlanBudget,
    PlanResult,
    check_budget,
    check_confidence,
    check_cost,
    check_levels,
)
from quantcal.quant.plan_costs import COSTS, LayerCost, layer_costs, plan_cost

__all__ = [
    "COSTS",
    "Label",
    "LayerCost",
    "PlanBudget",
    "PlanResult",
    "check_budget",
    "check_confidence",
    "check_cost",
    "check_levels",
    "compose_plan",
    "layer_costs",
    "plan_cost",
    "plan_mixed_precision",
]


# ----------------------------------------------------------------------------- composition


def compose_plan(
    levels: list[nn.Module], assignment: dict[str, int], base: nn.Module | None = None
) -> nn.Module:
    """A mixed model from uniform quantizations of one deploy model (``levels``, made by
    ``quantize`` with one config each): layer ``name`` takes level ``assignment[name]``'s module
    (default 0). ``base`` (a copy of ``levels[0]``, reused across calls) is modified in place and
    returned."""
    from quantcal.quant.graph import set_submodule
    from quantcal.quant.layers import quantized_layers

    out = base if base is not None else copy.deepcopy(levels[0])
    tables = [dict(quantized_layers(m)) for m in levels]
    for name in tables[0]:
        set_submodule(out, name, tables[assignment.get(name, 0)][name])
    return out


# ----------------------------------------------------------------------------- the search


def _halves(labels: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    import numpy as np

    from quantcal.training import data

    n = labels.shape[0]
    if n < 4:
        raise ValueError(f"plan_mixed_precision needs at least 4 validation images, got {n}")
    a, b = data.stratified_split(labels.numpy(), np.arange(n), n // 2, np.random.default_rng(seed))
    return torch.from_numpy(np.sort(a)), torch.from_numpy(np.sort(b))


class _Scorer:
    """Logits of a model on the validation images, and the budget's metrics on the check half
    (the recalibrator fitted on the fit half)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, budget: PlanBudget, seed: int, bs: int):
        self.x, self.y, self.budget, self.bs, self.seed = x, y, budget, bs, seed
        self.fit, self.check = _halves(y, seed)
        self.evaluations = 0
        self.always_ece = False  # set when a memo is shared with calibration-budgeted searches

    def logits(self, model: nn.Module) -> torch.Tensor:
        self.evaluations += 1
        device = next(iter(model.buffers()), torch.zeros(0)).device
        with torch.no_grad():
            return torch.cat(
                [
                    model(self.x[i : i + self.bs].to(device)).float().cpu()
                    for i in range(0, len(self.x), self.bs)
                ]
            )

    def metrics(self, z: torch.Tensor) -> dict[str, float]:
        return self.measure(z)[0]

    def measure(
        self, z: torch.Tensor
    ) -> tuple[dict[str, float], torch.Tensor, torch.Tensor | None]:
        """(metrics on the check half, its logits as is, and after the recalibrator fitted on
        the fit half, or None when ECE is not measured)."""
        from quantcal.calibration import metrics, recal

        zc, yc = z[self.check], self.y[self.check]
        out = {
            "accuracy": metrics.accuracy(zc, yc),
            "nll": metrics.nll(zc, yc),
            "ece_raw": metrics.ece(zc, yc),
        }
        zr = None
        if self.budget.calibration or self.always_ece:
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a degenerate fit is still a number to compare
                fitted = recal.get(self.budget.recal)().fit(z[self.fit], self.y[self.fit])
            zr = fitted(zc)
            out["ece"] = metrics.ece(zr, yc)
        return out, zc, zr

    def bounds(
        self,
        check: tuple[torch.Tensor, torch.Tensor | None],
        fp32: tuple[torch.Tensor, torch.Tensor | None],
    ) -> dict[str, float]:
        """One-sided upper bounds at ``budget.confidence`` of the accuracy drop and (when the
        recalibrated logits are there) the ECE rise vs fp32 on the check half: the upper end of
        a two-sided paired-bootstrap percentile interval at level ``2 · confidence − 1``."""
        return paired_upper_bounds(
            check, fp32, self.y[self.check], self.budget.confidence or 0.9, self.seed
        )


def paired_upper_bounds(
    plan: tuple[torch.Tensor, torch.Tensor | None],
    fp32: tuple[torch.Tensor, torch.Tensor | None],
    labels: torch.Tensor,
    confidence: float,
    seed: int,
    n_resamples: int = BOUND_RESAMPLES,
) -> dict[str, float]:
    """``{"accuracy_drop_hi": ..., "ece_rise_hi": ...}``: one-sided ``confidence`` upper bounds of
    ``accuracy(fp32) − accuracy(plan)`` and ``ECE(plan) − ECE(fp32)`` (each pair is (logits as
    is, recalibrated logits or None); the ECE bound only with both recalibrated), by a paired
    bootstrap over the images (Efron & Tibshirani 1993, ch. 16)."""
    from quantcal.calibration import metrics

    level = 2 * confidence - 1
    kw = {"n_resamples": n_resamples, "level": level, "seed": seed}
    out = {
        "accuracy_drop_hi": metrics.paired_bootstrap_diff(
            "accuracy", fp32[0], plan[0], labels, **kw
        )[2]
    }
    if plan[1] is not None and fp32[1] is not None:
        out["ece_rise_hi"] = metrics.paired_bootstrap_diff("ece", plan[1], fp32[1], labels, **kw)[2]
    return out


def _within(m: dict[str, float], ref: dict[str, float], budget: PlanBudget) -> bool:
    """The budget kept: point losses and, with a ``confidence``, their upper bounds."""
    drop = ref["accuracy"] - m["accuracy"]
    if budget.confidence is not None:
        drop = max(drop, m["accuracy_drop_hi"])
    if drop > budget.max_accuracy_drop:
        return False
    if not budget.calibration:
        return True
    rise = m["ece"] - ref["ece"]
    if budget.confidence is not None:
        rise = max(rise, m["ece_rise_hi"])
    return rise <= budget.max_ece_rise


def _penalty(m: dict[str, float], top: dict[str, float], budget: PlanBudget) -> float:
    p = max(0.0, m["nll"] - top["nll"]) + max(0.0, top["accuracy"] - m["accuracy"])
    if budget.calibration:
        p += max(0.0, m["ece"] - top["ece"])
    return p


def plan_mixed_precision(
    model: nn.Module,
    calib_batches: Iterable[Any],
    val_batches: Iterable[Any],
    *,
    budget: PlanBudget | None = None,
    levels: Iterable[str] = ("W8A8", "W4A8", "W4A4"),
    cost: str = "bops",
    base_config: QuantConfig | None = None,
    seed: int = 0,
    batch_size: int = 256,
    extend: int = 8,
    memo: dict | None = None,
    log: Any = None,
) -> PlanResult:
    """The cheapest plan found whose validation accuracy and ECE after ``budget.recal`` stay
    within ``budget`` of fp32, with their one-sided upper confidence bounds at
    ``budget.confidence`` (default 90 %, paired bootstrap over the check half; see the module
    docstring for the search and the rule).

    Args:
        model: any model ``quantize`` takes (it is not modified).
        calib_batches: range-calibration batches (``ptq_calib``), as for ``quantize``.
        val_batches: ``(x, y)`` validation batches; split into a fit and a check half.
        budget: the budget (default 1 point of accuracy and of ECE after temperature scaling);
            ``PlanBudget(max_ece_rise=None)`` is accuracy only.
        levels: precisions from most to fewest bits, each ``"WxAy"``.
        cost: ``"bops"`` (default; weights and activations both count) or ``"weight_bytes"``.
        base_config: observer and other settings shared by every level (its bits are ignored).
        extend: single moves tried after the binary search.
        memo: a dict shared by searches of the same model, data, levels, recalibrator, seed and
            confidence (a calibration budget and an accuracy-only one, say): each plan's
            validation metrics are measured once (``evaluations`` counts only new measurements;
            a plan whose bounds were not yet measured is measured again).
        log: called with a line of progress now and then (the sensitivities every tenth of
            the layers, each binary-search step); None: silent.

    When even the top level breaks the budget, the result is the all-top plan with
    ``within_budget`` False.
    """
    from quantcal.models.deploy import to_deploy
    from quantcal.quant.apply import batch_inputs, quantize, quantized_layers

    budget = budget or PlanBudget()
    check_cost(cost, label=lambda k: k)
    configs = check_levels(
        levels if isinstance(levels, (str, list, tuple)) else list(levels), label=lambda k: k
    )
    if base_config is not None:
        configs = [
            QuantConfig.from_dict(
                {
                    **base_config.to_dict(),
                    "weight_bits": qc.weight_bits,
                    "act_bits": qc.act_bits,
                    "layer_bits": (),
                }
            )
            for qc in configs
        ]
    t0 = time.perf_counter()
    calib = batch_inputs(calib_batches)
    xs, ys = [], []
    for batch in val_batches:
        xs.append(batch[0])
        ys.append(batch[1])
    if not xs:
        raise ValueError("val_batches is empty: the budget is checked on validation images")
    scorer = _Scorer(torch.cat(xs), torch.cat(ys).long().cpu(), budget, seed, batch_size)

    deploy = to_deploy(model)
    quantized = [quantize(deploy, c, calib) for c in configs]
    names = [n for n, _ in quantized_layers(quantized[0])]
    costs = layer_costs(deploy, scorer.x[:1].to(next(iter(deploy.parameters())).device))
    bits = [(c.weight_bits, c.act_bits) for c in configs]

    def plan_of(assign: dict[str, int]) -> dict[str, tuple[int, int]]:
        return {n: bits[assign.get(n, 0)] for n in names}

    work = copy.deepcopy(quantized[0])

    if memo is not None:
        scorer.always_ece = True

    bounded = budget.confidence is not None
    if memo is not None and "fp32" in memo:
        fp32, fp32_check = memo["fp32"], memo["fp32_check"]
    else:
        fp32, *fp32_check = scorer.measure(scorer.logits(deploy))
        if memo is not None:
            memo["fp32"], memo["fp32_check"] = fp32, fp32_check

    def evaluate(assign: dict[str, int], bound: bool = False) -> dict[str, float]:
        """The plan's check-half metrics; with ``bound`` (and a confidence) its upper bounds."""
        bound = bound and bounded
        key = tuple(sorted((n, j) for n, j in assign.items() if j))
        if memo is not None and key in memo and (not bound or "accuracy_drop_hi" in memo[key]):
            return memo[key]
        m, *check = scorer.measure(scorer.logits(compose_plan(quantized, assign, work)))
        if bound:
            m = {**m, **scorer.bounds(tuple(check), tuple(fp32_check))}
        if memo is not None:
            memo[key] = m
        return m

    top = evaluate({}, bound=True)
    uniform = {c.name: plan_cost(costs, {n: b for n in names}, cost) for c, b in zip(configs, bits)}
    say = log or (lambda _line: None)
    sensitivity: dict[str, dict[str, float]] = {}
    moves = []
    step = max(1, len(names) // 10)
    for i, n in enumerate(names):
        if i % step == 0:
            say(
                f"sensitivities: layer {i + 1} of {len(names)} ({scorer.evaluations} "
                f"validation passes, {time.perf_counter() - t0:.0f} s)"
            )
        sensitivity[n] = {}
        layer_cost = [plan_cost({n: costs[n]}, {n: b}, cost) for b in bits]
        for j in range(1, len(configs)):
            if layer_cost[j] >= layer_cost[j - 1]:
                continue  # saves nothing in this cost (A4 under weight bytes): never worth a risk
            m = evaluate({n: j})
            pen = _penalty(m, top, budget)
            sensitivity[n][configs[j].name] = pen
            moves.append((pen / (layer_cost[0] - layer_cost[j]), n, j))
    moves.sort()

    def prefix(k: int) -> dict[str, int]:
        assign: dict[str, int] = {}
        for _, n, j in moves[:k]:
            assign[n] = max(assign.get(n, 0), j)
        return assign

    within_top = _within(top, fp32, budget)
    best_k, best_m = 0, top
    if within_top:
        lo, hi = 0, len(moves)
        while lo < hi:  # the longest prefix that keeps the budget (back-off on failure)
            mid = (lo + hi + 1) // 2
            m = evaluate(prefix(mid), bound=True)
            ok = _within(m, fp32, budget)
            verb = "keep" if ok else "break"
            say(f"search: the first {mid} of {len(moves)} moves {verb} the budget")
            if ok:
                lo, best_m = mid, m
            else:
                hi = mid - 1
        best_k = lo
        if best_k and best_m is top:
            best_m = evaluate(prefix(best_k), bound=True)
    assign = prefix(best_k)
    tried = 0
    for _, n, j in moves[best_k:]:  # greedy extension: single further moves, each verified
        if tried >= extend or not within_top:
            break
        if assign.get(n, 0) >= j:
            continue
        tried += 1
        candidate = {**assign, n: j}
        m = evaluate(candidate, bound=True)
        if _within(m, fp32, budget):
            assign, best_m = candidate, m
    plan = plan_of(assign)
    counts = {b: sum(v == b for v in plan.values()) for b in bits}
    base_w, base_a = max(bits, key=lambda b: counts[b])  # the fewest overrides
    config = QuantConfig.from_dict(
        {
            **configs[0].to_dict(),
            "weight_bits": base_w,
            "act_bits": base_a,
            "layer_bits": tuple(
                (n, w, a) for n, (w, a) in plan.items() if (w, a) != (base_w, base_a)
            ),
        }
    )
    return PlanResult(
        plan=plan,
        config=config,
        budget=budget,
        cost_kind=cost,
        cost=plan_cost(costs, plan, cost),
        uniform_costs=uniform,
        metrics=best_m,
        fp32=fp32,
        evaluations=scorer.evaluations,
        seconds=time.perf_counter() - t0,
        sensitivity=sensitivity,
        within_budget=within_top,
        n_check=int(scorer.check.shape[0]),
    )
