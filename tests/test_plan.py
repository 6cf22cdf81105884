"""Mixed precision: per-layer plans equal uniform quantization where they should, costs match
the model statistics, the search keeps a fragile layer high and respects its budget."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quantcal import models, quant
from quantcal.quant.apply import quantized_layers
from quantcal.quant.plan import compose_plan


class Net(nn.Module):
    """Five layers; in ``c3`` one weight per output channel is 20x the others, so 4-bit weights
    round the rest of each channel to zero, and that weight's input (c2's channel 0, biased far
    below zero) is always 0: at 4 bits c3 outputs nothing but its bias."""

    def __init__(self, fragile: bool = True) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1)
        self.c3 = nn.Conv2d(16, 16, 3, padding=1)
        self.c4 = nn.Conv2d(16, 16, 1)
        self.fc = nn.Linear(16, 10)
        with torch.no_grad():
            for m in (self.c1, self.c2, self.c3, self.c4, self.fc):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.3)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            if fragile:
                self.c3.weight[:, 0, 0, 0] = 6.0
                self.c2.bias[0] = -100.0

    def forward(self, x):
        x = torch.relu(self.c1(x))
        x = torch.relu(self.c2(x))
        x = torch.relu(self.c3(x)) * 0.05
        x = torch.relu(self.c4(x))
        return self.fc(x.mean((2, 3))) * 3


def _data(net: nn.Module, n: int = 1200, seed: int = 1):
    """Inputs and labels the fp32 model gets right by construction (its own argmax), kept where
    its top-2 margin is in the upper half (no near-ties that 8-bit noise would flip)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * n, 3, 8, 8, generator=g)
    with torch.no_grad():
        z = net.eval()(x)
    top2 = z.topk(2, dim=1).values
    keep = (top2[:, 0] - top2[:, 1]).argsort(descending=True)[:n].sort().values
    return x[keep], z[keep].argmax(1)


def _batches(x, y, bs=200):
    return [(x[i : i + bs], y[i : i + bs]) for i in range(0, len(x), bs)]


def test_a_plan_of_one_width_is_the_uniform_quantization_bit_for_bit():
    net = Net().eval()
    x, _ = _data(net, 256)
    calib = [x[:128]]
    names = [n for n, _ in quantized_layers(quant.quantize(net, "W4A8", calib))]
    uniform = quant.quantize(net, "W4A8", calib)
    planned = quant.quantize(
        net,
        quant.QuantConfig(weight_bits=8, act_bits=8, layer_bits={n: (4, 8) for n in names}),
        calib,
    )
    assert torch.equal(uniform(x), planned(x))
    # a mixed plan equals the uniform models composed layer by layer (ranges see fp32 inputs)
    levels = [quant.quantize(net, p, calib) for p in ("W8A8", "W4A8")]
    mixed = quant.quantize(net, quant.QuantConfig(layer_bits={"c3": (4, 8), "fc": (4, 8)}), calib)
    composed = compose_plan(levels, {"c3": 1, "fc": 1})
    assert torch.equal(mixed(x), composed(x))
    assert mixed.precision == "W8A8+mixed(2)"
    assert dict(quantized_layers(mixed))["c3"].weight_bits == 4
    assert dict(quantized_layers(mixed))["c2"].weight_bits == 8


def test_costs_agree_with_the_model_statistics():
    net = models.create_model("shufflenetv2", num_classes=10, image_size=16, width=0.25, seed=0)
    deploy = models.to_deploy(net)
    costs = quant.layer_costs(deploy, torch.zeros(1, 3, 16, 16))
    stats = models.describe(deploy, 16, in_chans=3)
    assert sum(c.macs for c in costs.values()) == stats.macs  # every MAC is in a conv/linear
    for bits in (8, 4):
        plan = {n: (bits, 8) for n in costs}
        other = stats.weight_bytes - 4 * sum(c.params for c in costs.values())
        assert (
            other + quant.plan_cost(costs, plan)
            == models.describe(deploy, 16, in_chans=3, weight_bits=bits).weight_bytes
        )
    bops = quant.plan_cost(costs, {n: (4, 4) for n in costs}, "bops")
    assert bops == 16 * stats.macs
    with pytest.raises(ValueError, match="unknown cost"):
        quant.plan_cost(costs, {n: (4, 4) for n in costs}, "latency")


def test_the_search_keeps_the_fragile_layer_high_and_the_budget():
    net = Net().eval()
    x, y = _data(net)
    calib = [x[:200]]
    budget = quant.PlanBudget(max_accuracy_drop=0.02, max_ece_rise=0.02)
    r = quant.plan_mixed_precision(
        net, calib, _batches(x[200:], y[200:]), budget=budget, levels=("W8A8", "W4A8")
    )
    assert r.within_budget
    assert r.plan["c3"] == (8, 8)  # the fragile layer stays at 8 bits
    assert sum(b == (4, 8) for b in r.plan.values()) >= 3  # the others go down
    assert r.sensitivity["c3"]["W4A8"] == max(s["W4A8"] for s in r.sensitivity.values())
    assert r.fp32["accuracy"] - r.metrics["accuracy"] <= budget.max_accuracy_drop
    assert r.metrics["ece"] - r.fp32["ece"] <= budget.max_ece_rise
    assert r.uniform_costs["W4A8"] < r.cost < r.uniform_costs["W8A8"]
    # the plan re-measured through quantize gives the same check-half numbers
    q = quant.quantize(net, r.config, calib)
    assert q.precision.startswith("W4A8+mixed") and r.evaluations > 5
    assert r.as_dict()["plan"]["c3"] == [8, 8]


