"""quant.quantize and quant.inspect: exact scheme, frozen weights, invariances, bad input."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from quantcal import quant
from quantcal.models.deploy import to_deploy
from quantcal.quant import primitives as P
from quantcal.quant.apply import QuantConv, QuantLinear, fake_quant_disabled, quantized_layers


class Net(nn.Module):
    """A small CNN defined here (not in the registry): conv-BN, depthwise, channel shuffle, FC."""

    def __init__(self) -> None:
        super().__init__()
        self.num_classes = 7
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, padding_mode="reflect")
        self.bn = nn.BatchNorm2d(8)
        self.pw = nn.Conv2d(4, 8, 1)
        self.fc = nn.Linear(12, 7)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = self.bn(self.dw(x))
        a, b = x.chunk(2, dim=1)  # non-contiguous halves
        y = torch.cat([a, torch.relu(self.pw(b))], 1)
        y = y.reshape(y.shape[0], 2, 6, y.shape[2], y.shape[3]).transpose(1, 2).flatten(1, 2)
        return self.fc(y.mean((2, 3)))


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = Net()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return net


def _calib(n: int = 2, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 3, 8, 8, generator=g), torch.zeros(16)) for _ in range(n)]


def test_layers_are_exactly_the_scheme():
    net = _net()
    calib = _calib()
    q = quant.quantize(net, quant.QuantConfig(weight_bits=4, act_bits=6), calib)
    deploy = to_deploy(net)
    layers = dict(quantized_layers(q))
    assert set(layers) == {"stem.0", "dw", "pw", "fc"}
    assert isinstance(layers["fc"], QuantLinear) and isinstance(layers["dw"], QuantConv)
    # observe the fp32 deploy inputs independently with hooks
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    hooks = [
        deploy.get_submodule(name).register_forward_pre_hook(
            lambda m, a, name=name: seen[name].append(a[0].detach().clone())
        )
        for name in layers
    ]
    with torch.no_grad():
        for x, _ in calib:
            deploy(x)
    for h in hooks:
        h.remove()
    for name, layer in layers.items():
        fp = deploy.get_submodule(name)
        scale = P.weight_scale_per_channel(fp.weight, 4)
        q_max = 7
        ref_w = torch.fake_quantize_per_channel_affine(
            fp.weight.detach(), scale, torch.zeros(len(scale), dtype=torch.int32), 0, -q_max, q_max
        )
        assert torch.equal(layer.weight, ref_w)
        for c in range(layer.weight.shape[0]):
            assert layer.weight[c].unique().numel() <= 15
        inputs = torch.cat([t.flatten() for t in seen[name]])
        assert (layer.range_min, layer.range_max) == (float(inputs.min()), float(inputs.max()))
        s, z = P.activation_qparams(float(inputs.min()), float(inputs.max()), 6)
        assert (layer.act_scale_float, layer.act_zero_point_int) == (s, z)
        x = seen[name][0]
        xq = layer.quantize_input(x)
        assert torch.equal(xq, torch.fake_quantize_per_tensor_affine(x, s, z, 0, 63))
        assert xq.unique().numel() <= 2**6
        assert layer.clip_fraction == 0.0  # min-max: nothing saturates on its own data
        # int32 bias on the accumulator grid float32(s_x) * s_w[c], round half to even
        assert torch.equal(layer.bias_fp32, fp.bias.detach())
        grid = torch.tensor(s, dtype=torch.float32) * scale
        steps = torch.round(fp.bias.detach().double() / grid.double())
        assert torch.equal(layer.bias, steps.float() * grid)
    assert q.precision == "W4A6" and q.quant_config.weight_bits == 4
    assert not q.training
    assert not any(p.requires_grad for p in q.parameters())


def test_float_bias_option():
    net = _net()
    q = quant.quantize(net, quant.QuantConfig(bias_bits=None), _calib())
    q32 = quant.quantize(net, quant.QuantConfig(), _calib())
    deploy = to_deploy(net)
    for (name, layer), (_, layer32) in zip(quantized_layers(q), quantized_layers(q32)):
        assert layer.bias_bits is None and layer32.bias_bits == 32
        assert torch.equal(layer.bias, deploy.get_submodule(name).bias.detach())
        assert not torch.equal(layer32.bias, layer.bias)  # rounding moved it
        assert torch.equal(layer32.weight, layer.weight)


class TinyRangeHead(nn.Module):
    """A classifier whose input range is ~1e-10 (near-zero pooled features): on the int32 grid
    s_x * s_w[c] its biases (0.03 to 1) overflow; clamping them would wipe every logit."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)
        with torch.no_grad():
            self.fc.bias.copy_(torch.tensor([0.031, -0.5, 1.0, 0.2]))

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)) * 1e-10)


