"""The five further architectures of the registry (resnet20, mobilenetv2, mobilenetv3_small,
efficientnet_b0, repvgg_a0): published sizes, deploy form, W8A8 ONNX round trip and
quantization coverage. The generic tests of test_models.py and test_deploy.py (shapes, final
maps, tracing, He init, contiguity, deploy equivalence at width 0.25) run on them as well."""

from __future__ import annotations

import operator
import warnings

import pytest
import torch
from torch import nn

from quantcal import models, quant
from quantcal.models.mobilenet import SqueezeExcite, divisible_channels, make_divisible
from quantcal.models.mobileone import MobileOneBlock
from quantcal.models.resnet import PadShortcut
from quantcal.quant.apply import unquantized_computations
from test_deploy import _assert_equivalent, _randomise_bn

NEW = ["efficientnet_b0", "mobilenetv2", "mobilenetv3_small", "repvgg_a0", "resnet20"]
_BN = nn.modules.batchnorm._BatchNorm


def test_registered():
    assert set(NEW) <= set(models.list_models())


# ---------------------------------------------------------------- published sizes (width 1.0)
IMAGENET_REFERENCE = {
    # name: (parameters with 1000 classes, exact; MACs at 224x224 in G). Parameters and MACs
    # from torchvision's model docs tables / weight metadata ("num_params", "_ops" in GFLOPS,
    # which count multiply-adds): mobilenet_v2, mobilenet_v3_small, efficientnet_b0. RepVGG-A0:
    # timm 1.0.31 ``repvgg_a0`` (9.11 M train-time in the paper, Ding et al. 2021) and the
    # paper's 1.4 B FLOPs (deployed form; the eval-mode train-time block runs its fused conv).
    # Checked once by hand against torchvision 0.29.1 / timm 1.0.31: the parameter tensors
    # agree shape for shape, and torchvision's models count the same MACs exactly.
    "mobilenetv2": (3_504_872, 0.301),
    "mobilenetv3_small": (2_542_856, 0.057),
    "efficientnet_b0": (5_288_548, 0.386),
    "repvgg_a0": (9_108_968, 1.4),
}


@pytest.mark.parametrize("name", sorted(IMAGENET_REFERENCE))
def test_imagenet_form_matches_published_counts(name):
    params, gmacs = IMAGENET_REFERENCE[name]
    model = models.create_model(name, num_classes=1000, image_size=224, imagenet_strides=True)
    stats = models.describe(model)
    assert stats.params == params
    assert stats.macs / 1e9 == pytest.approx(gmacs, rel=0.05 if name == "repvgg_a0" else 0.01)
    assert model.features(torch.zeros(1, 3, 224, 224)).shape[-1] == 7  # total stride 32
    with pytest.raises(TypeError, match="imagenet_strides"):
        models.create_model(name, num_classes=10, width=0.1, imagenet_strides="yes")


CIFAR_REFERENCE = {
    # name: (parameters, MACs in M), 100 classes, 32x32, width 1.0: the figures of each module's
    # docstring. The ImageNet-form counts above with a 100-class head (for RepVGG-A0 plus
    # stage 1's identity BN, 96 parameters, which stride 1 creates), and:
    # ResNet-20: the paper's 0.27 M (Table 6, 10 classes: 269,722 with option-A shortcuts);
    # MobileNetV2: github.com/chenyaofo/pytorch-cifar-models cifar100_mobilenetv2_x1_0,
    # 2.35 M parameters, 88.09 M MACs (same CIFAR strides).
    "resnet20": (275_572, 40.56),
    "mobilenetv2": (2_351_972, 88.09),
    "mobilenetv3_small": (1_620_356, 17.60),
    "efficientnet_b0": (4_135_648, 116.28),
    "repvgg_a0": (7_956_164, 440.28),
}


@pytest.mark.parametrize("name", sorted(CIFAR_REFERENCE))
def test_cifar_form_sizes(name):
    params, mmacs = CIFAR_REFERENCE[name]
    stats = models.describe(models.create_model(name, num_classes=100))
    assert stats.params == params
    assert stats.mmacs == pytest.approx(mmacs, rel=0.001)


def test_published_cifar_sizes():
    resnet = models.describe(models.create_model("resnet20", num_classes=10))
    assert resnet.params == 269_722 and resnet.mparams == pytest.approx(0.27, rel=0.02)
    assert CIFAR_REFERENCE["mobilenetv2"][0] / 1e6 == pytest.approx(2.35, rel=0.02)
    assert CIFAR_REFERENCE["mobilenetv2"][1] == pytest.approx(88.1, rel=0.05)


def test_option_a_shortcut_subsamples_and_zero_pads():
    x = torch.randn(2, 4, 7, 7)
    out = PadShortcut(4, 9, 2)(x)  # 5 new channels: 2 before, 3 after
    assert out.shape == (2, 9, 4, 4)  # ceil(7 / 2), like the stride-2 3x3 conv beside it
    torch.testing.assert_close(out[:, 2:6], x[:, :, ::2, ::2])
    assert not out[:, :2].any() and not out[:, 6:].any()
    assert not any(True for _ in PadShortcut(4, 9, 2).parameters())


