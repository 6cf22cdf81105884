"""The controlled ablation family (quantcal.models.ablation): matched deploy budgets, exactly one
property changed per variant, the RepVGG variant's deploy equivalence, W4A4 quantization."""

from __future__ import annotations

import operator

import pytest
import torch
from torch import nn

from quantcal import models, quant
from quantcal.models import ablation
from quantcal.models._attention import ConvAttention
from quantcal.models.ablation import (
    ABLATION_BASE,
    ABLATION_VARIANTS,
    BASE_PROPERTIES,
    RepConvUnit,
    SqueezeExcite,
    ablation_budget,
)
from quantcal.models.deploy import to_deploy
from quantcal.models.mobileone import MobileOneBlock
from test_models import _randomise_bn

NAMES = sorted(ABLATION_VARIANTS)
VARIANTS = [n for n in NAMES if n != ABLATION_BASE]
SETUPS = {32: (3, 100), 28: (3, 9), 8: (1, 10)}  # image_size: (in_chans, num_classes)


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def build(name: str, width: float, size: int, seed: int = 0) -> nn.Module:
    chans, classes = SETUPS[size]
    return models.create_model(
        name, num_classes=classes, image_size=size, in_chans=chans, width=width, seed=seed
    )


def test_registry_and_table():
    assert set(NAMES) <= set(models.list_models())
    assert len(NAMES) == 8
    assert ABLATION_VARIANTS[ABLATION_BASE] == ("base", "reference")
    for name in VARIANTS:
        prop, value = ABLATION_VARIANTS[name]
        assert prop in BASE_PROPERTIES and value != BASE_PROPERTIES[prop]
        model = build(name, 0.25, 8)
        assert model.variant == (prop, value) and model.config["name"] == name


# ---------------------------------------------------------------- (a) matched budget
@pytest.mark.parametrize("size", [32, 8])
@pytest.mark.parametrize("width", [0.25, 0.5, 1.0])
def test_deploy_budget_matched_within_10_percent(width, size):
    """describe(to_deploy(model)) of every variant within 10 % of the base's, params and MACs;
    and the closed form ablation_budget is exactly what describe measures."""
    chans, classes = SETUPS[size]
    measured = {}
    for name in NAMES:
        model = build(name, width, size)
        stats = models.describe(to_deploy(model), size, in_chans=chans)
        measured[name] = (stats.params, stats.macs)
        kw = {"width": width, "image_size": size, "num_classes": classes, "in_chans": chans}
        assert ablation_budget(name, **kw) == measured[name], name
    base_params, base_macs = measured[ABLATION_BASE]
    for name, (params, macs) in measured.items():
        assert abs(params / base_params - 1) <= 0.10, (name, params, base_params)
        assert abs(macs / base_macs - 1) <= 0.10, (name, macs, base_macs)


def test_closed_form_budget_matched_on_a_wider_grid():
    """Widths 0.25-2, every size 8-32, grey or RGB, 2-100 classes: within 7.5 % (docstring)."""
    for width in (0.25, 0.375, 0.5, 0.75, 1.0, 1.5, 2.0):
        for size in range(8, 33):
            for chans, classes in ((3, 100), (1, 10), (3, 10), (3, 9), (1, 2)):
                kw = {"width": width, "image_size": size, "num_classes": classes}
                base_params, base_macs = ablation_budget(ABLATION_BASE, in_chans=chans, **kw)
                for name in VARIANTS:
                    params, macs = ablation_budget(name, in_chans=chans, **kw)
                    bound = 0.063 if name == "ablation_attention" else 0.075
                    assert abs(params / base_params - 1) <= bound, (name, kw, chans)
                    assert abs(macs / base_macs - 1) <= bound, (name, kw, chans)


def test_documented_width_1_numbers():
    """The module docstring's table (100 classes, 32x32, RGB); the base is ResNet-20, whose
    train-time form has 269,722 parameters at 10 classes (convs 267,696 + BN 1,376 + FC 650)."""
    kw = {"image_size": 32, "num_classes": 100, "in_chans": 3}
    assert ablation_budget(ABLATION_BASE, width=1.0, **kw) == (274_884, 40_556_800)
    ten = models.create_model(ABLATION_BASE, num_classes=10)
    assert sum(p.numel() for p in ten.parameters()) == 269_722
    for name in VARIANTS:
        assert f"{ablation_budget(name, width=1.0, **kw)[0]:,}" in ablation.__doc__, name
        assert f"{ablation_budget(name, width=0.25, **kw)[0]:,}" in ablation.__doc__, name


def test_tiny_width_that_cannot_be_matched_warns():
    with pytest.warns(UserWarning, match="within 10%"):
        model = models.create_model("ablation_separable", num_classes=10, width=0.1)
    assert max(map(abs, model.budget_deviation)) > 0.10