def test_bias_beyond_the_integer_grid_stays_float_and_is_named():
    torch.manual_seed(0)
    net = TinyRangeHead().eval()
    calib = _calib()
    with pytest.warns(UserWarning, match=r"1 layer\(s\) have biases beyond the int32.*fc \(4 of 4"):
        q = quant.quantize(net, quant.QuantConfig(), calib)
    fc = dict(quantized_layers(q))["fc"]
    # independent check of the overflow: round(b / (s_x * s_w)) beyond 2^31 - 1
    grid = torch.tensor(fc.act_scale_float, dtype=torch.float32) * fc.weight_scale
    assert (torch.round(fc.bias_fp32.double() / grid.double()).abs() > 2**31 - 1).all()
    assert fc.bias_overflow == 4 and fc.bias_bits is None
    assert torch.equal(fc.bias, fc.bias_fp32)
    # the layer computes F.linear(fake-quantized input, fake-quantized weight, float bias)
    x = torch.randn(5, 3, 8, 8)
    feats = torch.relu(dict(quantized_layers(q))["conv"](x)).mean((2, 3)) * 1e-10
    xq = torch.fake_quantize_per_tensor_affine(
        feats, fc.act_scale_float, fc.act_zero_point_int, 0, 255
    )
    ref = torch.nn.functional.linear(xq, fc.weight, fc.bias_fp32)
    assert torch.allclose(q(x), ref, atol=1e-6)
    assert torch.allclose(q(x), net(x), atol=1e-3)  # the logits survive (they are ~ the bias)
    rows = {r["name"]: r for r in quant.inspect(q, calib).to_rows()}
    assert rows["fc"]["bias_overflow"] == 4 and rows["conv"]["bias_overflow"] == 0
    # the other layer's bias stays on the grid
    assert dict(quantized_layers(q))["conv"].bias_bits == 32


def test_bias_overflow_counts_like_the_clamp():
    b = torch.tensor([1e-3, -1.0, 0.0, 5.0])
    s_w = torch.tensor([1.0, 1.0, 1.0, 1.0])
    # grid 1e-9: 1e6, 1e9 and 0 steps fit int32 (max 2^31 - 1 = 2.1e9), 5e9 does not;
    # in int16 (max 32767) only 0 fits; on a 1e-12 grid 1e9 fits int32, 1e12 and 5e12 do not
    assert P.bias_overflow(b, 1e-9, s_w, 32) == 1
    assert P.bias_overflow(b, 1e-9, s_w, 16) == 3
    assert P.bias_overflow(b, 1e-12, s_w, 32) == 2


def test_weights_are_quantized_once_not_per_forward(monkeypatch):
    q = quant.quantize(_net(), "W8A8", _calib())
    calls = []
    monkeypatch.setattr(
        torch, "fake_quantize_per_channel_affine", lambda *a, **k: calls.append(1) or a[0]
    )
    with torch.no_grad():
        q(torch.randn(2, 3, 8, 8))
    assert calls == []


