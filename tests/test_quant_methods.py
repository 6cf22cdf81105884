"""Quantization methods (ptq, cle_bc, adaround, qat): each one's defining property, re-derived
here independently of the method's own helpers, plus the integers they store and bad input."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _splits import four_class_split
from quantcal import quant
from quantcal.models.deploy import to_deploy
from quantcal.quant.apply import LayerTarget, fake_quant_disabled, quantized_layers
from quantcal.quant.methods import adaround as adaround_mod
from quantcal.quant.methods import available_methods, get_method
from quantcal.quant.methods import cle_bc as cle_mod

# ----------------------------------------------------------------------------- models and data


class Chain(nn.Module):
    """conv-BN-ReLU -> depthwise-BN -> pointwise-BN-ReLU -> pool -> FC: two equalizable pairs
    (conv -> ReLU -> dw, dw -> pw) once the BatchNorms are folded; the pool blocks pw -> fc."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.pw = nn.Conv2d(8, 12, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(12)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv(x)))
        x = self.bn2(self.dw(x))
        x = torch.relu(self.bn3(self.pw(x)))
        return self.fc(x.mean((2, 3)))


def _chain(seed: int = 0) -> nn.Module:
    """A ``Chain`` in eval mode whose BN gammas span e^-3..e^2, so the folded per-channel
    weight ranges differ by more than an order of magnitude (what CLE is for)."""
    torch.manual_seed(seed)
    net = Chain().eval()
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.exp(torch.empty(n).uniform_(-3.0, 2.0, generator=g)))
                m.bias.copy_(torch.empty(n).uniform_(-0.5, 0.5, generator=g))
                m.running_mean.copy_(torch.empty(n).uniform_(-0.3, 0.3, generator=g))
                m.running_var.copy_(torch.empty(n).uniform_(0.5, 2.0, generator=g))
    return net


def _images(n: int = 2, batch: int = 16, seed: int = 1, size: int = 8) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, size, size, generator=g) for _ in range(n)]


def _out_ranges(w: torch.Tensor) -> torch.Tensor:
    """max |W| per output channel (float64)."""
    return w.detach().double().abs().flatten(1).amax(1)


def _in_ranges(module: nn.Module) -> torch.Tensor:
    """max |W| per input channel; a depthwise conv's input channel is its output channel."""
    w = module.weight.detach().double().abs()
    if isinstance(module, nn.Conv2d) and module.groups > 1:
        return w.flatten(1).amax(1)
    return w.transpose(0, 1).flatten(1).amax(1)


