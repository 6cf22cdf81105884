"""Blocks torch.fx cannot trace are still measured (issue #26, item 3): each stays one opaque
leaf module of the deploy graph, the conv/linear modules inside it are quantized "by module"
(input range observed by a pre-hook, swapped for the same quantized layer classes) and named in
``quant_coverage["by_module"]``; what else runs in fp32 inside it is found at run time; a conv
padding its input for TF "same" from the input size (timm's ``Conv2dSame``) keeps its padding.
Each quantized model is checked bit for bit against a fake-quant written out by hand."""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _splits import four_class_split
from quantcal import quant
from quantcal.models.deploy import to_deploy, trace
from quantcal.models.opaque import conv_form
from quantcal.quant.fallback import QuantConvSame
from quantcal.quant.layers import QuantConv, QuantLinear
from quantcal.quant.primitives import (
    activation_qparams,
    dequantize_bias,
    dequantize_per_channel,
    quantize_bias,
    quantize_per_channel,
    weight_scale_per_channel,
)


def _randomise_bn(bn: nn.BatchNorm2d, seed: int) -> nn.BatchNorm2d:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=g) * 0.2)
        bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
        bn.weight.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(bn.num_features, generator=g) * 0.1)
    return bn


class Gate(nn.Module):
    """Data-dependent control flow (fx cannot trace it), a BatchNorm, an activation x
    activation product and a residual that reads the conv's input again."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn = _randomise_bn(nn.BatchNorm2d(c), 1)
        self.fc = nn.Linear(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        y = y.relu() if y.mean() > 0 else y * 0.5
        z = self.fc(y.mean((2, 3)))
        att = torch.matmul(z.unsqueeze(2), z.unsqueeze(1))  # activation x activation
        return x + y + att.mean(2)[:, :, None, None]


class GateNoProduct(Gate):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        if int(y.shape[-1]) % 2 and y.sum() > 0:  # a shape and a value read in Python
            y = -y
        return x + y * self.fc(y.mean((2, 3)))[:, :, None, None].sigmoid()


class Net(nn.Module):
    def __init__(self, block: type[nn.Module] | None = Gate) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = _randomise_bn(nn.BatchNorm2d(8), 0)
        self.block = block() if block is not None else nn.Identity()
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(self.bn(self.stem(x)).relu())
        return self.head(y.mean((2, 3)))


# -- timm's Conv2dSame, copied (timm is not a dependency) ----------------------------------------


def _get_same_padding(x: int, kernel_size: int, stride: int, dilation: int) -> int:
    return max((math.ceil(x / stride) - 1) * stride + (kernel_size - 1) * dilation + 1 - x, 0)


def _pad_same(x, kernel_size, stride, dilation=(1, 1), value: float = 0):
    ih, iw = x.size()[-2:]
    pad_h = _get_same_padding(ih, kernel_size[0], stride[0], dilation[0])
    pad_w = _get_same_padding(iw, kernel_size[1], stride[1], dilation[1])
    return F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=value)


class Conv2dSame(nn.Conv2d):
    """Tensorflow-like 'SAME' convolution wrapper for 2D convolutions (timm.layers)."""

    def __init__(self, cin, cout, kernel_size, stride=1, dilation=1, groups=1, bias=True):
        super().__init__(cin, cout, kernel_size, stride, 0, dilation, groups, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _pad_same(x, self.weight.shape[-2:], self.stride, self.dilation)
        return F.conv2d(x, self.weight, self.bias, self.stride, (0, 0), self.dilation, self.groups)


class StdConv2dSame(Conv2dSame):
    """Weight standardization on top of 'SAME' padding: not a plain conv of its weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _pad_same(x, self.weight.shape[-2:], self.stride, self.dilation)
        w = (self.weight - self.weight.mean((1, 2, 3), keepdim=True)) / (
            self.weight.std((1, 2, 3), keepdim=True) + 1e-5
        )
        return F.conv2d(x, w, self.bias, self.stride, (0, 0), self.dilation, self.groups)


class SameNet(nn.Module):
    def __init__(self, conv: type[Conv2dSame] = Conv2dSame) -> None:
        super().__init__()
        self.stem = conv(3, 8, 3, stride=2)
        self.bn = _randomise_bn(nn.BatchNorm2d(8), 2)
        self.dw = conv(8, 8, 5, stride=2, groups=8)
        self.pw = nn.Conv2d(8, 16, 1)
        self.dilated = conv(16, 16, 3, dilation=2)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.stem(x)).relu()
        x = self.dilated(self.pw(self.dw(x).relu()).relu())
        return self.head(x.mean((2, 3)))


# -- the reference, by hand -------------------------------------------------------------------