def test_fp32_reproduces_deploy_logits_exactly():
    net = _net()
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        ref = to_deploy(net)(x)
        for cfg in (None, "fp32"):
            assert torch.equal(quant.quantize(net, cfg, None)(x), ref)
        q = quant.quantize(net, "W4A4", _calib())
        with fake_quant_disabled(q):
            assert torch.equal(q(x), ref)
        assert not torch.equal(q(x), ref)  # and the switch is restored


def test_deterministic_and_input_untouched():
    net = _net()
    before = copy.deepcopy(net.state_dict())
    x = torch.randn(6, 3, 8, 8)
    with torch.no_grad():
        outs = [quant.quantize(net, "W4A8", _calib())(x) for _ in range(2)]
        assert torch.equal(outs[0], outs[1])
    assert net.training
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


class Shared(nn.Module):
    """Aliasing traps for the in-place input path: a ReLU output read twice, an in-place ReLU
    on a view, a graph input fed straight to a conv and a reused module."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.b = nn.Conv2d(6, 6, 1)
        self.c = nn.Conv2d(6, 6, 1)
        self.d = nn.Conv2d(3, 6, 1)
        self.e = nn.Conv2d(6, 6, 1)
        self.f = nn.Conv2d(6, 6, 1)
        self.act = nn.ReLU(inplace=True)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        h = torch.relu(self.a(x))  # read by b and c: neither may overwrite it
        u = self.b(h) + self.c(h)
        v = self.act(u[:, :6])  # in-place ReLU on a view of u, which is read again below
        e = self.e(self.act(self.d(x)))  # d reads the graph input; e reads a temporary
        e = e + self.f(torch.add(e, 1.0, out=torch.empty_like(e)))  # out=: not owned
        w = self.b(v) + u + e  # b is reused, once on a shared input
        return self.fc(self.act(w).mean((2, 3)))  # mean is not known to be fresh: not owned


def test_inplace_input_path_only_where_the_graph_proves_it_is_safe():
    torch.manual_seed(0)
    net = Shared()
    calib = [torch.randn(8, 3, 6, 6)]
    q = quant.quantize(net, "W4A4", calib)
    owned = {name: layer.owns_input for name, layer in quantized_layers(q)}
    expected = {"a": False, "b": False, "c": False, "d": False, "e": True, "f": False}
    assert owned == {**expected, "fc": False}
    xs = torch.randn(3, 3, 6, 6)
    with torch.no_grad():
        fast = q(xs)
        for _, layer in quantized_layers(q):
            layer.owns_input = False
        assert torch.equal(fast, q(xs))
    # a reused input is shared; after a conv with a single reader it is owned
    q2 = quant.quantize(_net(), "W4A4", _calib())
    owned2 = {name: layer.owns_input for name, layer in quantized_layers(q2)}
    assert owned2 == {"stem.0": False, "dw": True, "pw": False, "fc": False}
    x = torch.randn(5, 3, 8, 8)
    x_before = x.clone()
    with torch.no_grad():
        fast = q2(x)
        assert torch.equal(x, x_before)  # the caller's input is never overwritten
        for _, layer in quantized_layers(q2):
            layer.owns_input = False
        slow = q2(x)
    assert torch.equal(fast, slow)  # in place or not, bit-identical
    # with autograd recording, the in-place path turns itself off
    for _, layer in quantized_layers(q2):
        layer.owns_input = True
    xg = x.clone().requires_grad_(True)
    q2(xg).sum().backward()
    assert xg.grad is not None


def test_inplace_path_matches_copying_path_on_a_registry_model():
    from quantcal import models

    net = models.create_model("shufflenetv2", num_classes=10, width=0.25, seed=0).eval()
    q = quant.quantize(net, "W8A8", [torch.randn(16, 3, 32, 32)])
    layers = [layer for _, layer in quantized_layers(q)]
    assert sum(layer.owns_input for layer in layers) >= len(layers) // 2
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        fast = q(x)
        for layer in layers:
            layer.owns_input = False
        assert torch.equal(fast, q(x))


@pytest.mark.parametrize("observer", quant.available_observers())
def test_every_observer_quantizes(observer):
    q = quant.quantize(_net(), quant.parse_precision("W4A4", observer=observer), _calib())
    out = q(torch.randn(3, 3, 8, 8))
    assert out.shape == (3, 7) and torch.isfinite(out).all()
    for _, layer in quantized_layers(q):
        assert 0.0 <= layer.clip_fraction <= 1.0


def test_batch_size_independence_and_noncontiguous_input():
    net = _net()
    q = quant.quantize(net, "W8A8", _calib())
    x = torch.randn(256, 3, 8, 8)
    with torch.no_grad():
        full = q(x)
        singles = torch.cat([q(x[i : i + 1]) for i in range(0, 256, 8)])
        # fp32 conv kernels are not bit-identical across batch sizes either, so compare to the
        # size of one float rounding; a flipped quantization step would be ~1e-2 of the scale
        scale = full.abs().max()
        assert (singles - full[::8]).abs().max() <= 1e-5 * scale
        assert torch.equal(singles.argmax(1), full[::8].argmax(1))
        xt = x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # channels-last strides
        assert not xt.is_contiguous()
        assert (q(xt) - full).abs().max() <= 1e-5 * scale


def test_first_last_8bit_policy():
    q = quant.quantize(_net(), quant.QuantConfig(4, 4, first_last_8bit=True), _calib())
    bits = {name: (m.weight_bits, m.act_bits) for name, m in quantized_layers(q)}
    assert bits == {"stem.0": (8, 8), "dw": (4, 4), "pw": (4, 4), "fc": (8, 8)}


def test_moves_with_to_and_state_dict():
    q = quant.quantize(_net(), "W8A8", _calib())
    q2 = copy.deepcopy(q).to(torch.float32)
    names = {k for k in q2.state_dict()}
    assert {"dw.weight", "dw.act_scale", "dw.act_zero_point", "dw.weight_scale"} <= names


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_cuda():
    q = quant.quantize(_net(), "W8A8", _calib())
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        ref = q(x)
        out = q.to("cuda")(x.cuda()).cpu()
    assert (out - ref).abs().max() <= 1e-3 * ref.abs().max()


def test_inspect_reports_every_layer():
    net = _net()
    q = quant.quantize(
        net, quant.QuantConfig(8, 8, observer="percentile", percentile=99.0), _calib()
    )
    table = quant.inspect(q)
    assert [r.name for r in table] == ["stem.0", "dw", "pw", "fc"]
    assert all(r.sqnr_db != r.sqnr_db for r in table)  # NaN without batches
    assert any(r.clip_fraction > 0 for r in table)  # a 99 % percentile clips something
    rows = quant.inspect(q, _calib(1, seed=5)).to_rows()
    assert rows[0]["kind"] == "Conv2d" and rows[1]["depthwise"] is True
    for row in rows:
        assert 10.0 < row["sqnr_db"] < 80.0
        assert row["sqnr_isolated_db"] > 10.0
    # the layer's SQNR against an independent computation for the first layer
    x = _calib(1, seed=5)[0][0]
    deploy = to_deploy(net)
    with torch.no_grad():
        ref = deploy.get_submodule("stem.0")(x)
        out = q.get_submodule("stem.0")(x)
    expected = 10 * torch.log10(ref.pow(2).sum() / (ref - out).pow(2).sum())
    assert abs(rows[0]["sqnr_db"] - float(expected)) < 1e-3
    assert "layer" in str(quant.inspect(q))
    with pytest.raises(ValueError, match="no quantized layers"):
        quant.inspect(quant.quantize(net, None, None))


def test_bad_input():
    net = _net()
    with pytest.raises(ValueError, match="empty"):
        quant.quantize(net, "W8A8", [])
    with pytest.raises(ValueError, match="empty"):
        quant.quantize(net, "W8A8", iter([torch.empty(0, 3, 8, 8)]))
    with pytest.raises(TypeError, match="iterable"):
        quant.quantize(net, "W8A8", torch.randn(4, 3, 8, 8))
    with pytest.raises(ValueError, match="accepted"):
        quant.quantize(net, "W8", _calib())
    with pytest.raises(ValueError, match=r"2\.\.16"):
        quant.quantize(net, "W1A8", _calib())
    with pytest.raises(ValueError, match=r"2\.\.16"):
        quant.QuantConfig(weight_bits=17)
    with pytest.raises(TypeError, match="QuantConfig"):
        quant.quantize(net, 8, _calib())

    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            y = self.conv(x)
            if y.mean() > 0:
                return y
            return y * 2

    with pytest.raises(ValueError, match=r"Branchy.*control flow.*torch\.fx\.wrap"):
        quant.quantize(Branchy(), "W8A8", _calib())


# ----------------------------------------------------------------------------- trained models


_TRAINED: dict[str, tuple[nn.Module, object]] = {}


def trained_on_digits(name: str) -> tuple[nn.Module, object]:
    """``(model, splits)``: registry model ``name`` (width 0.25) trained briefly on ``digits``
    (measured test top-1: 91-99 %; at width 0.1 and 3 epochs it was 61-93 %, where W8A8 vs fp32
    moved by a flip of 4 images between torch builds).

    Uses the data layer (``load_dataset``) and a minimal Adam loop: the study's SGD recipe in
    ``train.train`` needs many more epochs to leave a usable eval-mode net at this size, too slow
    for the suite. Cached per test session (the export tests reuse it).
    """
    if name not in _TRAINED:
        from quantcal import models
        from quantcal.training import data

        splits = data.load_dataset("digits", seed=0)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            torch.manual_seed(0)
            model = models.create_model(
                name, num_classes=10, image_size=8, in_chans=1, width=0.25, seed=0
            )
            epochs, bs, lr = 4, 32, 0.01
            opt = torch.optim.Adam(model.parameters(), lr=lr)
            steps = epochs * (len(splits.train) // bs)
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps)
            model.train()
            for epoch in range(epochs):
                for x, y in splits.train.batches(bs, shuffle=True, epoch=epoch, drop_last=True):
                    loss = nn.functional.cross_entropy(model(x), y)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    sched.step()
            _precise_bn(model, splits.train)
        finally:
            torch.set_num_threads(threads)
        _TRAINED[name] = (model.eval(), splits)
    return _TRAINED[name]


def _precise_bn(model: nn.Module, split) -> None:
    """Re-estimate BN running statistics as exact averages over the training data ("precise BN",
    Wu & Johnson 2021): after a few hundred steps the running averages lag the weights."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        for x, _ in split.batches(256):
            model(x)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = 0.1