def test_channel_rounding():
    # torchvision's _make_divisible at width >= 1 (e.g. the V3 SE squeeze 16 // 4 = 4 -> 8) ...
    assert [make_divisible(v) for v in (4, 30, 36, 60, 12, 1280 * 1.4)] == [8, 32, 40, 64, 16, 1792]
    assert divisible_channels(4) == 8
    # ... and below width 1, counts under 8 go to even numbers >= 2 instead (tiny test nets)
    assert [divisible_channels(v, small=True) for v in (1.6, 3.2, 5.6, 7.9, 8.5)] == [2, 4, 6, 8, 8]


# ---------------------------------------------------------------- deploy form
def test_repvgg_deploy_is_one_3x3_conv_per_block():
    model = _randomise_bn(models.create_model("repvgg_a0", num_classes=100, seed=0))
    blocks = [m for m in model.modules() if isinstance(m, MobileOneBlock)]
    assert len(blocks) == 1 + 2 + 4 + 14 + 1
    assert sum(b.identity is not None for b in blocks) == 2 + 3 + 13  # shape kept (stride 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every BN folded
        deploy = models.to_deploy(model)
    convs = [m for m in deploy.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == len(blocks)
    assert all(c.kernel_size == (3, 3) and c.groups == 1 and c.bias is not None for c in convs)
    assert not any(isinstance(m, (_BN, MobileOneBlock)) for m in deploy.modules())
    stats = models.describe(deploy, 32, in_chans=3)
    assert stats.params == 7_156_484  # 7,956,164 train-time
    assert stats.macs == models.describe(model).macs  # eval mode already runs the fused conv
    _assert_equivalent(model, deploy, torch.randn(2, 3, 32, 32))
    # ImageNet form: the paper's 8.30 M deployed parameters (Table 2)
    imagenet = models.create_model("repvgg_a0", num_classes=1000, imagenet_strides=True)
    deployed = models.describe(models.to_deploy(imagenet), 224, in_chans=3)
    assert deployed.params == 8_309_384


@pytest.mark.parametrize("name", [n for n in NEW if n != "repvgg_a0"])
def test_width_1_models_fold_every_bn(name):
    model = _randomise_bn(models.create_model(name, num_classes=100, seed=0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        deploy = models.to_deploy(model)
    assert not any(isinstance(m, _BN) for m in deploy.modules())
    _assert_equivalent(model, deploy, torch.randn(2, 3, 32, 32))


# ---------------------------------------------------------------- quantization and ONNX
def _data_statistics(model: nn.Module, x: torch.Tensor, seed: int = 0) -> nn.Module:
    """A stand-in for a trained net: random BN affine parameters and conv/linear biases (a
    fresh net's zero biases give logits of ~0.1, below the 8-bit noise this test bounds), and
    BN running statistics measured on ``x`` (one train-mode pass, cumulative average).

    Measured rather than random statistics, because random ones compound through RepVGG's 22
    plain blocks (activations ~1e6, every later bias rounds to 0 on its int32 grid).
    """
    g = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, _BN)]
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BN):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.3)
                m.reset_running_stats()
                m.momentum = None
            elif isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
        model.train()(x)
    for m in bns:
        m.momentum = 0.1
    return model.eval()


@pytest.mark.parametrize("name", NEW)
def test_w8a8_fully_quantized_and_onnx_round_trip(name, tmp_path):
    """Every conv/linear quantized (the SE gates' multiplies are element-wise: nothing left in
    fp32), and onnxruntime running the exported W8A8 QDQ graph agrees with the simulation."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from test_quant_export import _graph_checks

    g = torch.Generator().manual_seed(0)
    model = models.create_model(name, num_classes=10, image_size=16, width=0.1, seed=0)
    model = _data_statistics(model, torch.randn(32, 3, 16, 16, generator=g))
    calib = [torch.randn(32, 3, 16, 16, generator=g)]
    deploy = models.to_deploy(model)
    assert unquantized_computations(deploy) == []
    n_layers = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in deploy.modules())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fp32 computation, no unfolded BN, no bias overflow
        qmodel = quant.quantize(model, "W8A8", calib)
    coverage = quant.inspect(qmodel).coverage
    assert coverage == {"quantized": n_layers, "total": n_layers, "fp32": []}
    se_blocks = sum(isinstance(m, SqueezeExcite) for m in model.modules())
    muls = [
        n
        for n in qmodel.graph.nodes
        if n.op == "call_function" and n.target in (operator.mul, torch.mul)
    ]
    assert len(muls) >= se_blocks  # the gates are in the quantized graph, as multiplies
    if name in ("mobilenetv3_small", "efficientnet_b0"):
        assert se_blocks > 0

    x = torch.randn(64, 3, 16, 16, generator=g)
    path = quant.export_onnx(qmodel, tmp_path / f"{name}.onnx", x[:2])
    _graph_checks(path, qmodel)
    with torch.no_grad():
        ref = qmodel(x)
    out = quant.run_onnx(path, x)
    assert out.shape == ref.shape
    assert (out - ref).abs().max() <= 0.05 * ref.abs().max()
    assert (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.95