# ---------------------------------------------------------------- (b) exactly one property
_ACTS = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.Hardswish: "hardswish"}


def _adds(graph_module: torch.fx.GraphModule) -> int:
    """Additions of two activations (residuals): not an attention unit's x + position table."""
    return sum(
        n.op == "call_function"
        and n.target in (operator.add, torch.add)
        and not any(getattr(a, "op", None) == "get_attr" for a in n.args)
        for n in graph_module.graph.nodes
    )


def _properties(model: nn.Module) -> dict[str, str]:
    """Each property of BASE_PROPERTIES read off the model itself."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    depthwise = [m for m in convs if m.groups == m.in_channels > 1]
    se = [m for m in model.modules() if isinstance(m, SqueezeExcite)]
    inside_se = {id(a) for s in se for a in s.modules()}
    acts = {_ACTS[type(m)] for m in model.modules() if type(m) in _ACTS and id(m) not in inside_se}
    assert len(acts) == 1, acts
    adds = _adds(to_deploy(model))  # the deploy graph: the train-time RepVGG branches add too
    assert adds in (0, 9), adds
    return {
        "block": "separable" if depthwise else "dense",
        "residual": "on" if adds == 9 else "off",
        "activation": acts.pop(),
        "se": "on" if se else "off",
        "reparam": "multi-branch"
        if any(isinstance(m, MobileOneBlock) for m in model.modules())
        else "single-branch",
        "attention": "on" if any(isinstance(m, ConvAttention) for m in model.modules()) else "off",
    }


@pytest.mark.parametrize("name", NAMES)
def test_each_variant_changes_exactly_its_property(name):
    props = _properties(build(name, 0.25, 8))
    if name == ABLATION_BASE:
        assert props == BASE_PROPERTIES
        return
    prop, value = ABLATION_VARIANTS[name]
    assert props == {**BASE_PROPERTIES, prop: value}


def test_property_details():
    base = build(ABLATION_BASE, 0.25, 8)
    assert not any(isinstance(m, (nn.ReLU6, nn.Hardswish, SqueezeExcite)) for m in base.modules())
    assert all(m.groups == 1 for m in base.modules() if isinstance(m, nn.Conv2d))
    # separable: every block 3x3 is depthwise (18), followed by a 1x1; the stem stays dense
    sep = build("ablation_separable", 0.25, 8)
    convs = [m for m in sep.modules() if isinstance(m, nn.Conv2d)]
    dw = [m for m in convs if m.groups == m.in_channels > 1 and m.kernel_size == (3, 3)]
    assert len(dw) == 18 and convs[0].groups == 1
    # the stem keeps the base's width; the stages are re-matched (c' > c)
    assert sep.stem_channels == base.stem_channels == base.base_channels
    assert sep.base_channels > base.base_channels
    assert sep.stage_channels == tuple(sep.base_channels * k for k in (1, 2, 4))
    assert sum(m.kernel_size == (1, 1) for m in convs) == 18
    # SE: one per block, sigmoid gate
    se = [m for m in build("ablation_se", 0.25, 8).modules() if isinstance(m, SqueezeExcite)]
    assert len(se) == 9 and all(isinstance(m.gate, nn.Sigmoid) for m in se)
    # no_residual: the same parameters as the base (option-A shortcuts have none)
    plain = build("ablation_no_residual", 0.25, 8)
    assert [p.shape for p in plain.parameters()] == [p.shape for p in base.parameters()]
    assert _adds(to_deploy(plain)) == 0 and _adds(to_deploy(base)) == 9


def test_attention_variant_swaps_only_the_last_stages_second_units():
    """BoTNet's swap: three ConvAttention units (one per last-stage block) over the 8x8 map,
    every other parameter shaped as the base's; the attention width D is the matched one."""
    att, base = build("ablation_attention", 0.5, 32), build(ABLATION_BASE, 0.5, 32)
    units = [m for m in att.modules() if isinstance(m, ConvAttention)]
    assert len(units) == 3 and att.base_channels == base.base_channels == 8
    d = att.attention_channels
    assert d == ablation.ablation_attention_channels(
        "ablation_attention", width=0.5, image_size=32, num_classes=100
    )
    seen = []
    hooks = [
        u.register_forward_hook(lambda m, a, o: seen.append((a[0].shape, o.shape))) for u in units
    ]
    att(torch.randn(2, 3, 32, 32))
    for h in hooks:
        h.remove()
    assert seen == [((2, 32, 8, 8), (2, 32, 8, 8))] * 3
    for u in units:
        assert u.heads == 2 and u.size == (8, 8) and u.qkv.out_channels == 3 * d
        assert u.proj.in_channels == d and u.pos.shape == (1, 32, 8, 8)
    swapped = {f"features.3.{i}.unit2" for i in range(3)}
    base_shapes = {
        k: v.shape for k, v in base.state_dict().items() if k.rsplit(".", 2)[0] not in swapped
    }
    att_shapes = {
        k: v.shape
        for k, v in att.state_dict().items()
        if not any(k.startswith(p + ".") for p in swapped)
    }
    assert att_shapes == {k: v for k, v in base_shapes.items() if k in att_shapes}
    assert set(base_shapes) - set(att_shapes) == {
        k for k in base_shapes if any(k.startswith(p + ".") for p in swapped)
    }
    # the matched D is the rule's: the smallest max deviation over multiples of the heads
    kw = {"image_size": 32, "in_chans": 3, "num_classes": 100}
    bp, bm = ablation_budget(ABLATION_BASE, width=0.5, **kw)
    spec = ablation._SPECS["ablation_attention"]

    def worst(k: int) -> float:
        p, m = ablation._budget(spec, 8, 8, inner=k, **kw)
        return max(abs(p / bp - 1), abs(m / bm - 1))

    assert worst(d) == min(worst(k) for k in range(2, 257, 2))