def _accuracy(qmodel: nn.Module, split) -> float:
    from quantcal.training.train import predict_logits

    logits, labels = predict_logits(qmodel, split)
    return 100.0 * float((logits.argmax(1) == labels).float().mean())


@pytest.fixture(scope="module")
def digits_results():

    results = {}
    # The paper's four families and one dense and one inverted-residual newcomer: the
    # ablation variants are trained end to end in test_ablation_study.py, and mobilenetv3_small,
    # efficientnet_b0 and repvgg_a0 (together ~60 s here) are checked at W8A8 against
    # onnxruntime in test_models_more.py.
    names = [
        "shufflenetv2",
        "augshufflenet",
        "ghostnet_vgg16",
        "mobileone_s0",
        "resnet20",
        "mobilenetv2",
    ]
    for name in names:
        model, splits = trained_on_digits(name)
        calib = list(splits.ptq_calib.batches(100))
        acc = {"fp32": _accuracy(quant.quantize(model, None, None), splits.test)}
        for precision in ("W8A8", "W4A4"):
            for observer in ("minmax", "percentile", "mse"):
                if precision == "W8A8" and observer != "minmax":
                    continue
                cfg = quant.parse_precision(precision, observer=observer)
                acc[f"{precision}/{observer}"] = _accuracy(
                    quant.quantize(model, cfg, calib), splits.test
                )
        results[name] = acc
    return results