def _observed_ranges(deploy: nn.Module, names: list[str], xs: list[torch.Tensor]) -> dict:
    """Min-max of each named module's input on the fp32 deploy model."""
    ranges: dict[str, list[float]] = {}

    def hook(name):
        def fn(_m, args):
            lo, hi = float(args[0].min()), float(args[0].max())
            old = ranges.get(name, [lo, hi])
            ranges[name] = [min(old[0], lo), max(old[1], hi)]

        return fn

    handles = [deploy.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    with torch.no_grad():
        for x in xs:
            deploy(x)
    for h in handles:
        h.remove()
    return ranges


def _by_hand(deploy: nn.Module, names: list[str], calib: list[torch.Tensor], x: torch.Tensor):
    """W8A8 fake quant of the named modules of the fp32 deploy model, written out: each
    module's own forward with the input fake-quantized on its min-max range (asymmetric,
    per tensor), the weight on its symmetric per-channel grid and the bias on the int32 grid
    ``s_x * s_w``."""
    ranges = _observed_ranges(deploy, names, calib)
    ref = copy.deepcopy(deploy)
    for name in names:
        m = ref.get_submodule(name)
        s, z = activation_qparams(*ranges[name], 8)
        w = m.weight.detach()
        sw = weight_scale_per_channel(w, 8, axis=0)
        with torch.no_grad():
            m.weight.copy_(dequantize_per_channel(quantize_per_channel(w, sw, 8, 0), sw, 0))
            if m.bias is not None:
                m.bias.copy_(dequantize_bias(quantize_bias(m.bias, s, sw, 32), s, sw))
        m.register_forward_pre_hook(
            lambda _m, a, s=s, z=z: (torch.fake_quantize_per_tensor_affine(a[0], s, z, 0, 255),)
        )
    with torch.no_grad():
        return ref(x)


def _quantize(model: nn.Module, xs: list[torch.Tensor], config="W8A8", **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        q = quant.quantize(model, config, xs, **kw)
    return q, [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


# -- tests ------------------------------------------------------------------------------------


def test_trace_still_refuses_and_to_deploy_keeps_the_block_opaque():
    model = Net().eval()
    with pytest.raises(ValueError, match=re.escape("submodule 'block' (Gate)")):
        trace(model)
    x = torch.randn(4, 3, 10, 10)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        deploy = to_deploy(model, check_input=x)
    texts = " ".join(str(w.message) for w in caught)
    assert list(deploy.opaque_blocks) == ["block"]
    assert "block (Gate: TraceError" in texts
    assert "BatchNorm not folded inside block: block.bn" in texts
    assert not any(isinstance(m, nn.BatchNorm2d) for n, m in deploy.named_children())  # folded
    assert deploy.deploy_check["max_abs_diff"] <= 1e-5 * deploy.deploy_check["max_abs_output"]
    with torch.no_grad():
        torch.testing.assert_close(deploy(x), model(x), rtol=1e-5, atol=1e-6)


def test_layers_inside_an_untraceable_block_are_quantized_by_module_exactly():
    torch.manual_seed(0)
    model = Net().eval()
    calib = [torch.randn(8, 3, 10, 10), torch.randn(8, 3, 10, 10)]
    q, texts = _quantize(model, calib)
    cov = q.quant_coverage
    assert cov["by_module"] == ["block.conv", "block.fc"]
    assert cov["quantized"] == 4 and cov["total"] == 5
    assert len(cov["fp32"]) == 1 and "matmul call" in cov["fp32"][0]  # the product, at run time
    assert any("quantized by module" in t and "block: conv, fc" in t for t in texts)
    assert isinstance(q.block.conv, QuantConv) and isinstance(q.block.fc, QuantLinear)
    assert not q.block.conv.owns_input  # the block reads the conv's input again (residual)
    names = ["stem", "block.conv", "block.fc", "head"]
    assert [n for n, _ in quant.quantized_layers(q)] == names
    x = torch.randn(5, 3, 10, 10)
    with torch.no_grad():
        out = q(x)
    assert torch.equal(out, _by_hand(to_deploy(model), names, calib, x))
    with torch.no_grad(), quant.fake_quant_disabled(q):
        torch.testing.assert_close(q(x), model(x), rtol=1e-5, atol=1e-6)
    assert "2 quantized by module: block.conv, block.fc" in str(quant.inspect(q))


def test_on_unsupported_error_refuses_what_a_block_leaves_in_fp32_only():
    model = Net().eval()
    calib = [torch.randn(4, 3, 9, 9)]
    strict = dataclasses.replace(quant.parse_precision("W8A8"), on_unsupported="error")
    with pytest.raises(ValueError, match="matmul call"):
        quant.quantize(model, strict, calib)
    ok = Net(GateNoProduct).eval()
    q, _ = _quantize(ok, calib, strict)
    assert q.quant_coverage == {
        "quantized": 4,
        "total": 4,
        "fp32": [],
        "by_module": ["block.conv", "block.fc"],
    }
    x = torch.randn(3, 3, 9, 9)
    names = ["stem", "block.conv", "block.fc", "head"]
    with torch.no_grad():
        assert torch.equal(q(x), _by_hand(to_deploy(ok), names, calib, x))


def test_a_traceable_cnn_is_quantized_as_before():
    torch.manual_seed(0)
    model = Net(block=None).eval()
    calib = [torch.randn(8, 3, 10, 10)]
    q, texts = _quantize(model, calib)
    assert q.opaque_blocks == {}
    assert q.quant_coverage == {"quantized": 2, "total": 2, "fp32": []}
    assert not any("by module" in t or "could not trace" in t for t in texts)
    x = torch.randn(4, 3, 10, 10)
    with torch.no_grad():
        assert torch.equal(q(x), _by_hand(to_deploy(model), ["stem", "head"], calib, x))


def test_conv_form_tells_same_padding_from_other_arithmetic():
    assert conv_form(nn.Conv2d(3, 4, 3, padding=1)) == "plain"
    assert conv_form(Conv2dSame(3, 4, 3, stride=2)) == "same"
    assert conv_form(Conv2dSame(3, 4, 4, stride=2, dilation=2)) == "same"
    assert conv_form(StdConv2dSame(3, 4, 3)) is None
    assert conv_form(nn.BatchNorm2d(3)) is None


@pytest.mark.parametrize("size", [15, 16, 17, 20])
def test_same_padding_convs_keep_their_padding(size):
    torch.manual_seed(0)
    model = SameNet().eval()
    calib = [torch.randn(8, 3, size, size)]
    q, _ = _quantize(model, calib)
    assert sorted(q.opaque_blocks) == ["dilated", "dw", "stem"]
    assert isinstance(q.stem, QuantConvSame) and isinstance(q.pw, QuantConv)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in q.modules())  # folded into stem
    cov = q.quant_coverage
    assert cov["quantized"] == cov["total"] == 5 and cov["fp32"] == []
    assert cov["by_module"] == ["stem", "dw", "dilated"]
    names = ["stem", "dw", "pw", "dilated", "head"]
    deploy = to_deploy(model)
    for other in (size, size + 1, 2 * size - 1):  # the padding follows each input's size
        x = torch.randn(3, 3, other, other)
        with torch.no_grad():
            out, ref = q(x), model(x)
            with quant.fake_quant_disabled(q):
                torch.testing.assert_close(q(x), ref, rtol=1e-5, atol=1e-5)
        assert torch.equal(out, _by_hand(deploy, names, calib, x))
        assert float((out - ref).abs().max()) <= 0.05 * float(ref.abs().max())


def test_a_conv_subclass_with_its_own_arithmetic_stays_fp32_and_is_named():
    torch.manual_seed(0)
    model = SameNet(StdConv2dSame).eval()
    calib = [torch.randn(4, 3, 16, 16)]
    q, texts = _quantize(model, calib)
    cov = q.quant_coverage
    assert cov["quantized"] == 2 and cov["total"] == 5  # pw and head; 3 convs at run time
    assert cov.get("by_module") is None
    assert all("conv2d call" in e for e in cov["fp32"])
    assert any("BatchNorm" in t and "bn" in t for t in texts)  # not folded into a std conv
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad(), quant.fake_quant_disabled(q):
        torch.testing.assert_close(q(x), model(x), rtol=1e-5, atol=1e-5)
    strict = dataclasses.replace(quant.parse_precision("W8A8"), on_unsupported="error")
    with pytest.raises(ValueError, match="conv2d call"):
        quant.quantize(model, strict, calib)


@pytest.mark.parametrize(
    ("method", "options", "config"),
    [
        ("ptq", None, dataclasses.replace(quant.parse_precision("W8A8"), sequential=True)),
        ("adaround", {"iterations": 2}, "W8A8"),
        ("cle_bc", {"equalize": False}, "W8A8"),
    ],
)
def test_methods_that_run_the_graph_node_by_node_refuse_layers_inside_blocks(
    method, options, config
):
    model = Net().eval()
    with pytest.raises(ValueError, match="quantized by module inside block"):
        quant.quantize(
            model, config, [torch.randn(4, 3, 8, 8)], method=method, method_options=options
        )


def test_sequential_methods_reach_same_padding_convs_in_the_graph():
    torch.manual_seed(0)
    model = SameNet().eval()
    calib = [torch.randn(4, 3, 16, 16)]
    config = dataclasses.replace(quant.parse_precision("W8A8"), sequential=True)
    q, _ = _quantize(model, calib, config)
    assert isinstance(q.dw, QuantConvSame)
    x = torch.randn(2, 3, 17, 17)
    with torch.no_grad():
        ref = model(x)
        assert float((q(x) - ref).abs().max()) <= 0.05 * float(ref.abs().max())


def test_qat_fine_tunes_the_layers_quantized_by_module():
    from quantcal.training.train import TrainConfig

    split = four_class_split(64)
    torch.manual_seed(0)
    model = Net(GateNoProduct).eval()
    calib = [x for x, _ in split.batches(32)]
    ptq, _ = _quantize(model, calib)
    qat, _ = _quantize(
        model,
        calib,
        method="qat",
        train_data=split,
        train_config=TrainConfig(epochs=1, batch_size=16, schedule="cosine", augment=False),
        method_options={"epochs": 1, "lr": 0.01},
    )
    assert qat.quant_coverage["by_module"] == ["block.conv", "block.fc"]
    assert isinstance(qat.block.conv, QuantConv) and not qat.training
    assert not torch.equal(qat.block.conv.weight_fp32, ptq.block.conv.weight_fp32)  # trained
    with torch.no_grad():
        assert torch.isfinite(qat(calib[0])).all()