def test_cost_is_monotone_as_the_budget_loosens_and_accuracy_only_is_cheaper():
    net = Net().eval()
    x, y = _data(net)
    calib = [x[:200]]
    val = _batches(x[200:], y[200:])
    costs = []
    for drop in (0.0, 0.01, 0.05, 0.3, 1.0):
        r = quant.plan_mixed_precision(
            net,
            calib,
            val,
            budget=quant.PlanBudget(drop, drop),
            levels=("W8A8", "W4A8", "W4A4"),
            cost="bops",
        )
        costs.append(r.cost)
    assert costs == sorted(costs, reverse=True)
    assert costs[-1] == r.uniform_costs["W4A4"]  # no budget: everything at the bottom
    calib_plan = quant.plan_mixed_precision(
        net, calib, val, budget=quant.PlanBudget(0.05, 0.0), cost="bops"
    )
    acc_plan = quant.plan_mixed_precision(
        net, calib, val, budget=quant.PlanBudget(0.05, None), cost="bops"
    )
    assert acc_plan.cost <= calib_plan.cost
    assert "ece" not in acc_plan.metrics


def test_bad_plans_and_budgets_are_clear_errors():
    net = Net().eval()
    x, y = _data(net, 64)
    with pytest.raises(ValueError, match="max_ece_rise must be a fraction"):
        quant.PlanBudget(max_ece_rise=-0.1)
    with pytest.raises(ValueError, match="max_accuracy_drop"):
        quant.PlanBudget(max_accuracy_drop=None)
    with pytest.raises(ValueError, match="unknown recalibrator 'platt'"):
        quant.PlanBudget(recal="platt")
    with pytest.raises(ValueError, match="unknown cost"):
        quant.plan_mixed_precision(net, [x], _batches(x, y), cost="latency")
    with pytest.raises(ValueError, match="from most to fewest bits"):
        quant.plan_mixed_precision(net, [x], _batches(x, y), levels=("W4A8", "W8A8"))
    with pytest.raises(ValueError, match="at least two"):
        quant.plan_mixed_precision(net, [x], _batches(x, y), levels=("W8A8",))
    with pytest.raises(ValueError, match="val_batches is empty"):
        quant.plan_mixed_precision(net, [x], [])
    with pytest.raises(ValueError, match=r"does not quantize: nope; its layers are c1, c2"):
        quant.quantize(net, quant.QuantConfig(layer_bits={"nope": (4, 4)}), [x])
    with pytest.raises(ValueError, match="names a layer twice"):
        quant.QuantConfig(layer_bits=[("c1", 4, 4), ("c1", 8, 8)])
    with pytest.raises(ValueError, match=r"weight bits must be in 2\.\.16"):
        quant.QuantConfig(layer_bits={"c1": (1, 8)})
    assert (
        quant.QuantConfig().to_dict()
        == quant.QuantConfig.from_dict(quant.QuantConfig().to_dict()).to_dict()
    )
    cfg = quant.QuantConfig(layer_bits={"c2": (4, 8), "c1": (4, 4)})
    assert cfg.layer_bits == (("c1", 4, 4), ("c2", 4, 8))
    assert quant.QuantConfig.from_dict(cfg.to_dict()) == cfg


def test_describe_reports_a_plans_weight_bytes_and_bops():
    net = Net().eval()
    deploy = models.to_deploy(net)
    uniform = models.describe(deploy, 8, in_chans=3, weight_bits=4)
    as_config = models.describe(deploy, 8, in_chans=3, config=quant.QuantConfig(4, 8))
    assert as_config.weight_bytes == uniform.weight_bytes
    assert as_config.bops == 4 * 8 * as_config.macs
    mixed = models.describe(
        deploy, 8, in_chans=3, config=quant.QuantConfig(4, 4, layer_bits={"c3": (8, 8)})
    )
    costs = quant.layer_costs(deploy, torch.zeros(1, 3, 8, 8))
    assert mixed.bops == sum(c.macs * (64 if n == "c3" else 16) for n, c in costs.items())
    assert (
        uniform.weight_bytes
        < mixed.weight_bytes
        < models.describe(deploy, 8, in_chans=3, weight_bits=8).weight_bytes
    )
    assert models.describe(deploy, 8, in_chans=3).bops == 32 * 32 * uniform.macs
    assert uniform.bops is None  # activation bits unknown


def test_a_plan_whose_top_level_breaks_the_budget_is_said():
    """The fragile layer costs W4A8 most of its accuracy: with W4A8 as the top level no plan
    keeps a 2-point budget; the result says so and a study cell gets a note."""
    from quantcal.study.notes import plan_notes

    net = Net().eval()
    x, y = _data(net)
    r = quant.plan_mixed_precision(
        net,
        [x[:200]],
        _batches(x[200:], y[200:]),
        budget=quant.PlanBudget(0.02, 0.02),
        levels=("W4A8", "W4A4"),
    )
    assert not r.within_budget
    assert set(r.plan.values()) == {(4, 8)}
    (note,) = plan_notes(r.as_dict(), "plan:calib")
    assert "plan:calib: even uniform W4A8 breaks the budget on validation" in note
    assert "loosen the budget" in note
    ok = quant.plan_mixed_precision(
        net, [x[:200]], _batches(x[200:], y[200:]), levels=("W8A8", "W4A8")
    )
    assert plan_notes(ok.as_dict(), "plan:calib") == []