@pytest.mark.slow
def test_w8a8_keeps_accuracy_on_trained_models(digits_results):
    for name, acc in digits_results.items():
        assert acc["fp32"] > 25.0, (name, acc)  # trained: well above chance (10 %)
        assert abs(acc["W8A8/minmax"] - acc["fp32"]) <= 1.0, (name, acc)


@pytest.mark.slow
def test_w4a4_is_worse_and_better_observers_help(digits_results):
    def mean(key):
        return sum(acc[key] for acc in digits_results.values()) / len(digits_results)

    assert mean("W4A4/minmax") < mean("fp32") - 2.0, digits_results
    best_alternative = max(mean("W4A4/percentile"), mean("W4A4/mse"))
    assert best_alternative >= mean("W4A4/minmax") - 1.0, digits_results


@pytest.mark.parametrize("name", ["augshufflenet", "ghostnet_vgg16", "mobileone_s0"])
def test_quantizing_the_deploy_form_is_the_same(name):
    """The study deploys once per model and quantizes every cell from that deploy form."""
    from quantcal import models

    net = models.create_model(name, num_classes=10, image_size=8, in_chans=1, width=0.25, seed=0)
    _randomise_bn_stats(net)
    net.eval()
    calib, x = [torch.randn(32, 1, 8, 8)], torch.randn(8, 1, 8, 8)
    deploy = to_deploy(net)
    with torch.no_grad():
        assert torch.equal(to_deploy(deploy)(x), deploy(x))
        assert torch.equal(
            quant.quantize(deploy, "W4A4", calib)(x), quant.quantize(net, "W4A4", calib)(x)
        )


