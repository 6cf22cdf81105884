"""Contracts the documentation states, each tested from the statement itself rather than from the
code's constants: the integer grids per bit width (README "Quantization"), the verdict budget
compared at exact equality (``verdicts`` module docstring: "≤ fp32's ECE + max_ece_rise"), and
the plan search's two validation halves ("recalibrators are fitted on one and the budget is
checked on the other"). A planted change to any of them fails here."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from _results import hand_row
from quantcal import quant
from quantcal.calibration import metrics, recal
from quantcal.findings.verdicts import ACCURACY_LOST, NOT_REPAIRABLE, SAFE, Budget, verdicts
from quantcal.quant import primitives as P

# ---------------------------------------------------------------------------------------------
# The grids, as the README writes them: weights symmetric per output channel, integers in
# [−(2^(b−1)−1), 2^(b−1)−1], scale_c = max|W_c| / (2^(b−1) − 1); activations asymmetric per
# tensor, integers in [0, 2^b − 1], scale = (max − min) / (2^b − 1), the range widened to hold 0.
# The literals below are the documented numbers, not the code's.
# ---------------------------------------------------------------------------------------------
WEIGHT_GRID = {
    2: (-1, 1),
    3: (-3, 3),
    4: (-7, 7),
    6: (-31, 31),
    8: (-127, 127),
    16: (-32767, 32767),
}
ACTIVATION_GRID = {2: (0, 3), 4: (0, 15), 6: (0, 63), 8: (0, 255), 16: (0, 65535)}


@pytest.mark.parametrize("bits", sorted(WEIGHT_GRID))
def test_weight_integers_fill_the_documented_symmetric_grid(bits):
    lo, hi = WEIGHT_GRID[bits]
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(5, 3, 3, 3, generator=g)
    w[0].abs_()  # a channel whose extreme is positive ...
    w[1] = -w[1].abs()  # ... and one whose extreme is negative
    scale = P.weight_scale_per_channel(w, bits)
    expected = w.abs().amax(dim=(1, 2, 3)) / hi
    torch.testing.assert_close(scale, expected, rtol=1e-6, atol=0)
    q = P.quantize_per_channel(w, scale, bits)
    assert int(q.min()) >= lo and int(q.max()) <= hi
    assert int(q[0].max()) == hi and int(q[1].min()) == lo  # each channel's extreme reaches it
    assert int(q.abs().amax(dim=(1, 2, 3)).min()) == hi  # and every channel's does


@pytest.mark.parametrize("bits", sorted(ACTIVATION_GRID))
def test_activation_grid_and_zero_point_are_the_documented_ones(bits):
    lo_q, hi_q = ACTIVATION_GRID[bits]
    scale, zero = P.activation_qparams(-0.5, 1.5, bits)
    assert scale == pytest.approx(2.0 / hi_q, rel=1e-6)
    assert zero == round(0.5 / (2.0 / hi_q))
    assert lo_q <= zero <= hi_q
    # a range that does not hold 0 is widened to hold it: [0.2, 1.0] is quantized as [0, 1.0]
    scale, zero = P.activation_qparams(0.2, 1.0, bits)
    assert scale == pytest.approx(1.0 / hi_q, rel=1e-6) and zero == 0
    x = torch.linspace(-3, 3, 101)
    y = torch.fake_quantize_per_tensor_affine(x, scale, zero, lo_q, hi_q)
    assert float(y.min()) == 0.0 and float(y.max()) == pytest.approx(1.0, rel=1e-6)


def test_a_quantized_layer_stores_integers_on_the_documented_grid():
    """End to end: W4A8 layers hold int8 integers in [−7, 7] (README: quantized once)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    x = torch.randn(16, 3, 8, 8)
    q = quant.quantize(net, quant.parse_precision("W4A8"), [x])
    for _, layer in quant.quantized_layers(q):
        ints = layer.weight_int
        assert ints.dtype == torch.int8
        assert int(ints.min()) >= -7 and int(ints.max()) <= 7
        assert int(ints.abs().amax()) == 7


# ---------------------------------------------------------------------------------------------
# The verdict budget at equality (module docstring: "safe as is when accuracy is within budget,
# ECE ≤ fp32's ECE + max_ece_rise and ECE ≤ max_ece"; "accuracy lost when fp32 accuracy −
# quantized accuracy > max_accuracy_drop"). The numbers are exact in binary, so "on the line"
# means on it, not 1e-16 beside it.
# ---------------------------------------------------------------------------------------------
def _cell(precision, acc, ece, diff=None):
    paired = (
        {}
        if diff is None
        else dict.fromkeys(("ece_diff_vs_fp32", "ece_diff_vs_fp32_lo", "ece_diff_vs_fp32_hi"), diff)
    )
    return hand_row(precision, "none", acc, ece, half=0.0625, **paired)


