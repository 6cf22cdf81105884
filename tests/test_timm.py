"""quantcal on timm CNNs: never silent about what it leaves in fp32 or unfolded, and the fp32
deploy form computes the model's function.

Skipped unless ``timm`` is installed (it is not a quantcal dependency). The architectures cover
the distinct traps of timm's model zoo: a plain ResNet, weight-standardized convs (``StdConv2d``,
``ScaledStdConv2d``), fused BatchNorm + activation modules (``BatchNormAct2d``, which call
``F.batch_norm``), TF-style "same" padding computed from the input shape (``Conv2dSame``),
squeeze-excite and hard-swish (MobileNetV3), train-time multi-branch blocks with an in-place
``reparameterize()`` (RepVGG, MobileOne), and attention (LeViT: activation-by-activation matmuls
and Linear + BatchNorm1d pairs with a ``fuse()``; FastViT-SA: RepMixer blocks and attention by
``F.scaled_dot_product_attention``). Every model is random (``pretrained=False``)
with randomised BatchNorm statistics and constant-initialised 1-D parameters, so that identity
initialisations cannot hide a wrong fold or re-parameterization. Inputs are 2 images of
3x64x64; the whole file takes well under a minute on one thread.

Survey of more architectures: ``bench/timm_coverage.py``.
"""

from __future__ import annotations

import dataclasses
import operator
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

timm = pytest.importorskip("timm")

from quantcal import quant  # noqa: E402

SIZE = 64
#: (architecture, the trap it covers).
CASES = [
    ("resnet18", "plain conv + BatchNorm2d"),
    ("resnetv2_50x1_bit", "StdConv2d (weight standardization) + GroupNorm"),
    ("nf_resnet26", "ScaledStdConv2d, no normalization layers"),
    ("efficientnet_b0", "BatchNormAct2d (functional batch_norm), SE, SiLU"),
    ("tf_efficientnet_b0", "Conv2dSame (padding from the input shape)"),
    ("mobilenetv3_small_100", "BatchNormAct2d, hard-swish, SE"),
    ("repvgg_a0", "byobnet RepVggBlock, in-place reparameterize()"),
    ("mobileone_s0", "byobnet MobileOneBlock, in-place reparameterize()"),
    ("levit_128s", "attention: activation @ activation, LinearNorm (Linear + BN1d) fuse()"),
    ("fastvit_sa12", "RepMixer reparameterize(); attention by F.scaled_dot_product_attention"),
    ("mobilevit_xxs", "untraceable MobileVitBlock: its layers quantized by module"),
    ("vgg11_bn", "untraceable ConvMlp head: its convs quantized by module"),
    ("efficientvit_b0", "untraceable LiteMLA: convs by module, its matmuls named at run time"),
]
#: Models fx cannot trace symbolically: quantize must then raise ValueError naming the module
#: (its documented behaviour). When a quantcal version traces them, the full checks apply.
#: Since issue #26 item 3 such blocks stay opaque (``quant.fallback``) and none is refused.
UNTRACEABLE: dict[str, tuple[str, ...]] = {}
#: The blocks fx cannot trace, kept opaque, and the layers quantized by module inside them.
OPAQUE = {
    "tf_efficientnet_b0": (["conv_stem", "blocks.1.0.conv_dw"], 5),
    "mobilevit_xxs": (["stages.2.1", "stages.3.1", "stages.4.1"], 48),
    "vgg11_bn": (["pre_logits"], 2),
    "efficientvit_b0": (["stages.2.blocks.1.context_module.main"], 16),
}

# Conv / matmul computations on activations that an integer deploy runs as a layer.
_MM_FUNCTIONS = {
    F.conv1d,
    F.conv2d,
    F.conv3d,
    F.conv_transpose1d,
    F.conv_transpose2d,
    F.conv_transpose3d,
    F.linear,
    F.bilinear,
    torch.matmul,
    operator.matmul,
    torch.mm,
    torch.bmm,
    torch.addmm,
    torch.baddbmm,
    torch.einsum,
    F.scaled_dot_product_attention,
}
_MM_METHODS = {"matmul", "mm", "bmm", "addmm", "baddbmm", "__matmul__"}