def _randomise_bn_stats(net: nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 0.4 - 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)


# ----------------------------------------------------------------------------------------------
# Coverage: every conv/linear computation quantized, or named
# ----------------------------------------------------------------------------------------------
class LibLinear(nn.Linear):
    """A library's own Linear that keeps nn.Linear.forward: quantized as a module."""


class LibConv(nn.Conv2d):
    pass


class WSConv(nn.Conv2d):
    """Weight-standardized conv (its own forward): traced through to an F.conv2d call."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return nn.functional.conv2d(x, w, self.bias, self.stride, self.padding)


class BNAct(nn.BatchNorm2d):
    """A fused BatchNorm + activation (timm's BatchNormAct2d style): functional batch_norm."""

    def forward(self, x):
        x = nn.functional.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )
        return torch.relu(x)


class Attn(nn.Module):
    """Functional projections and an attention product."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.q = nn.Parameter(torch.randn(d, d) / d**0.5)
        self.k = nn.Parameter(torch.randn(d, d) / d**0.5)

    def forward(self, x):  # x: (N, T, d)
        q, k = nn.functional.linear(x, self.q), nn.functional.linear(x, self.k)
        return torch.softmax(torch.matmul(q, k.transpose(1, 2)), -1) @ x


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lib = LibConv(3, 8, 3, padding=1)
        self.ws = WSConv(8, 8, 3, padding=1)
        self.bnact = BNAct(8)
        self.attn = Attn(8)
        self.head = LibLinear(8, 5)

    def forward(self, x):
        x = self.bnact(self.ws(torch.relu(self.lib(x))))
        t = self.attn(x.flatten(2).transpose(1, 2))
        return self.head(t.mean(1))


def test_subclass_layers_keeping_forward_are_quantized_like_their_base():
    torch.manual_seed(0)
    lib = nn.Sequential(LibConv(3, 6, 3), nn.ReLU(), nn.Flatten(), LibLinear(6 * 36, 4)).eval()
    plain = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 36, 4))
    plain.load_state_dict(lib.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left in fp32, nothing to say
        q = quant.quantize(lib, quant.QuantConfig(), _calib())
    assert q.quant_coverage == {"quantized": 2, "total": 2, "fp32": []}
    ref = quant.quantize(plain.eval(), quant.QuantConfig(), _calib())
    x = torch.randn(4, 3, 8, 8)
    assert torch.equal(q(x), ref(x))


def _randomize_bn(net: nn.Module) -> None:
    """Running statistics and affine parameters far from identity, so folding matters."""
    g = torch.Generator().manual_seed(5)
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 2 - 1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) - 0.5)


def test_functional_layers_with_constant_weights_are_lifted_and_the_rest_named():
    torch.manual_seed(0)
    net = Mixed().eval()
    _randomize_bn(net)
    deploy = to_deploy(net)
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(deploy(x), net(x), atol=1e-5)  # the same function
    # the WS conv became a conv module (the fused BN folded into it), the projections linears
    assert not any(isinstance(m, nn.BatchNorm2d) for m in deploy.modules())
    assert isinstance(deploy.ws, nn.Conv2d) and type(deploy.ws) is nn.Conv2d
    assert type(deploy.get_submodule("attn.q")) is nn.Linear
    # the products of two activations in fp32 (quantize_matmuls=False; by default they are
    # quantized: tests/test_quant_attention.py)
    with pytest.warns(UserWarning) as caught:
        q = quant.quantize(net, quant.QuantConfig(quantize_matmuls=False), _calib())
    text = " ".join(str(w.message) for w in caught)
    assert "5 of 7 conv/linear computations quantized" in text
    # what is left: the attention products of two activations, named by their module
    assert "left in fp32: attn (torch.matmul call), attn (@ call)" in text
    assert "BatchNorm" not in text  # folded, nothing to say
    assert q.quant_coverage == {
        "quantized": 5,
        "total": 7,
        "fp32": ["attn (torch.matmul call)", "attn (@ call)"],
    }
    assert {n for n, _ in quantized_layers(q)} == {"lib", "ws", "attn.q", "attn.k", "head"}
    table = quant.inspect(q)
    assert table.coverage == q.quant_coverage
    assert str(table).splitlines()[0] == (
        "quantized 5 of 7 conv/linear computations; left in fp32: attn (torch.matmul call), "
        "attn (@ call)"
    )
    with warnings.catch_warnings(), pytest.raises(ValueError, match=r"left in fp32: attn \(torch"):
        warnings.simplefilter("ignore")
        quant.quantize(
            net, quant.QuantConfig(on_unsupported="error", quantize_matmuls=False), _calib()
        )


def test_lifted_ws_conv_with_fused_bn_is_quantized_like_an_independent_computation():
    """Weight standardization, then the fused BN folded, then symmetric per-channel W4: each
    step recomputed here by hand (float64 fold, torch's own fake-quant op)."""
    torch.manual_seed(0)
    net = nn.Sequential(WSConv(3, 6, 3, padding=1), BNAct(6), nn.Flatten(), LibLinear(6 * 64, 4))
    net.eval()
    _randomize_bn(net)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # everything quantized, nothing to say
        q = quant.quantize(net, quant.QuantConfig(weight_bits=4, act_bits=8), _calib())
    layer = dict(quantized_layers(q))["0"]
    w = net[0].weight.detach().double()
    w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
    bn = net[1]
    factor = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)
    w_fold = (w * factor.reshape(-1, 1, 1, 1)).float()
    b_fold = (net[0].bias.detach().double() - bn.running_mean.double()) * factor
    b_fold = (b_fold + bn.bias.detach().double()).float()
    assert torch.allclose(layer.weight_fp32, w_fold, atol=1e-6)
    assert torch.allclose(layer.bias_fp32, b_fold, atol=1e-6)
    scale = (w_fold.abs().amax((1, 2, 3)) / 7).detach()
    ref = torch.fake_quantize_per_channel_affine(
        layer.weight_fp32, scale, torch.zeros(6, dtype=torch.int32), 0, -7, 7
    )
    assert torch.allclose(layer.weight, ref, atol=1e-6)
    assert q.quant_coverage == {"quantized": 2, "total": 2, "fp32": []}