BUDGET = Budget(max_accuracy_drop=0.125, max_ece_rise=0.125, max_ece=1.0)


def _verdict(acc, ece):
    (v,) = verdicts([_cell("fp32", 0.5, 0.25), _cell("W4A4", acc, ece, ece - 0.25)], BUDGET)
    return v


def test_an_ece_rise_exactly_at_the_budget_is_within_it():
    assert _verdict(0.5, 0.375).outcome == SAFE  # +0.125 == max_ece_rise
    assert _verdict(0.5, 0.375 + 2**-20).outcome == NOT_REPAIRABLE  # just above the line


def test_an_accuracy_drop_exactly_at_the_budget_is_within_it():
    assert _verdict(0.375, 0.25).outcome == SAFE  # 0.5 − 0.375 == max_accuracy_drop
    assert _verdict(0.375 - 2**-20, 0.25).outcome == ACCURACY_LOST


def test_the_absolute_ece_budget_at_equality():
    budget = Budget(max_accuracy_drop=0.125, max_ece_rise=0.125, max_ece=0.375)
    rows = [_cell("fp32", 0.5, 0.25), _cell("W4A4", 0.5, 0.375, 0.125)]
    assert verdicts(rows, budget)[0].outcome == SAFE  # 0.375 == max_ece
    rows[1] = _cell("W4A4", 0.5, 0.375 + 2**-20, 0.125 + 2**-20)
    assert verdicts(rows, Budget(0.125, 0.25, 0.375))[0].outcome != SAFE


# ---------------------------------------------------------------------------------------------
# The plan search's halves (README "Mixed precision": "Validation is split in two stratified
# halves: recalibrators are fitted on one and the budget is checked on the other").
# ---------------------------------------------------------------------------------------------
def test_plan_recalibrators_are_fitted_on_one_half_and_the_budget_checked_on_the_other(
    monkeypatch,
):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(48, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    x = torch.randn(400, 3, 4, 4)
    with torch.no_grad():
        y = net(x).argmax(1)
    fitted: list[torch.Tensor] = []
    checked: list[torch.Tensor] = []
    real_get, real_accuracy = recal.get, metrics.accuracy

    def recording_get(name):
        cls = real_get(name)

        class Recording(cls):  # type: ignore[misc, valid-type]
            def fit(self, logits, labels):
                fitted.append(logits.detach().clone())
                return super().fit(logits, labels)

        return Recording

    def recording_accuracy(logits, labels, *a, **kw):
        checked.append(logits.detach().clone())
        return real_accuracy(logits, labels, *a, **kw)

    monkeypatch.setattr(recal, "get", recording_get)
    monkeypatch.setattr(metrics, "accuracy", recording_accuracy)
    quant.plan_mixed_precision(
        net,
        [x[:64]],
        [(x[i : i + 100], y[i : i + 100]) for i in range(0, 400, 100)],
        budget=quant.PlanBudget(0.5, 0.5, "temperature"),
        levels=["W8A8", "W4A4"],
        extend=0,
    )
    assert fitted and checked
    # Each recorded row is one validation image's logits under some plan; the fp32 model's come
    # first. Identify images by the fp32 logits: fit and check rows must be disjoint halves.
    with torch.no_grad():
        z = net(x)

    def images(rows: torch.Tensor) -> set[int]:
        d = torch.cdist(rows.double(), z.double())
        return set(d.argmin(1).tolist())

    fit_images, check_images = images(fitted[0]), images(checked[0])
    assert len(fit_images) == len(check_images) == 200
    assert not fit_images & check_images


def test_the_plan_confidence_is_a_study_key_and_false_is_the_point_rule():
    """``[quant] plans.confidence``: a level in [0.5, 1), or false for point estimates; unset,
    the plan cells keep their keys (the spec holds it only when given)."""
    from quantcal import study

    base = {"name": "p", "model": [{"arch": "resnet20", "width": 0.25}]}
    cfg = study.load_study({**base, "quant": {"plans": {"confidence": 0.8}}})
    assert cfg.plan_spec("calib")["confidence"] == 0.8
    cfg = study.load_study({**base, "quant": {"plans": {"confidence": False}}})
    assert cfg.plan_spec("calib")["confidence"] is False
    assert study.load_study(cfg.to_toml_dict()).plan_spec("calib")["confidence"] is False
    assert "confidence" not in study.load_study({**base, "quant": {"plans": True}}).plan_spec("c")
    with pytest.raises(ValueError, match=r"quant\.plans\.confidence must be a one-sided level"):
        study.load_study({**base, "quant": {"plans": {"confidence": 1.5}}})
