"""Per-layer attribution (quantcal.quant.attribution): the replay equals full passes exactly, a
deliberately fragile layer ranks first, and the metrics are those of a by-hand computation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from quantcal import models, quant
from quantcal.calibration import metrics
from quantcal.quant.attribution import (
    AttributionResult,
    attribute_layers,
    block_of,
    layer_kind,
)


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _plain_cnn() -> nn.Sequential:
    """conv-relu x3, pool, linear: small enough to train on digits in a second."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(1),
        nn.Linear(16, 10),
    )


@pytest.fixture(scope="module")
def digits_cnn():
    """A plain CNN trained briefly on digits, and (x_val, y_val), (x_calib)."""
    from quantcal.training import data

    torch.manual_seed(0)
    s = data.load_dataset("digits")
    x, y = next(s.train.batches(len(s.train)))
    xv, yv = next(s.val.batches(len(s.val)))
    xc = next(s.ptq_calib.batches(len(s.ptq_calib)))[0]
    m = _plain_cnn()
    opt = torch.optim.Adam(m.parameters(), lr=0.01)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
    return m.eval(), (xv, yv), xc


def _outlier_channel(model: nn.Sequential, conv_index: int, channel: int, factor: float):
    """The same function with one input channel of conv ``conv_index`` scaled by ``factor`` (the
    previous conv's output channel times factor, through the ReLU; this conv's weights for that
    channel divided by it): a per-tensor activation quantizer of that conv's input then spends
    its range on one channel, the classic fragile layer (Nagel et al. 2019, §3)."""
    import copy

    m = copy.deepcopy(model)
    prev, this = m[conv_index - 2], m[conv_index]
    with torch.no_grad():
        prev.weight[channel] *= factor
        prev.bias[channel] *= factor
        this.weight[:, channel] /= factor
    return m


@pytest.mark.parametrize("name", ["ablation_base", "shufflenetv2", "ablation_se"])
@pytest.mark.parametrize("granularity", ["layer", "block"])
def test_replay_equals_full_passes_exactly(name, granularity):
    """Residual adds, in-place ReLUs, channel shuffles, concatenations, SE products."""
    torch.manual_seed(1)
    m = models.create_model(name, num_classes=7, width=0.25, image_size=16, seed=0).eval()
    x, y = torch.randn(40, 3, 16, 16), torch.randint(0, 7, (40,))
    q = quant.quantize(m, "W4A4", [x[:16]])
    fast = attribute_layers(q, (x, y), granularity=granularity, batch_size=16)
    slow = attribute_layers(q, (x, y), granularity=granularity, batch_size=16, naive=True)
    assert fast.groups == slow.groups  # identical floats, not close ones
    assert fast.fp32 == slow.fp32 and fast.quantized == slow.quantized
    assert 0 < fast.work_fraction < 1 and slow.work_fraction == 1
    # the model is left as it was
    assert all(layer.fake_quant_enabled for _, layer in quant.quantized_layers(q))
    z = q(x)
    assert metrics.nll(z, y) == pytest.approx(fast.quantized["nll"], rel=1e-6)


def test_numbers_are_those_of_a_by_hand_toggle(digits_cnn):
    model, (xv, yv), xc = digits_cnn
    q = quant.quantize(model, "W4A4", [xc])
    res = attribute_layers(q, (xv, yv))
    layers = dict(quant.quantized_layers(q))
    name = res.groups[1].name
    with torch.no_grad(), quant.fake_quant_disabled(q):
        z_fp32 = q(xv)
        layers[name].fake_quant_enabled = True
        z_alone = q(xv)
        layers[name].fake_quant_enabled = False
    for m in layers.values():
        m.fake_quant_enabled = True
    with torch.no_grad():
        z_q = q(xv)
        layers[name].fake_quant_enabled = False
        z_but = q(xv)
        layers[name].fake_quant_enabled = True
    g = res.groups[1]
    # The attribution replays cached activations, the toggle runs whole passes: float32 sums
    # in another order, so the differences of two metrics agree to ~1e-7, not to 1e-6 of them.
    tol = {"rel": 1e-6, "abs": 1e-6}
    assert g.alone_nll == pytest.approx(metrics.nll(z_alone, yv) - metrics.nll(z_fp32, yv), **tol)
    assert g.alone_ece == pytest.approx(metrics.ece(z_alone, yv) - metrics.ece(z_fp32, yv), **tol)
    assert g.recovery_nll == pytest.approx(metrics.nll(z_q, yv) - metrics.nll(z_but, yv), **tol)
    assert g.recovery_accuracy == pytest.approx(
        metrics.accuracy(z_q, yv) - metrics.accuracy(z_but, yv)
    )
    assert res.fp32["accuracy"] > 0.8  # the fixture model really learned digits