def _outputs(qmodel: nn.Module, xs: list[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
    """Every quantized layer's outputs (float64 copies) over ``xs``, by layer name."""
    seen: dict[str, list[torch.Tensor]] = {name: [] for name, _ in quantized_layers(qmodel)}
    hooks = [
        layer.register_forward_hook(
            lambda m, a, out, name=name: seen[name].append(out.detach().double().clone())
        )
        for name, layer in quantized_layers(qmodel)
    ]
    try:
        with torch.no_grad():
            for x in xs:
                qmodel(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _channel_mean(ys: list[torch.Tensor]) -> torch.Tensor:
    """Mean over every axis but the channel axis (1 for conv outputs, -1 for linear ones)."""
    dim = 1 if ys[0].dim() > 2 else -1
    flat = torch.cat([y.movedim(dim, -1).reshape(-1, y.shape[dim]) for y in ys])
    return flat.mean(0)


# ----------------------------------------------------------------------------- 1. CLE


def test_equalization_keeps_the_fp32_function_and_balances_the_ranges():
    net = _chain()
    gm = to_deploy(net)
    pairs = cle_mod.equalization_pairs(gm)
    assert [(p.first, p.second, p.relu) for p in pairs] == [
        ("conv", "dw", True),
        ("dw", "pw", False),
    ]
    eq = copy.deepcopy(gm)
    cle_mod.cross_layer_equalize(eq, iterations=100)
    x = torch.randn(32, 3, 8, 8)
    with torch.no_grad():
        ref, out = gm(x), eq(x)
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert not torch.equal(eq.get_submodule("conv").weight, gm.get_submodule("conv").weight)

    def precision(model: nn.Module, p) -> float:
        # Nagel et al. 2019 eq. (8): sum_i (r1_i / R1)(r2_i / R2), maximal when balanced
        r1 = _out_ranges(model.get_submodule(p.first).weight)
        r2 = _in_ranges(model.get_submodule(p.second))
        return float(((r1 / r1.max()) * (r2 / r2.max())).sum())

    def spread(model: nn.Module, p) -> float:
        r1 = _out_ranges(model.get_submodule(p.first).weight)
        return float(r1.max() / r1.min())

    for p in pairs:
        assert precision(eq, p) > 1.05 * precision(gm, p)
        assert spread(eq, p) < 0.7 * spread(gm, p)
        # converged: each channel's range is the same on both sides of the pair
        r1 = _out_ranges(eq.get_submodule(p.first).weight)
        r2 = _in_ranges(eq.get_submodule(p.second))
        assert torch.allclose(r1, r2, rtol=1e-3)


def test_a_single_pair_gets_the_geometric_mean_range():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 1)).eval()
    with torch.no_grad():  # channel ranges spanning ~e^4
        net[0].weight.mul_(torch.exp(torch.linspace(-2, 2, 6)).reshape(-1, 1, 1, 1))
        net[2].weight.mul_(torch.exp(torch.linspace(1.5, -1.5, 6)).reshape(1, -1, 1, 1))
    gm = to_deploy(net)
    r1 = _out_ranges(gm.get_submodule("0").weight)
    r2 = _in_ranges(gm.get_submodule("2"))
    b1 = gm.get_submodule("0").bias.detach().double().clone()
    eq = copy.deepcopy(gm)
    pairs = cle_mod.cross_layer_equalize(eq)
    assert [(p.first, p.second, p.relu) for p in pairs] == [("0", "2", True)]
    target = torch.sqrt(r1 * r2)
    assert torch.allclose(_out_ranges(eq.get_submodule("0").weight), target, rtol=1e-5)
    assert torch.allclose(_in_ranges(eq.get_submodule("2")), target, rtol=1e-5)
    # the scale s_i = sqrt(r1_i r2_i) / r2_i also divides the first layer's bias
    s = torch.sqrt(r1 * r2) / r2
    assert torch.allclose(eq.get_submodule("0").bias.double(), b1 / s, rtol=1e-5)
    x = torch.randn(8, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(eq(x), gm(x), rtol=1e-4, atol=1e-5 * float(gm(x).abs().max()))


# ----------------------------------------------------------------------------- 2. bias correction


def _one_layer_case(bias_bits):
    """The pointwise layer of ``_chain`` at W4 with an input range from ``xq``, its fp32 module,
    inputs with a nonzero mean (post-ReLU-like) ``xf`` and a noisy "quantized path" ``xq``."""
    gm = to_deploy(_chain())
    target = LayerTarget.of(gm, quant.QuantConfig(4, 8, bias_bits=bias_bits))
    module = gm.get_submodule("pw")
    g = torch.Generator().manual_seed(5)
    xf = [torch.randn(16, 8, 6, 6, generator=g).abs() + 0.2 for _ in range(2)]
    xq = [x + 0.05 * torch.randn(x.shape, generator=g) for x in xf]
    lo = min(float(x.min()) for x in xq)
    hi = max(float(x.max()) for x in xq)
    layer = target.layer("pw", (lo, hi))

    def mean_error() -> torch.Tensor:
        with torch.no_grad():
            out = [layer(x).double() for x in xq]
            ref = [module(x).double() for x in xf]
        return _channel_mean(out) - _channel_mean(ref)

    with torch.no_grad():
        scale = float(torch.cat([module(x) for x in xf]).abs().mean())
    return layer, module, xq, xf, mean_error, scale


def _grid(layer) -> torch.Tensor:
    """The int32 bias grid float32(s_x) * s_w[c], float64."""
    return (torch.tensor(layer.act_scale_float, dtype=torch.float32) * layer.weight_scale).double()


@pytest.mark.parametrize("bias_bits", [None, 32])
def test_bias_correction_zeroes_the_mean_output_error_of_one_layer(bias_bits):
    layer, module, xq, xf, mean_error, scale = _one_layer_case(bias_bits)
    before = mean_error()
    assert before.abs().max() > 1e-2 * scale  # W4: clearly biased
    cle_mod.correct_bias(layer, module, xq, xf)
    after = mean_error()
    assert torch.equal(layer.bias_fp32, module.bias.detach())  # the fp32 layer is kept
    if bias_bits is None:  # float bias: only float error remains
        assert after.abs().max() <= 1e-5 * scale
        assert torch.allclose(
            layer.bias.double(), module.bias.detach().double() - before, atol=1e-6 * scale
        )
        return
    # int32 bias: what remains is rounding on the grid (see the strict half-step test below)
    assert (after.abs() <= _grid(layer) + 1e-5 * scale).all()
    assert after.abs().max() < 0.05 * before.abs().max()
    assert torch.equal(layer.bias, layer.bias_int.float() * _grid(layer).float())


def test_bias_correction_leaves_at_most_half_a_grid_step():
    layer, module, xq, xf, mean_error, scale = _one_layer_case(32)
    cle_mod.correct_bias(layer, module, xq, xf)
    after = mean_error()
    assert (after.abs() <= 0.5 * _grid(layer) * (1 + 1e-3) + 1e-6 * scale).all()


@pytest.mark.parametrize("bias_bits", [None, 32])
def test_cle_bc_end_to_end_zeroes_every_layers_mean_error_on_the_calibration_data(bias_bits):
    net = _chain()
    calib = [x + 0.5 for x in _images(2, 32)]  # a nonzero mean: the first layer is biased too
    config = quant.QuantConfig(4, 8, bias_bits=bias_bits)
    q = quant.quantize(net, config, calib, method="cle_bc")
    assert q.quant_method == {
        "name": "cle_bc",
        "options": {"equalize": True, "absorb": True, "bias_correction": True, "iterations": 20},
    }
    quantized = _outputs(q, calib)
    with fake_quant_disabled(q):  # the fp32 net with the equalized (absorbed) weights
        fp32 = _outputs(q, calib)
    ptq = quant.quantize(net, config, calib)
    quantized_ptq = _outputs(ptq, calib)
    with fake_quant_disabled(ptq):
        fp32_ptq = _outputs(ptq, calib)
    layers = dict(quantized_layers(q))
    assert list(layers) == ["conv", "dw", "pw", "fc"]
    for name, layer in layers.items():
        err = _channel_mean(quantized[name]) - _channel_mean(fp32[name])
        err_ptq = _channel_mean(quantized_ptq[name]) - _channel_mean(fp32_ptq[name])
        scale = float(torch.cat([y.flatten() for y in fp32[name]]).abs().mean())
        step = 0.0 if bias_bits is None else _grid(layer)
        assert (err.abs() <= step + 1e-5 * scale).all(), name
        assert err_ptq.abs().max() > 0.01 * scale, name  # what there was to correct
        assert err_ptq.abs().max() > 4 * err.abs().max(), name
    x = torch.randn(16, 3, 8, 8)
    with torch.no_grad():
        assert not torch.equal(q(x), ptq(x))


def test_cle_without_absorption_keeps_the_deploy_function():
    net = _chain()
    calib = _images(1, 16)
    q = quant.quantize(net, "W8A8", calib, method="cle_bc", method_options={"absorb": False})
    deploy = to_deploy(net)
    x = torch.randn(16, 3, 8, 8)
    with torch.no_grad(), fake_quant_disabled(q):
        ref, out = deploy(x), q(x)
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()
    conv = dict(quantized_layers(q))["conv"]
    assert not torch.allclose(conv.weight_fp32, deploy.get_submodule("conv").weight)


# ----------------------------------------------------------------------------- 3. AdaRound


def _independent_check_floor_or_ceil(layer) -> torch.Tensor:
    """Every stored integer is floor or ceil of w / s (float64 here), within +-q_max; returns
    w / s."""
    q_max = 2 ** (layer.weight_bits - 1) - 1
    s = layer.weight_scale.double().reshape([-1] + [1] * (layer.weight_fp32.dim() - 1))
    ratio = layer.weight_fp32.double() / s
    q = layer.weight_int.double()
    assert q.abs().max() <= q_max
    lo = torch.floor(ratio).clamp(-q_max, q_max)
    hi = torch.ceil(ratio).clamp(-q_max, q_max)
    # at an exact integer, float32's w * (1/s) may fall just below it (floor one less)
    near_int = (ratio - ratio.round()).abs() < 1e-4
    ok = (q == lo) | (q == hi) | (near_int & ((q - ratio.round()).abs() <= 1))
    assert ok.all()
    return ratio


def test_adaround_rounds_each_weight_down_or_up_and_beats_nearest():
    torch.manual_seed(0)
    gm = to_deploy(nn.Sequential(nn.Conv2d(8, 16, 3, padding=1)).eval())
    target = LayerTarget.of(gm, quant.QuantConfig(4, 8))
    module = gm.get_submodule("0")
    g = torch.Generator().manual_seed(2)
    xf = [torch.randn(32, 8, 8, 8, generator=g).relu() for _ in range(2)]
    xq = [x + 0.03 * torch.randn(x.shape, generator=g) for x in xf]
    lo = min(float(x.min()) for x in xq)
    hi = max(float(x.max()) for x in xq)
    layer = target.layer("0", (lo, hi))
    nearest_int = layer.weight_int.clone()
    rec = adaround_mod.adaround_layer(layer, module, xq, xf, iterations=200)
    ratio = _independent_check_floor_or_ceil(layer)
    nearest = torch.round(ratio).clamp(-7, 7)
    assert torch.equal(nearest_int.double(), nearest)  # the starting point was nearest
    changed = layer.weight_int.double() != nearest
    assert changed.any() and changed.double().mean() < 0.5
    # the layer's derived weight follows its integers
    s = layer.weight_scale.reshape(-1, 1, 1, 1)
    assert torch.equal(layer.weight, layer.weight_int.float() * s)

    # reconstruction error, independently: fake-quantized input, each rounding, vs fp32
    def mse(q_int: torch.Tensor) -> float:
        total, count = 0.0, 0
        with torch.no_grad():
            for a, b in zip(xq, xf):
                xt = torch.fake_quantize_per_tensor_affine(
                    a, layer.act_scale_float, layer.act_zero_point_int, 0, 255
                )
                out = F.conv2d(xt, q_int.float() * s, layer.bias, padding=1)
                ref = module(b)
                total += float((out.double() - ref.double()).pow(2).sum())
                count += ref.numel()
        return total / count

    mse_nearest, mse_ada = mse(nearest), mse(layer.weight_int)
    assert mse_ada < 0.95 * mse_nearest
    assert rec["mse_nearest"] == pytest.approx(mse_nearest, rel=1e-4)
    assert rec["mse_adaround"] == pytest.approx(mse_ada, rel=1e-4)


def test_adaround_method_end_to_end():
    net = _chain()
    calib = _images(2, 16)
    lines: list[str] = []
    q = quant.quantize(
        net, "W4A8", calib, method="adaround", method_options={"iterations": 20}, log=lines.append
    )
    assert q.quant_method["name"] == "adaround"
    assert q.quant_method["options"]["iterations"] == 20
    rows = quant.inspect(q).to_rows()
    assert [r["name"] for r in rows] == ["conv", "dw", "pw", "fc"]
    assert any(r["off_nearest"] > 0 for r in rows)
    for name, layer in quantized_layers(q):
        ratio = _independent_check_floor_or_ceil(layer)
        off = float((layer.weight_int.double() != torch.round(ratio).clamp(-7, 7)).double().mean())
        row = next(r for r in rows if r["name"] == name)
        assert row["off_nearest"] == pytest.approx(off, abs=1e-3)
    assert any("adaround" in line for line in lines)
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        out = q(x)
    assert out.shape == (4, 5) and torch.isfinite(out).all()


# ----------------------------------------------------------------------------- 4. QAT


def _cbr(i: int, o: int, k: int = 1, groups: int = 1) -> list[nn.Module]:
    conv = nn.Conv2d(i, o, k, padding=k // 2, groups=groups, bias=False)
    return [conv, nn.BatchNorm2d(o), nn.ReLU()]


_DIGITS: dict[str, tuple[nn.Module, object]] = {}


def _trained_digits_net() -> tuple[nn.Module, object]:
    """A depthwise-separable CNN (8 blocks of width 16: deep and narrow, so W4A4 min-max PTQ
    loses ~15 points) trained on ``digits`` with Adam, 5 epochs, no augmentation (~4 s).
    Measured with this seed: fp32 91.9 %, PTQ W4A4 76.7 %, QAT (2 epochs, lr 3e-3) 88.3 %; over
    seeds 0..4: fp32 89-95 %, PTQ 62-86 %, QAT 86-89 % (the QAT gain 3 to 25 points)."""
    if "net" not in _DIGITS:
        from quantcal.training import data

        splits = data.load_dataset("digits", seed=0)
        torch.manual_seed(0)
        layers = _cbr(1, 16, 3)
        for _ in range(8):
            layers += _cbr(16, 16, 3, groups=16) + _cbr(16, 16, 1)
        net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
        epochs, bs, lr = 5, 32, 0.01
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        steps = epochs * (len(splits.train) // bs)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps)
        net.train()
        for epoch in range(epochs):
            for x, y in splits.train.batches(bs, shuffle=True, epoch=epoch, drop_last=True):
                loss = F.cross_entropy(net(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
        _DIGITS["net"] = (net.eval(), splits)
    return _DIGITS["net"]


def _qat_recipe():
    from quantcal.training import train

    # digits are not mirror-symmetric: no flips (the TrainConfig default; with it QAT reached
    # 80.8 % instead of 88.3 % here), and no crops, as in the fp32 training above
    return train.TrainConfig(augment=False, nesterov=True, schedule="cosine", batch_size=32)


@pytest.mark.slow
def test_qat_beats_min_max_ptq_at_w4a4_on_digits():
    from quantcal.training import train

    net, splits = _trained_digits_net()
    calib = list(splits.ptq_calib.batches(100))

    def accuracy_and_nll(model: nn.Module) -> tuple[float, float]:
        logits, labels = train.predict_logits(model, splits.test, batch_size=500)
        acc = float((logits.argmax(1) == labels).double().mean())
        return acc, float(F.cross_entropy(logits, labels))

    fp32_acc, _ = accuracy_and_nll(net)
    ptq = quant.quantize(net, "W4A4", calib)
    qat = quant.quantize(
        net,
        "W4A4",
        calib,
        method="qat",
        method_options={"epochs": 2, "lr": 0.003},
        train_data=splits,
        train_config=_qat_recipe(),
    )
    ptq_acc, ptq_nll = accuracy_and_nll(ptq)
    qat_acc, qat_nll = accuracy_and_nll(qat)
    assert fp32_acc > 0.85
    assert ptq_acc < fp32_acc - 0.05  # the setting hurts PTQ
    assert qat_acc >= ptq_acc + 0.05, (fp32_acc, ptq_acc, qat_acc)
    assert qat_nll < 0.8 * ptq_nll
    # an ordinary quantized model: integers on the learned step, rounded to nearest
    ptq_layers = dict(quantized_layers(ptq))
    moved = 0
    for name, layer in quantized_layers(qat):
        s = layer.weight_scale.double().reshape([-1] + [1] * (layer.weight_fp32.dim() - 1))
        nearest = torch.round(layer.weight_fp32.double() / s).clamp(-7, 7)
        assert (layer.weight_int.double() - nearest).abs().max() <= 1
        assert (layer.weight_int.double() != nearest).double().mean() < 1e-3
        assert torch.equal(layer.weight, layer.weight_int.float() * s.float())
        moved += not torch.equal(layer.weight_scale, ptq_layers[name].weight_scale)
        moved += layer.act_scale_float != ptq_layers[name].act_scale_float
    assert moved > 0  # the step sizes were learned
    assert not any(p.requires_grad for p in qat.parameters()) and not qat.training


def test_qat_resumes_from_its_work_dir(tmp_path, monkeypatch):
    from quantcal.training import train

    net, splits = _trained_digits_net()
    calib = list(splits.ptq_calib.batches(100))
    epochs_run = []
    real_epoch = train._train_epoch

    def counting(*args, **kwargs):
        epochs_run.append(1)
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(train, "_train_epoch", counting)

    def run():
        return quant.quantize(
            net,
            "W4A4",
            calib,
            method="qat",
            method_options={"epochs": 1},
            train_data=splits,
            train_config=_qat_recipe(),
            work_dir=tmp_path,
        )

    first = run()
    assert len(epochs_run) == 1 and (tmp_path / "last.pt").is_file()
    second = run()
    assert len(epochs_run) == 1  # found the finished checkpoint: no training again
    for (_, a), (_, b) in zip(quantized_layers(first), quantized_layers(second)):
        assert torch.equal(a.weight_int, b.weight_int)
        assert torch.equal(a.weight_scale, b.weight_scale)
        assert a.act_scale_float == b.act_scale_float
    x = next(iter(splits.test.batches(64)))[0]
    with torch.no_grad():
        assert torch.equal(first(x), second(x))


# ----------------------------------------------------------------------------- 5. ONNX


@pytest.mark.parametrize("precision", ["W4A8", "W8A8"])
def test_adaround_onnx_weights_are_the_simulated_integers(tmp_path, precision):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    net = _chain()
    calib = _images(1, 32)
    q = quant.quantize(net, precision, calib, method="adaround", method_options={"iterations": 50})
    # some integers are not nearest rounding, so an exporter re-rounding the weights would show
    assert any(r.off_nearest > 0 for r in quant.inspect(q))
    x = torch.randn(64, 3, 8, 8)
    path = quant.export_onnx(q, tmp_path / "ada.onnx", x[:2])
    model = onnx.load(str(path))
    init = {i.name: i for i in model.graph.initializer}
    written = sorted(
        (
            tuple(init[n.input[0]].dims),
            onnx.numpy_helper.to_array(init[n.input[0]]).tobytes(),
            onnx.numpy_helper.to_array(init[n.input[1]]).astype("float32").tobytes(),
        )
        for n in model.graph.node
        if n.op_type == "DequantizeLinear"
        and n.input[0] in init
        and init[n.input[0]].data_type == onnx.TensorProto.INT8
    )
    layers = [layer for _, layer in quantized_layers(q)]
    simulated = sorted(
        (
            tuple(layer.weight_int.shape),
            layer.weight_int.numpy().tobytes(),
            layer.weight_scale.numpy().tobytes(),
        )
        for layer in layers
    )
    assert layers[0].weight_int.dtype == torch.int8
    assert written == simulated
    with torch.no_grad():
        ref = q(x)
    out = quant.run_onnx(path, x)
    assert out.shape == ref.shape
    assert (out - ref).abs().max() <= 0.05 * ref.abs().max()
    assert (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.95


# ----------------------------------------------------------------------------- 6. stored integers


def test_ptq_layers_hold_the_integers_of_torchs_fake_quant_ops():
    net = _chain()
    calib = _images()
    q = quant.quantize(net, "W4A8", calib)
    assert q.quant_method == {"name": "ptq", "options": {}}
    deploy = to_deploy(net)
    for name, layer in quantized_layers(q):
        w = deploy.get_submodule(name).weight.detach()
        shape = [-1] + [1] * (w.dim() - 1)
        scale = w.abs().flatten(1).amax(1) / 7
        assert torch.equal(layer.weight_scale, scale)
        zeros = torch.zeros(len(scale), dtype=torch.int32)
        fq = torch.fake_quantize_per_channel_affine(w, scale, zeros, 0, -7, 7)
        ints = torch.round(fq / scale.reshape(shape))
        assert layer.weight_int.dtype == torch.int8
        assert torch.equal(layer.weight_int.double(), ints.double())
        assert torch.equal(layer.weight_zero_point, zeros)
        assert torch.equal(
            layer.weight, layer.weight_int.float() * layer.weight_scale.reshape(shape)
        )
        assert torch.equal(layer.weight, fq)
        assert layer.bias_int.dtype == torch.int64
        grid = layer.act_scale * layer.weight_scale  # float32(s_x) * s_w[c]
        assert torch.equal(layer.bias, layer.bias_int.float() * grid)
        ref_int = torch.round(layer.bias_fp32.double() / grid.double())
        assert torch.equal(layer.bias_int.double(), ref_int)
        assert torch.equal(layer.bias_float, layer.bias_fp32)


def test_per_tensor_weights_share_one_scale():
    net = _chain()
    q = quant.quantize(net, quant.QuantConfig(4, 8, weight_granularity="tensor"), _images())
    per_channel = dict(quantized_layers(quant.quantize(net, "W4A8", _images())))
    deploy = to_deploy(net)
    for name, layer in quantized_layers(q):
        w = deploy.get_submodule(name).weight.detach()
        s = float(w.abs().max() / 7)
        assert layer.weight_scale.unique().tolist() == [s]
        assert layer.weight_scale.shape == (w.shape[0],)
        fq = torch.fake_quantize_per_tensor_affine(w, s, 0, -7, 7)
        assert torch.equal(layer.weight_int.double(), torch.round(fq.double() / s))
        assert torch.equal(layer.weight, fq)
        assert int(layer.weight_int.abs().max()) == 7
    # channels with a small range use fewer levels than per channel: |q| stays well below 7
    dw = dict(quantized_layers(q))["dw"].weight_int.flatten(1).abs().amax(1)
    assert per_channel["dw"].weight_int.flatten(1).abs().amax(1).eq(7).all()
    assert (dw < 4).sum() >= 2


def test_set_weight_int_refuses_what_is_not_a_symmetric_integer_weight():
    q = quant.quantize(_chain(), "W4A8", _images())
    layer = dict(quantized_layers(q))["pw"]
    good = layer.weight_int.clone()
    with pytest.raises(ValueError, match=r"\[-7, 7\]"):
        layer.set_weight_int(torch.full_like(good, 8))
    with pytest.raises(ValueError, match=r"\[-7, 7\]"):
        layer.set_weight_int(torch.full_like(good, -8))
    with pytest.raises(ValueError, match="shape"):
        layer.set_weight_int(good[:, :4])
    with pytest.raises(ValueError, match="integers"):
        layer.set_weight_int(good.float() + 0.5)
    with pytest.raises(ValueError, match="positive"):
        layer.set_weight_int(good, torch.zeros_like(layer.weight_scale))
    assert torch.equal(layer.weight_int, good)  # refused: nothing changed
    # accepted: weight and bias follow the new integers and scales
    scale = layer.weight_scale * 2
    layer.set_weight_int(-good, scale)
    assert torch.equal(layer.weight, -good.float() * scale.reshape(-1, 1, 1, 1))
    grid = layer.act_scale * scale
    assert torch.equal(layer.bias, layer.bias_int.float() * grid)


# ----------------------------------------------------------------------------- 7. bad input


def test_method_registry_and_bad_input():
    names = available_methods()
    assert names == sorted(names) and {"adaround", "cle_bc", "ptq", "qat"} <= set(names)
    assert get_method("PTQ").name == "ptq"
    with pytest.raises(ValueError) as err:
        quant.quantize(_chain(), "W8A8", _images(), method="gptq")
    for name in ("adaround", "cle_bc", "ptq", "qat"):
        assert name in str(err.value)
    with pytest.raises(ValueError, match="'iters'"):
        quant.quantize(_chain(), "W8A8", _images(), method="adaround", method_options={"iters": 5})
    with pytest.raises(ValueError, match="no option 'equalise'"):
        get_method("cle_bc").resolve({"equalise": True})
    with pytest.raises(TypeError, match="'iterations'"):
        get_method("adaround").resolve({"iterations": "many"})
    with pytest.raises(TypeError, match="'equalize'"):
        get_method("cle_bc").resolve({"equalize": 1})
    resolved = get_method("adaround").resolve({"lr": 1})  # an int where a float is expected
    assert resolved["lr"] == 1.0 and isinstance(resolved["lr"], float)
    assert resolved["iterations"] == get_method("adaround").defaults["iterations"]
    with pytest.raises(ValueError, match="no option"):
        quant.quantize(_chain(), "W8A8", _images(), method="ptq", method_options={"x": 1})


class SigmoidBetween(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.b(torch.sigmoid(self.a(x))).mean((2, 3))


@pytest.mark.parametrize(
    "model", [nn.Sequential(nn.Flatten(), nn.Linear(192, 3)), SigmoidBetween()]
)
def test_cle_bc_without_an_equalizable_pair_is_refused(model):
    with pytest.raises(ValueError, match="no equalizable layer pair"):
        quant.quantize(model.eval(), "W8A8", _images(), method="cle_bc")
    # bias correction alone still applies
    q = quant.quantize(
        model.eval(), "W8A8", _images(), method="cle_bc", method_options={"equalize": False}
    )
    assert len(quantized_layers(q)) >= 1


def test_qat_without_training_data_is_refused():
    with pytest.raises(ValueError, match="needs training data"):
        quant.quantize(_chain(), "W4A4", _images(), method="qat")


def test_sequential_ranges_follow_the_quantized_network():
    net = _chain()
    calib = _images(2, 16)
    par = dict(quantized_layers(quant.quantize(net, quant.QuantConfig(4, 4), calib)))
    q_seq = quant.quantize(net, quant.QuantConfig(4, 4, sequential=True), calib)
    seq = dict(quantized_layers(q_seq))
    names = list(seq)
    first = names[0]
    assert (seq[first].range_min, seq[first].range_max) == (
        par[first].range_min,
        par[first].range_max,
    )
    assert seq[first].act_scale_float == par[first].act_scale_float
    differ = [
        n
        for n in names[1:]
        if (seq[n].range_min, seq[n].range_max) != (par[n].range_min, par[n].range_max)
    ]
    assert differ
    # independently: each range is the min/max of what the layer receives in the quantized net
    inputs: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    hooks = [
        seq[n].register_forward_pre_hook(lambda m, a, n=n: inputs[n].append(a[0].detach().clone()))
        for n in names
    ]
    with torch.no_grad():
        for x in calib:
            q_seq(x)
    for h in hooks:
        h.remove()
    for n in names:
        flat = torch.cat([t.flatten() for t in inputs[n]])
        assert seq[n].range_min == pytest.approx(float(flat.min()), rel=1e-6, abs=1e-7)
        assert seq[n].range_max == pytest.approx(float(flat.max()), rel=1e-6, abs=1e-7)
    assert not math.isnan(seq[names[-1]].clip_fraction)


# ----------------------------------------------------------------------------- known bugs


def test_cle_bc_with_same_padding_in_the_second_layer():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding="same")
    ).eval()
    q = quant.quantize(net, "W8A8", _images(), method="cle_bc")
    assert len(quantized_layers(q)) == 2


class Reused(nn.Module):
    """``a`` is called twice: once in the pair a -> ReLU -> b, once on its own."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 1)
        with torch.no_grad():
            self.a.weight.mul_(torch.tensor([0.1, 1.0, 10.0, 3.0]).reshape(-1, 1, 1, 1))

    def forward(self, x):
        return (self.b(torch.relu(self.a(x))) + self.a(x.flip(-1))).mean((2, 3))


def test_equalization_leaves_a_reused_module_alone():
    torch.manual_seed(0)
    gm = to_deploy(Reused().eval())
    eq = copy.deepcopy(gm)
    cle_mod.cross_layer_equalize(eq)
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        ref = gm(x)
        assert (eq(x) - ref).abs().max() <= 1e-4 * ref.abs().max()


@pytest.mark.parametrize("per_channel", [False, True])
def test_lsq_quantize_matches_the_formula_and_its_gradients(per_channel):
    """LSQ (Esser et al. 2020): y = (clamp(round(x/s) + z, lo, hi) - z) s; dy/dx = 1 inside the
    range, 0 outside; dy/ds = round(x/s) - x/s inside, (q - z) outside, times g. "Inside" is
    judged on the rounded value (round(x/s) + z in [lo, hi]), as PyTorch's kernels do; the
    paper's unrounded bound differs only within half a step of the range's ends."""
    from quantcal.quant.methods.qat import lsq_quantize

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(6, 4, 5, 5, generator=g) * 2).requires_grad_(True)
    w = torch.randn(6, 4, 5, 5, generator=g)  # upstream gradient
    if per_channel:
        s = torch.tensor([0.3, 0.2, 0.5, 0.1, 0.25, 0.4], requires_grad=True)
        z, lo, hi, gs = torch.zeros(6), -7, 7, 0.3
        sv, zv = s.detach().view(-1, 1, 1, 1).double(), 0.0
    else:
        s = torch.tensor([0.2], requires_grad=True)
        z, lo, hi, gs = torch.tensor([5.0]), 0, 15, 0.3
        sv, zv = s.detach().double(), 5.0
    y = lsq_quantize(x, s, z, lo, hi, gs)
    (y * w).sum().backward()
    xd = x.detach().double()
    v = xd / sv
    q = torch.clamp(torch.round(v) + zv, lo, hi)
    inside = (torch.round(v) + zv >= lo) & (torch.round(v) + zv <= hi)  # torch's mask
    assert torch.allclose(y.double(), (q - zv) * sv, atol=1e-6)
    assert torch.equal(x.grad, (w * inside).float())
    ds = torch.where(inside, torch.round(v) - v, q - zv) * w.double() * gs
    ds = ds.sum() if not per_channel else ds.sum((1, 2, 3))
    assert torch.allclose(s.grad.double().reshape(-1), ds.reshape(-1), rtol=1e-4, atol=1e-4)


def _tiny_qat(config):
    """QAT for one epoch on 64 synthetic 8x8 images of 4 brightness classes."""
    from quantcal.training.train import TrainConfig

    split = four_class_split(64)
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    ).eval()
    calib = [x for x, _ in split.batches(32)]
    q = quant.quantize(
        net,
        config,
        calib,
        method="qat",
        train_data=split,
        train_config=TrainConfig(epochs=1, batch_size=16, schedule="cosine", augment=False),
        method_options={"epochs": 1, "lr": 0.01},
    )
    return q, calib[0]


def test_qat_keeps_per_tensor_weights_per_tensor():
    """With QuantConfig(weight_granularity="tensor") QAT learns one weight step per layer, and
    the quantized model it returns has one scale repeated per channel."""
    q, _ = _tiny_qat(quant.QuantConfig(weight_bits=4, act_bits=8, weight_granularity="tensor"))
    for _, layer in quantized_layers(q):
        assert torch.all(layer.weight_scale == layer.weight_scale[0])
        assert torch.equal(layer.weight, layer.weight_int.float() * layer.weight_scale[0])


def test_a_qat_model_exports_its_learned_integers_and_steps(tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    q, x = _tiny_qat("W8A8")
    path = quant.export_onnx(q, tmp_path / "qat.onnx", x[:2])
    model = onnx.load(str(path))
    ints = [onnx.numpy_helper.to_array(i) for i in model.graph.initializer if i.data_type == 3]
    for _, layer in quantized_layers(q):
        w = layer.weight_int.numpy()
        assert any(a.shape == w.shape and (a == w).all() for a in ints)
    with torch.no_grad():
        ref = q(x)
    out = quant.run_onnx(path, x)
    assert (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.95
    assert (out - ref).abs().max() <= 0.05 * ref.abs().max()


def test_bias_absorption_names_the_pairs_it_skips():
    """Absorption is exact only where the second conv does not zero-pad; the pairs it skips are
    named in a warning (a study puts it in the notes column), not left silent."""
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    ).eval()
    with pytest.warns(UserWarning, match=r"bias absorption skipped for 1 of 2 ReLU pairs"):
        quant.quantize(net, "W8A8", [torch.randn(16, 3, 8, 8)], method="cle_bc")