def _randomize(model: nn.Module) -> None:
    """Random BN statistics; random values for 1-D parameters initialised to one constant."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            rm, rv = getattr(m, "running_mean", None), getattr(m, "running_var", None)
            if isinstance(rm, torch.Tensor) and isinstance(rv, torch.Tensor):
                rm.copy_(torch.randn(rm.shape, generator=g) * 0.2)
                rv.copy_(torch.rand(rv.shape, generator=g) * 1.5 + 0.5)
        for p in model.parameters():
            if p.dim() != 1 or p.numel() < 2 or not bool((p == p[0]).all()):
                continue
            v = float(p[0])
            if v == 0.0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            else:
                p.copy_((torch.rand(p.shape, generator=g) + 0.5) * max(abs(v), 0.1))


def _build(arch: str) -> nn.Module:
    if not timm.is_model(arch):
        pytest.skip(f"timm {timm.__version__} has no {arch}")
    kwargs = {"pretrained": False, "num_classes": 10}
    cfg = timm.get_pretrained_cfg(arch)
    if cfg is not None and getattr(cfg, "fixed_input_size", False):
        kwargs["img_size"] = SIZE  # LeViT: attention biases sized for the input
    torch.manual_seed(0)
    model = timm.create_model(arch, **kwargs).eval()
    _randomize(model)
    return model


def _constant_nodes(gm: torch.fx.GraphModule) -> set[torch.fx.Node]:
    const: set[torch.fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr" or (
            node.op in ("call_function", "call_method", "call_module")
            and all(n in const for n in node.all_input_nodes)
        ):
            const.add(node)
    return const


def _unquantized_matmuls(gm: torch.fx.GraphModule) -> list[str]:
    """Conv/linear/matmul/attention computations on activations that are not quantized layers
    (found independently of quantcal's own bookkeeping; an opaque block's are found at run
    time, checked apart)."""
    from quantcal.quant.apply import QuantizedLayer

    const = _constant_nodes(gm)
    opaque = getattr(gm, "opaque_blocks", {})
    found = []
    for node in gm.graph.nodes:
        if node in const:
            continue
        if (node.op == "call_function" and node.target in _MM_FUNCTIONS) or (
            node.op == "call_method" and node.target in _MM_METHODS
        ):
            stack = list((node.meta.get("nn_module_stack") or {}).values())
            scope = stack[-1][0] if stack and isinstance(stack[-1], tuple) else ""
            found.append(f"{scope}:{node.name}" if scope else node.name)
        elif node.op == "call_module" and node.target not in opaque:
            m = gm.get_submodule(str(node.target))
            if not isinstance(m, (QuantizedLayer, nn.Embedding)) and (
                isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))
                or any(p.dim() >= 2 for p in m.parameters())
            ):
                found.append(str(node.target))
    return found


def _batchnorms_left(gm: torch.fx.GraphModule) -> list[str]:
    """BatchNorm modules and functional batch_norm calls left in the graph, each as the name a
    warning would give (the module, or the module owning the statistics)."""
    const = _constant_nodes(gm)
    left = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            if isinstance(gm.get_submodule(str(node.target)), nn.modules.batchnorm._BatchNorm):
                left.append(str(node.target))
        elif (
            node.op == "call_function"
            and node.target in (F.batch_norm, torch.batch_norm)
            and node not in const
        ):
            attrs = [str(n.target) for n in node.all_input_nodes if n.op == "get_attr"]
            left.append(attrs[0].rpartition(".")[0] if attrs else node.name)
    return left


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("arch", [a for a, _ in CASES], ids=[a for a, _ in CASES])
def test_quantize_timm_is_never_silent_and_deploy_is_exact(arch: str, x: torch.Tensor):
    model = _build(arch)
    with torch.no_grad():
        ref = model(x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            q = quant.quantize(model, "W8A8", [x])
        except ValueError as err:
            if arch not in UNTRACEABLE or "could not trace" not in str(err):
                raise
            for word in UNTRACEABLE[arch]:  # the error names the module and its class
                assert word in str(err), f"the trace error does not name {word!r}: {err}"
            return
    texts = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]

    # 1. Every conv/linear computation quantized, or those left in fp32 named in one warning.
    cov = q.quant_coverage
    assert cov["total"] > 0
    # (an entry found at run time inside an opaque call counts its k computations)
    counts = [
        int(m.group(1)) if (m := re.search(r"(\d+) at run time\)$", e)) else 1 for e in cov["fp32"]
    ]
    assert cov["quantized"] + sum(counts) == cov["total"]
    if cov["fp32"]:
        assert any(all(name in t for name in cov["fp32"]) for t in texts), (
            f"{len(cov['fp32'])} computations left in fp32 without a warning naming them all: "
            f"{cov['fp32']}; warnings: {texts}"
        )
    else:
        assert cov["quantized"] == cov["total"]
    # ... and quant_coverage counts everything the graph leaves unquantized (an attention call
    # may count as one computation or as its two matmuls: at least one entry per call).
    unquantized = _unquantized_matmuls(q)
    assert len(cov["fp32"]) >= len(unquantized), (
        f"the graph has {len(unquantized)} unquantized conv/linear/matmul/attention computations "
        f"({unquantized}) but quant_coverage names {len(cov['fp32'])} ({cov['fp32']}): "
        "left in fp32 silently"
    )

    # ... blocks fx cannot trace are kept opaque and named, their layers quantized by module
    if arch in OPAQUE:
        blocks, by_module = OPAQUE[arch]
        assert set(blocks) <= set(q.opaque_blocks), q.opaque_blocks
        assert len(cov["by_module"]) == by_module, cov["by_module"]
        assert any(all(b in t for b in blocks) and "could not trace" in t for t in texts)
        assert any("quantized by module" in t for t in texts)
        # no plain conv/linear module is left in fp32 inside a block
        leftover = [
            f"{b}.{n}"
            for b in q.opaque_blocks
            for n, m in q.get_submodule(b).named_modules()
            if type(m) in (nn.Conv1d, nn.Conv2d, nn.Linear)
        ]
        assert leftover == [], leftover
    else:
        assert not getattr(q, "opaque_blocks", {}), q.opaque_blocks

    # 2. No BatchNorm left in the deploy graph unless a warning names it.
    for name in _batchnorms_left(q):
        assert any(name in t for t in texts), (
            f"BatchNorm {name!r} left in the deploy graph without a warning naming it: {texts}"
        )

    # 3. The fp32 deploy form computes the model's eval-mode function.
    with torch.no_grad(), quant.fake_quant_disabled(q):
        out = q(x)
    logit_range = float(ref.max() - ref.min())
    diff = float((out - ref).abs().max())
    assert diff <= 1e-4 * logit_range, (
        f"fp32 deploy form differs from model.eval(): max |diff| {diff:.3g}, logit range "
        f"{logit_range:.3g}"
    )
    # The quantized model runs and stays close (8-bit; loose: random weights amplify error).
    with torch.no_grad():
        out_q = q(x)
    assert torch.isfinite(out_q).all()
    assert float((out_q - ref).abs().max()) <= 0.5 * logit_range


def test_a_timm_arch_runs_in_a_study(tmp_path):
    """``arch = "timm:NAME"``: built without pretrained weights for the study's classes, input
    channels and image size, trained, quantized and scored like a registry model; the timm
    version enters the training cache key; a width other than 1 and an unknown name are clear
    errors."""
    from quantcal import study
    from quantcal.study import keys
    from quantcal.study.config import load_study

    raw = {
        "name": "timm_micro",
        "data": {"datasets": ["digits"], "train_size": 200},
        "model": [{"arch": "timm:mobilenetv3_small_050", "width": 1.0}],
        "train": {"epochs": 1, "augment": False},
        "quant": {"precisions": ["fp32", "W8A8"], "attribution": {"samples": 40}},
        "recal": {"methods": ["none", "temperature"]},
        "metrics": {"bootstrap": 20},
    }
    out = study.run_study(raw, tmp_path / "run", quiet=True)
    rows = list(study.iter_rows(out))
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows), rows
    assert {r["arch"] for r in rows} == {"timm:mobilenetv3_small_050"}
    import json

    attribution = json.loads((out / "details.json").read_text())["attribution"]
    assert attribution and "groups" in attribution[0]
    cfg = load_study(raw)
    g = study.expand_cells(cfg)[0][0]
    key = keys.train_key(cfg, g, "digest")
    from quantcal.models import external

    real = external.timm_version
    try:
        external.timm_version = lambda: "0.0.0"  # another timm, other model definitions
        assert keys.train_key(cfg, g, "digest") != key
    finally:
        external.timm_version = real
    assert keys.train_key(cfg, g, "digest") == key
    with pytest.raises(ValueError, match="no width multiplier"):
        study.build_model("timm:resnet18", num_classes=10, image_size=32, in_chans=3, width=0.5)
    with pytest.raises(ValueError, match="closest: resnet18"):
        study.build_model("timm:resnet18x", num_classes=10, image_size=32, in_chans=3, width=1)


@pytest.mark.parametrize("name", ["swin_t", "swin_v2_t"])
def test_torchvision_swin_names_the_attention_it_runs_in_fp32(name):
    """torchvision marks ``shifted_window_attention`` with ``torch.fx.wrap``: the whole window
    attention is one opaque node that takes the block's weights. Its 24 linears and 24 matmuls
    run in fp32, found at run time and counted (issue #26), and ``on_unsupported="error"``
    refuses the model."""
    import dataclasses

    torchvision = pytest.importorskip("torchvision")
    from quantcal import models

    torch.manual_seed(0)
    deploy = models.to_deploy(getattr(torchvision.models, name)(num_classes=10).eval())
    x = [torch.randn(2, 3, 64, 64)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        q = quant.quantize(deploy, quant.parse_precision("W8A8"), x)
    cov = q.quant_coverage
    assert cov["total"] - cov["quantized"] == 48  # 12 blocks x (2 linears + 2 matmuls)
    assert all(e.startswith("shifted_window_attention (") for e in cov["fp32"])
    assert any("found at run time" in str(w.message) for w in caught)
    strict = dataclasses.replace(quant.parse_precision("W8A8"), on_unsupported="error")
    with pytest.raises(ValueError, match="shifted_window_attention"):
        quant.quantize(deploy, strict, x)


#: Hybrids whose every conv, linear and product is quantized (DeiT's and LeViT's attention
#: products among them), and hybrids whose attention runs inside a block fx cannot trace, where
#: the products stay in fp32, named with their run-time count.
HYBRIDS_FULL = ["deit_tiny_patch16_224", "levit_128s", "edgenext_xx_small", "mobilevitv2_050"]
HYBRIDS_NAMED = ["mobilevit_xxs", "tiny_vit_5m_224", "efficientvit_b0", "efficientvit_m0"]


@pytest.mark.parametrize("arch", HYBRIDS_FULL + HYBRIDS_NAMED)
def test_strict_quantization_refuses_exactly_the_hybrids_left_partly_in_fp32(arch, x):
    from quantcal.quant.matmul import matmul_modules

    model = _build(arch)
    strict = dataclasses.replace(quant.parse_precision("W8A8"), on_unsupported="error")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if arch in HYBRIDS_NAMED:
            with pytest.raises(ValueError, match="fp32"):
                quant.quantize(model, strict, [x])
            q = quant.quantize(model, "W8A8", [x])
            cov = q.quant_coverage
            runs = [int(re.search(r"(\d+) at run time\)$", e).group(1)) for e in cov["fp32"]]
            assert runs and cov["quantized"] + sum(runs) == cov["total"]
            return
        q = quant.quantize(model, strict, [x])
    cov = q.quant_coverage
    assert cov["fp32"] == [] and cov["quantized"] == cov["total"]
    if arch in ("deit_tiny_patch16_224", "levit_128s"):
        assert len(matmul_modules(q)) >= 2 and all(m.calibrated for _, m in matmul_modules(q))