def test_a_deliberately_fragile_layer_ranks_first(digits_cnn):
    model, (xv, yv), xc = digits_cnn
    fragile = _outlier_channel(model, conv_index=4, channel=3, factor=300.0)
    with torch.no_grad():  # the rescaling keeps the fp32 function
        torch.testing.assert_close(fragile(xv), model(xv), rtol=1e-4, atol=1e-4)
    q = quant.quantize(fragile, "W8A4", [xc])
    res = attribute_layers(q, (xv, yv))
    assert res.ranked("alone_nll")[0].name == "4"
    assert res.ranked("recovery_nll")[0].name == "4"
    assert res.ranked("alone_nll")[0].alone_nll > 0.1
    # the same layer without the outlier is not the worst one
    plain = attribute_layers(quant.quantize(model, "W8A4", [xc]), (xv, yv))
    by_name = {g.name: g for g in plain.groups}
    assert by_name["4"].alone_nll < res.ranked()[0].alone_nll / 5


def test_kinds_blocks_and_round_trip():
    assert layer_kind(nn.Conv2d(8, 8, 3, groups=8)) == "depthwise conv"
    assert layer_kind(nn.Conv2d(8, 16, 1)) == "pointwise conv"
    assert layer_kind(nn.Conv2d(8, 16, 3, groups=2)) == "grouped conv"
    assert layer_kind(nn.Conv2d(8, 16, (3, 5))) == "conv 3x5"
    assert layer_kind(nn.Linear(4, 2)) == "linear"
    assert block_of("features.2.0.branch1.1.0") == "features.2.0"
    assert block_of("features.3.conv.0") == "features.3"
    assert block_of("layer1.0.conv1") == "layer1.0"
    assert block_of("stem.conv") == "stem"
    assert block_of("fc") == "fc"
    m = models.create_model("ablation_base", num_classes=5, width=0.25, image_size=8).eval()
    x, y = torch.randn(12, 3, 8, 8), torch.randint(0, 5, (12,))
    q = quant.quantize(m, "W8A8", [x])
    res = attribute_layers(q, (x, y), granularity="block")
    names = [n for n, _ in quant.quantized_layers(q)]
    assert sorted(n for g in res.groups for n in g.layers) == sorted(names)  # a partition
    assert all(block_of(n) == g.name for g in res.groups for n in g.layers)
    assert len(res.groups) < len(names)
    back = AttributionResult.from_dict(res.as_dict())
    assert back == res
    shares = res.by_kind()
    assert all(0 <= d["share"] <= 1 or math.isnan(d["share"]) for d in shares.values())


def test_bad_input_is_named():
    m = models.create_model("ablation_base", num_classes=5, width=0.25, image_size=8).eval()
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,))
    with pytest.raises(ValueError, match="needs a quantized model"):
        attribute_layers(quant.quantize(m, None, None), (x, y))
    q = quant.quantize(m, "W8A8", [x])
    with pytest.raises(ValueError, match="unknown attribution mode"):
        attribute_layers(q, (x, y), modes=("alone", "sideways"))
    with pytest.raises(ValueError, match="granularity"):
        attribute_layers(q, (x, y), granularity="stage")
    with pytest.raises(ValueError, match="as many labels as images"):
        attribute_layers(q, (x, y[:3]))
    with pytest.raises(ValueError, match="labelled data"):
        attribute_layers(q, [x])
    with pytest.raises(ValueError, match="as many labels"):
        attribute_layers(q, (x[:0], y[:0]))


def test_one_mode_only():
    m = models.create_model("ablation_base", num_classes=5, width=0.25, image_size=8).eval()
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,))
    q = quant.quantize(m, "W4A4", [x])
    res = attribute_layers(q, (x, y), modes=("alone",))
    assert all(math.isnan(g.recovery_nll) and not math.isnan(g.alone_nll) for g in res.groups)


class _Aliasing(nn.Module):
    """A graph whose forward reads a value after an in-place op mutated it (``x`` after
    ``relu_(x)``): the replay, which keeps every value as made, would differ."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, a):
        x = self.conv(a)
        y = torch.relu_(x)
        return self.head((x + y).mean((2, 3)))


def test_a_graph_the_replay_cannot_follow_falls_back_to_full_passes_and_says_so():
    torch.manual_seed(0)
    m = _Aliasing().eval()
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 3, (16,))
    q = quant.quantize(m, "W4A4", [x])
    fast = attribute_layers(q, (x, y))
    slow = attribute_layers(q, (x, y), naive=True)
    assert fast.groups == slow.groups
    assert fast.notes and "full passes" in fast.notes[0]
    assert fast.work_fraction == 1.0