def _structure(gm: torch.fx.GraphModule) -> list[tuple]:
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_module":
            m = gm.get_submodule(n.target)
            shapes = tuple(tuple(p.shape) for p in m.parameters())
            out.append((n.op, type(m).__name__, shapes, getattr(m, "stride", None)))
        else:
            out.append((n.op, str(n.target)))
    return out


@pytest.mark.parametrize("size", [32, 8])
def test_reparam_is_multi_branch_at_train_time_and_the_base_when_deployed(size):
    rep, base = build("ablation_reparam", 0.25, size), build(ABLATION_BASE, 0.25, size)
    units = [m for m in rep.modules() if isinstance(m, RepConvUnit)]
    assert len(units) == 19  # stem + 2 per block
    assert all(u.conv_scale is not None and len(u.conv_kxk) == 1 for u in units)
    kept = [u for u in units if u.in_ch == u.out_ch and u.stride == 1]
    assert kept and all(u.identity is not None for u in kept)
    # RepVGG init as the base: every BN scale 1 (no MobileOne zero-init)
    assert all(
        torch.equal(bn.weight, torch.ones_like(bn.weight)) for u in units for bn in u.branch_norms()
    )
    assert _structure(to_deploy(rep)) == _structure(to_deploy(base))


# ---------------------------------------------------------------- (c) deploy equivalence
@pytest.mark.parametrize("size", [32, 8])
def test_reparam_deploy_equivalence(size):
    gen = torch.Generator().manual_seed(size)
    model = build("ablation_reparam", 0.25, size)
    _randomise_bn(model, gen)
    model.eval()
    deploy = to_deploy(model)
    chans = SETUPS[size][0]
    x = torch.randn(4, chans, size, size, generator=gen)
    with torch.no_grad():
        want, got = model(x), deploy(x)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_rep_unit_without_activation_reparameterizes_to_a_bare_conv():
    gen = torch.Generator().manual_seed(0)
    unit = RepConvUnit(6, 6, 1, None)
    _randomise_bn(unit, gen)
    unit.eval()
    fused = unit.reparameterize()
    assert [type(m) for m in fused] == [nn.Conv2d]
    x = torch.randn(2, 6, 5, 5, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), unit(x), rtol=1e-5, atol=1e-5)
        assert (unit(x) < 0).any()  # no activation hidden in the unit either


# ---------------------------------------------------------------- (d) W4A4 quantization
@pytest.mark.parametrize("name", NAMES)
def test_w4a4_quantize_covers_every_layer(name):
    model = build(name, 0.25, 8)
    g = torch.Generator().manual_seed(1)
    calib = [(torch.randn(8, 1, 8, 8, generator=g), torch.zeros(8)) for _ in range(2)]
    q = quant.quantize(model, quant.parse_precision("W4A4"), calib)
    deploy = to_deploy(model)
    layers = [m for m in deploy.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    # an attention unit adds two products of activations, Q·Kᵀ and A·V, both quantized
    products = 2 * sum(isinstance(m, ConvAttention) for m in model.modules())
    assert products == (6 if name == "ablation_attention" else 0)
    table = quant.inspect(q, calib[:1])
    assert table.coverage["fp32"] == []
    total = len(layers) + products
    assert table.coverage["quantized"] == table.coverage["total"] == total
    assert len(table) == len(layers)  # one row per weighted layer; products are counted above
    assert all(r.weight_bits == 4 and r.act_bits == 4 for r in table)
    softmaxes = [f for f in table.float_ops() if "softmax" in f]
    assert len(softmaxes) == products // 2
    with torch.no_grad():
        out = q(calib[0][0])
    assert out.shape == (8, 10) and torch.isfinite(out).all()