class ConstMatmul(nn.Module):
    """``x @ W`` with a parameter W (in, out), as some MLP code writes a projection."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Parameter(torch.randn(12, 5))

    def forward(self, x):
        return x.flatten(1) @ self.proj


def test_matmul_by_a_parameter_becomes_a_linear_with_the_transposed_weight():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 3, 1), nn.AdaptiveAvgPool2d(2), ConstMatmul()).eval()
    deploy = to_deploy(net)
    lin = deploy.get_submodule("2.proj")
    assert type(lin) is nn.Linear and torch.equal(lin.weight, net[2].proj.detach().t())
    x = torch.randn(3, 3, 6, 6)
    with torch.no_grad():
        assert torch.allclose(deploy(x), net(x), atol=1e-6)
    q = quant.quantize(net, "W8A8", _calib())
    assert q.quant_coverage["fp32"] == [] and q.quant_coverage["quantized"] == 2


class DynamicConv(nn.Module):
    """A conv whose kernel depends on the input (CondConv-style routing): not liftable."""

    def __init__(self) -> None:
        super().__init__()
        self.experts = nn.Parameter(torch.randn(2, 4, 3, 3, 3))

    def forward(self, x):
        route = torch.sigmoid(x.mean())
        w = self.experts[0] * route + self.experts[1] * (1 - route)
        return nn.functional.conv2d(x, w, padding=1)


#: Products of two activations left in fp32, as before they were quantized (their naming is
#: what these tests check; quantized attention: tests/test_quant_attention.py).
_FP32_PRODUCTS = quant.QuantConfig(quantize_matmuls=False)


def test_input_dependent_weights_and_weighted_leaf_modules_are_named():
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.dyn = DynamicConv()
            self.mha = nn.MultiheadAttention(4, 1, batch_first=True)
            self.bn1d = nn.BatchNorm1d(4)
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            t = self.dyn(x).flatten(2).transpose(1, 2)
            t = self.mha(t, t, t, need_weights=False)[0].mean(1)
            return self.fc(
                nn.functional.batch_norm(
                    t, self.bn1d.running_mean, self.bn1d.running_var, training=False
                )
            )

    net = Net().eval()
    with pytest.warns(UserWarning) as caught:
        q = quant.quantize(net, _FP32_PRODUCTS, _calib())
    text = " ".join(str(w.message) for w in caught)
    assert "1 of 3 conv/linear computations quantized" in text
    assert "dyn (conv2d call)" in text and "mha (MultiheadAttention)" in text
    # a functional BatchNorm not after a conv cannot be folded: named
    assert "bn1d (functional batch_norm)" in text
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad(), fake_quant_disabled(q):
        assert torch.allclose(q(x), net(x), atol=1e-5)


def test_on_unsupported_takes_warn_or_error_only():
    with pytest.raises(ValueError, match="on_unsupported"):
        quant.QuantConfig(on_unsupported="ignore")


def test_fused_attention_calls_are_named():
    """``F.scaled_dot_product_attention`` multiplies two activations twice: never silent."""

    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv = nn.Linear(4, 12)

        def forward(self, x):  # (N, T, 4)
            q, k, v = self.qkv(x).chunk(3, -1)
            return nn.functional.scaled_dot_product_attention(q, k, v).mean(1)

    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Flatten(2), Transpose(), Attn()).eval()
    with pytest.warns(
        UserWarning, match=r"2 of 3 .*left in fp32: 3 \(scaled_dot_product_attention"
    ):
        q = quant.quantize(net, _FP32_PRODUCTS, _calib())
    assert q.quant_coverage["fp32"] == ["3 (scaled_dot_product_attention call)"]
    with warnings.catch_warnings(), pytest.raises(ValueError, match="scaled_dot_product"):
        warnings.simplefilter("ignore")
        quant.quantize(
            net, quant.QuantConfig(on_unsupported="error", quantize_matmuls=False), _calib()
        )


class Transpose(nn.Module):
    def forward(self, x):
        return x.transpose(1, 2)
