"""Activation x activation products quantized (issue #26 item 2): attention's ``Q Kᵀ`` and
``A V`` with both operands fake-quantized, SDPA and ``nn.MultiheadAttention`` decomposed into
quantizable parts computing the same function, softmax / LayerNorm / GELU kept in float and
named."""

from __future__ import annotations

import dataclasses
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _splits import four_class_split
from quantcal import models, quant
from quantcal.models.deploy import trace
from quantcal.quant.attention import decompose_attention
from quantcal.quant.matmul import QuantMatMul, matmul_modules
from quantcal.quant.primitives import activation_qparams, fake_quantize_per_tensor
from quantcal.quant.runtime_count import hidden_computations


def _decomposed(model: nn.Module) -> torch.fx.GraphModule:
    gm = trace(model.eval())
    decompose_attention(gm, lambda op: QuantMatMul(op))
    return gm


class SDPA(nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention``."""

    def __init__(self, dim: int = 16, heads: int = 2, **kwargs) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.heads, self.kwargs = heads, kwargs

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        o = F.scaled_dot_product_attention(q, k, v, **self.kwargs)
        return self.proj(o.transpose(1, 2).reshape(b, n, c))


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"is_causal": True},
        {"scale": 0.3},
        {"attn_mask": "bool"},
        {"attn_mask": "float"},
        {"attn_mask": "bool", "is_causal": False, "scale": 1.7},
    ],
)
@pytest.mark.parametrize("shape", [(3, 5, 16), (1, 9, 16)])
def test_sdpa_decomposition_equals_the_fused_call_in_fp32(kwargs, shape):
    torch.manual_seed(0)
    n = shape[1]
    if kwargs.get("attn_mask") == "bool":
        mask = torch.rand(n, n) > 0.4
        mask[:, 0] = True  # no fully masked row (softmax of -inf only is nan both ways)
        kwargs = {**kwargs, "attn_mask": mask}
    elif kwargs.get("attn_mask") == "float":
        kwargs = {**kwargs, "attn_mask": torch.randn(n, n)}
    model = SDPA(**kwargs).eval()
    gm = _decomposed(model)
    assert not any(n.target is F.scaled_dot_product_attention for n in gm.graph.nodes), "decomposed"
    assert len(matmul_modules(gm)) == 2
    x = torch.randn(*shape)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-6)


class MHA(nn.Module):
    def __init__(self, *, batch_first=True, kdim=None, call=None, heads=4) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, heads, batch_first=batch_first, kdim=kdim, vdim=kdim)
        self.call = call or {}
        self.kdim = kdim

    def forward(self, x, *masks):
        kv = x[..., : self.kdim] if self.kdim else x
        out, weights = self.attn(x, kv, kv, **self.call)
        return out if self.call.get("need_weights") is False else out + weights.sum()


def _mha_case(name: str, batch: int, length: int, heads: int = 4):
    kpm = torch.zeros(batch, length, dtype=torch.bool)
    kpm[0, -2:] = True
    cases = {
        "plain": {},
        "seq_first": {"batch_first": False},
        "kdim": {"kdim": 8},
        "no_weights": {"call": {"need_weights": False}},
        "per_head_weights": {"call": {"average_attn_weights": False}},
        "key_padding": {"call": {"key_padding_mask": kpm}},
        "bool_mask": {"call": {"attn_mask": torch.ones(length, length, dtype=torch.bool).triu(1)}},
        "float_mask": {"call": {"attn_mask": torch.randn(batch * heads, length, length)}},
        "float_padding": {
            "call": {"key_padding_mask": torch.randn(batch, length), "need_weights": False}
        },
    }
    return cases[name]


@pytest.mark.parametrize(
    "case",
    [
        "plain",
        "seq_first",
        "kdim",
        "no_weights",
        "per_head_weights",
        "key_padding",
        "bool_mask",
        "float_mask",
        "float_padding",
    ],
)
def test_multihead_attention_decomposition_equals_the_module_in_fp32(case):
    torch.manual_seed(0)
    batch, length = 3, 6
    model = MHA(**_mha_case(case, batch, length)).eval()
    gm = _decomposed(model)
    assert not any(isinstance(m, nn.MultiheadAttention) for m in gm.modules())
    linears = [n for n, m in gm.named_modules() if type(m) is nn.Linear]
    assert len(linears) == 4 and len(matmul_modules(gm)) == 2, linears
    x = torch.randn(batch, length, 16)
    if not model.attn.batch_first:
        x = x.transpose(0, 1).contiguous()
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-6)


def test_what_cannot_be_decomposed_is_refused_by_name():
    with pytest.raises(ValueError, match=r"dropout_p=0.1.*even in eval"):
        _decomposed(SDPA(dropout_p=0.1))
    with pytest.raises(ValueError, match="enable_gqa"):
        _decomposed(SDPA(enable_gqa=True))
    model = MHA()
    model.attn = nn.MultiheadAttention(16, 4, add_bias_kv=True, batch_first=True)
    with pytest.raises(ValueError, match=r"add_bias_kv.*quantize_matmuls=False"):
        _decomposed(model)
    gm = _decomposed(MHA())
    with pytest.raises(ValueError, match="batched \\(3-D\\) inputs only"):
        gm(torch.randn(6, 16))


class ViTBlock(nn.Module):
    """A tiny ViT-like classifier: LayerNorm, linear qkv, ``Q Kᵀ``, softmax, ``A V``, proj,
    GELU MLP, head."""

    def __init__(self, dim: int = 16, heads: int = 2, classes: int = 5) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.head = nn.Linear(dim, classes)

    def qkv_of(self, x):
        b, n, c = x.shape
        h = self.heads
        return self.qkv(self.norm(x)).reshape(b, n, 3, h, c // h).permute(2, 0, 3, 1, 4).unbind(0)

    def finish(self, x, o):
        b, n, c = x.shape
        x = x + self.proj(o.transpose(1, 2).reshape(b, n, c))
        x = x + self.fc2(F.gelu(self.fc1(x)))
        return self.head(x.mean(1))

    def forward(self, x):
        q, k, v = self.qkv_of(x)
        attn = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
        return self.finish(x, attn.softmax(-1) @ v)


def _calib(n: int = 2, seed: int = 0, shape=(8, 6, 16)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


def _fq(x, lo, hi, bits=8):
    scale, zero_point = activation_qparams(lo, hi, bits)
    return fake_quantize_per_tensor(x, scale, zero_point, bits)


def test_vit_block_w8a8_equals_a_by_hand_fake_quant_of_q_k_v_and_the_attention_matrix():
    torch.manual_seed(0)
    model = ViTBlock().eval()
    calib = _calib()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left in fp32, nothing to say
        q = quant.quantize(model, "W8A8", calib)
    cov = q.quant_coverage
    assert cov["quantized"] == cov["total"] == 7 and cov["fp32"] == []  # 5 linears, 2 products
    assert cov["float_ops"] == ["norm (layer_norm)", "softmax (softmax)", "gelu (gelu)"]
    (qk_name, qk), (av_name, av) = matmul_modules(q)
    assert qk.calibrated and av.calibrated

    # the operands' ranges, observed by hand on the fp32 network
    seen: dict[str, list[float]] = {}

    def note(key, t):
        lo, hi = seen.get(key, [math.inf, -math.inf])
        seen[key] = [min(lo, float(t.min())), max(hi, float(t.max()))]

    with torch.no_grad():
        for x in calib:
            qq, kk, vv = model.qkv_of(x)
            a = ((qq @ kk.transpose(-2, -1)) * qq.shape[-1] ** -0.5).softmax(-1)
            for key, t in (("q", qq), ("k", kk), ("a", a), ("v", vv)):
                note(key, t)
    assert qk.range_a == tuple(seen["q"]) and qk.range_b == tuple(seen["k"])
    assert av.range_a == tuple(seen["a"]) and av.range_b == tuple(seen["v"])

    # the quantized network by hand: quantized linears (their own modules), then Q, Kᵀ, A, V
    # fake-quantized with quantcal's primitives at those ranges, softmax in float
    x = torch.randn(4, 6, 16)
    with torch.no_grad():
        b, n, c = x.shape
        qkv = q.qkv(q.norm(x)).reshape(b, n, 3, 2, 8).permute(2, 0, 3, 1, 4)
        qq, kk, vv = qkv.unbind(0)
        scores = _fq(qq, *seen["q"]) @ _fq(kk.transpose(-2, -1), *seen["k"])
        a = (scores * 8**-0.5).softmax(-1)
        o = _fq(a, *seen["a"]) @ _fq(vv, *seen["v"])
        h = x + q.proj(o.transpose(1, 2).reshape(b, n, c))
        h = h + q.fc2(F.gelu(q.fc1(h)))
        by_hand = q.head(h.mean(1))
        out = q(x)
        torch.testing.assert_close(out, by_hand, rtol=0, atol=1e-6)
        # the products do quantize: with them in fp32 the logits differ
        with quant.fake_quant_disabled(q):
            torch.testing.assert_close(q(x), model(x), rtol=1e-5, atol=1e-6)
        with pytest.warns(UserWarning, match="left in fp32: matmul"):
            fp32_products = quant.quantize(model, quant.QuantConfig(quantize_matmuls=False), calib)
    assert not torch.equal(fp32_products(x), out)
    assert hidden_computations(q, x) == []  # the products' own matmuls are not fp32 ones

    table = quant.inspect(q, [x])
    assert [p.name for p in table.products] == [qk_name, av_name]
    assert table.products[0].scale_a == activation_qparams(*seen["q"], 8)[0]
    assert all(math.isfinite(p.sqnr_db) and p.sqnr_db > 20 for p in table.products)
    rows = table.to_rows()
    assert [r["kind"] for r in rows[-5:]] == ["MatMul", "MatMul", "layer_norm", "softmax", "gelu"]
    assert rows[-1] == {"name": "gelu", "kind": "gelu", "precision": "float"}
    text = str(table)
    assert text.splitlines()[0] == "quantized 7 of 7 conv/linear computations"
    assert "kept in float: norm (layer_norm), softmax (softmax), gelu (gelu)" in text


@pytest.mark.parametrize(
    "model",
    [SDPA(), SDPA(is_causal=True), MHA(), MHA(batch_first=False, call={"need_weights": False})],
    ids=["sdpa", "sdpa_causal", "mha", "mha_seq_first"],
)
def test_sdpa_and_multihead_attention_models_are_fully_quantized(model):
    torch.manual_seed(0)
    model = model.eval()
    shape = (6, 8, 16) if getattr(getattr(model, "attn", None), "batch_first", True) else (8, 6, 16)
    calib = _calib(shape=shape)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q = quant.quantize(model, quant.QuantConfig(on_unsupported="error"), calib)
    cov = q.quant_coverage
    assert cov["fp32"] == [] and cov["quantized"] == cov["total"]
    assert len(matmul_modules(q)) == 2 and all(m.calibrated for _, m in matmul_modules(q))
    x = calib[0]
    with torch.no_grad():
        ref, out = model(x), q(x)
        with quant.fake_quant_disabled(q):
            torch.testing.assert_close(q(x), ref, rtol=1e-5, atol=1e-5)
    assert not torch.equal(out, ref)
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()
    assert hidden_computations(q, x) == []


def test_quantize_matmuls_false_keeps_the_products_in_fp32_named():
    torch.manual_seed(0)
    model = ViTBlock().eval()
    config = quant.QuantConfig(quantize_matmuls=False)
    with pytest.warns(UserWarning, match=r"5 of 7 .*left in fp32: matmul \(@ call\)"):
        q = quant.quantize(model, config, _calib())
    assert matmul_modules(q) == []
    assert q.quant_coverage == {
        "quantized": 5,
        "total": 7,
        "fp32": ["matmul (@ call)", "matmul_1 (@ call)"],
    }
    with warnings.catch_warnings(), pytest.raises(ValueError, match="left in fp32"):
        warnings.simplefilter("ignore")
        quant.quantize(model, dataclasses.replace(config, on_unsupported="error"), _calib())
    # the cache keys of before for the default; the setting is part of them when off
    assert "quantize_matmuls" not in quant.QuantConfig().to_dict()
    assert config.to_dict()["quantize_matmuls"] is False
    assert quant.QuantConfig.from_dict(config.to_dict()) == config
    with pytest.raises(TypeError, match="quantize_matmuls"):
        quant.QuantConfig(quantize_matmuls="yes")


def test_a_cnn_without_products_is_unchanged():
    net = models.create_model("resnet20", num_classes=4, image_size=8, in_chans=3, width=0.25)
    net.eval()
    calib = [torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(1))]
    on = quant.quantize(net, "W4A8", calib)
    off = quant.quantize(net, quant.QuantConfig(4, 8, quantize_matmuls=False), calib)
    assert matmul_modules(on) == [] and on.quant_coverage == off.quant_coverage
    assert "float_ops" not in on.quant_coverage
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(on(x), off(x))


@pytest.mark.parametrize("method", ["cle_bc", "adaround"])
def test_other_methods_quantize_the_products_too(method):
    torch.manual_seed(0)
    model = ViTBlock().eval()
    # ViTBlock has no conv/linear -> ReLU -> conv/linear pair to equalize: bias correction
    options = {"iterations": 5} if method == "adaround" else {"equalize": False}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q = quant.quantize(model, "W8A8", _calib(), method=method, method_options=options)
    products = matmul_modules(q)
    assert len(products) == 2 and all(m.calibrated for _, m in products)
    assert q.quant_coverage["quantized"] == q.quant_coverage["total"] == 7


def test_sequential_range_setting_observes_the_products_on_the_quantized_network():
    torch.manual_seed(0)
    model = ViTBlock().eval()
    plain = quant.quantize(model, "W4A4", _calib())
    seq = quant.quantize(model, quant.QuantConfig(4, 4, sequential=True), _calib())
    (_, a), _ = matmul_modules(plain)
    (_, b), _ = matmul_modules(seq)
    assert a.calibrated and b.calibrated and a.range_a != b.range_a


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_quantized_products_export_with_qdq_on_both_operands_and_agree(tmp_path, exporter):
    """Each product's operands go through QuantizeLinear/DequantizeLinear on its own grid
    before the MatMul, and onnxruntime agrees with the fake-quant model."""
    pytest.importorskip("onnxruntime")
    import onnx

    torch.manual_seed(0)
    q = quant.quantize(ViTBlock().eval(), "W8A8", _calib())
    path = tmp_path / "m.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quant.export_onnx(q, path, torch.randn(2, 6, 16), exporter=exporter)
    graph = onnx.load(str(path)).graph
    producers = {o: n for n in graph.node for o in n.output}

    def dequantized(name: str) -> bool:
        n = producers.get(name)
        while n is not None and n.op_type in ("Transpose", "Reshape", "Identity"):
            n = producers.get(n.input[0])
        return n is not None and n.op_type == "DequantizeLinear"

    both = [n for n in graph.node if n.op_type == "MatMul" and all(map(dequantized, n.input))]
    assert len(both) >= 2 + 1  # Q·Kᵀ and A·V, plus the token linears' own MatMuls
    x = torch.randn(64, 6, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = q(x)
    out = quant.run_onnx(path, x)
    assert (out - ref).abs().max() <= 0.05 * ref.abs().max()
    with torch.no_grad(), quant.fake_quant_disabled(q):
        fp32 = q(x)
    assert (out - ref).abs().max() < (out - fp32).abs().max()  # closer to the quantized model


class ConvAttention(nn.Module):
    """A conv stem, then self-attention over its 64 positions (a product of two activations)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.q, self.k = nn.Linear(8, 8), nn.Linear(8, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        t = torch.relu(self.stem(x)).flatten(2).transpose(1, 2)  # (N, 64, 8)
        attn = (self.q(t) @ self.k(t).transpose(1, 2)).softmax(-1)
        return self.head((attn @ t).mean(1))


def test_qat_fine_tunes_the_products_with_learned_steps():
    """LSQ covers the products too: their steps start at the ptq scales, move during the
    fine-tuning, come back as the products' scales (kept by range calibration afterwards), and
    the quantized model computes each product from operands on those grids."""
    from quantcal.training.train import TrainConfig

    split = four_class_split(32)
    torch.manual_seed(0)
    calib = [x for x, _ in split.batches(16)]
    model = ConvAttention().eval()
    ptq = quant.quantize(model, "W8A8", calib)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left to warn about: no product runs in fp32
        q = quant.quantize(
            model,
            "W8A8",
            calib,
            method="qat",
            train_data=split,
            train_config=TrainConfig(epochs=1, batch_size=16, schedule="cosine", augment=False),
            method_options={"epochs": 2, "lr": 0.05},
        )
    products, before = dict(matmul_modules(q)), dict(matmul_modules(ptq))
    assert len(products) == 2 and set(products) == set(before)
    for name, m in products.items():
        assert m.calibrated and m.qparams_from_method
        b = before[name]
        assert (m.zero_point_a, m.zero_point_b) == (b.zero_point_a, b.zero_point_b)
        assert (m.scale_a, m.scale_b) != (b.scale_a, b.scale_b)  # learned, not re-observed
        assert 0 <= m.clip_fraction_a <= 1 and 0 <= m.clip_fraction_b <= 1  # measured
        lo, hi = m.range_a
        assert lo == pytest.approx(-m.zero_point_a * m.scale_a)
        assert hi == pytest.approx((255 - m.zero_point_a) * m.scale_a)
    assert q.quant_coverage["quantized"] == q.quant_coverage["total"] == 6
    seen = {}
    hooks = [
        m.register_forward_pre_hook(lambda mod, args, n=n: seen.setdefault(n, args))
        for n, m in products.items()
    ]
    with torch.no_grad():
        q(calib[0])
    for h in hooks:
        h.remove()
    for name, m in products.items():  # the operands land on the learned grids
        a, b = m.quantize_operands(*seen[name])
        for t, s, z in ((a, m.scale_a, m.zero_point_a), (b, m.scale_b, m.zero_point_b)):
            levels = t / s + z
            assert torch.allclose(levels, levels.round(), atol=1e-3)
            assert levels.min() >= -1e-3 and levels.max() <= 255 + 1e-3


class OptionalMaskModel(nn.Module):
    """timm's ViT shape: the top-level forward takes an optional mask and causal flag that are
    passed down to every attention call."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Linear(16, 48), nn.Linear(16, 16)

    def forward(self, x, attn_mask=None, is_causal: bool = False):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, 2, c // 2).permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        return self.proj(o.transpose(1, 2).reshape(b, n, c))


def test_optional_forward_arguments_are_traced_at_their_defaults():
    """The deploy graph is called with the input alone, so a forward's optional mask and flag
    are fixed at their defaults and the attention they reach is decomposed and quantized (a
    ViT's was refused as "is_causal is computed in the graph")."""
    torch.manual_seed(0)
    model = OptionalMaskModel().eval()
    calib = _calib(shape=(6, 8, 16))
    q = quant.quantize(model, quant.QuantConfig(on_unsupported="error"), calib)
    assert q.quant_coverage["fp32"] == [] and len(matmul_modules(q)) == 2
    with torch.no_grad(), quant.fake_quant_disabled(q):
        torch.testing.assert_close(q(calib[0]), model(calib[0]), rtol=1e-5, atol=1e-5)


def test_matmul_bits_keeps_the_products_at_their_own_bits():
    """``QuantConfig(matmul_bits=8)`` at W4A4: every layer at 4 bits, both operands of every
    product at 8, with the very ranges W8A8's products get (both from the fp32 network); named
    "W4A4+P8", absent from ``to_dict`` when None (the cache keys of before), and charged at
    8 x 8 bit operations per product MAC."""
    from quantcal.models.deploy import to_deploy
    from quantcal.models.stats import describe, product_macs

    model = models.create_model("ablation_attention", num_classes=10, width=0.25, seed=0).eval()
    g = torch.Generator().manual_seed(0)
    calib = [torch.randn(8, 3, 32, 32, generator=g) for _ in range(2)]
    cfg = quant.QuantConfig(weight_bits=4, act_bits=4, matmul_bits=8)
    assert cfg.name == "W4A4+P8" and cfg.product_bits == 8
    assert quant.QuantConfig(weight_bits=4, act_bits=4, matmul_bits=4).name == "W4A4"
    assert "matmul_bits" not in quant.parse_precision("W4A4").to_dict()
    assert quant.QuantConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="matmul_bits"):
        quant.QuantConfig(matmul_bits=1)
    q, q8 = quant.quantize(model, cfg, calib), quant.quantize(model, "W8A8", calib)
    products, ref = dict(matmul_modules(q)), dict(matmul_modules(q8))
    assert len(products) == 6 and set(products) == set(ref)
    for name, m in products.items():
        assert m.act_bits == 8
        assert (m.scale_a, m.zero_point_a, m.scale_b, m.zero_point_b) == (
            ref[name].scale_a,
            ref[name].zero_point_a,
            ref[name].scale_b,
            ref[name].zero_point_b,
        )
    table = quant.inspect(q, calib[:1])
    assert all(r.weight_bits == 4 and r.act_bits == 4 for r in table)
    deploy = to_deploy(model)
    example = torch.zeros(1, 3, 32, 32)
    prods, _ = product_macs(deploy, example)
    w4a4 = describe(deploy, 32, in_chans=3, config=quant.parse_precision("W4A4")).bops
    assert describe(deploy, 32, in_chans=3, config=cfg).bops == w4a4 + prods * (64 - 16)


def test_study_matmul_bits_enters_the_cell_keys_and_is_checked():
    from quantcal import study
    from quantcal.study import config as studyconfig
    from quantcal.study import keys

    base = {
        "name": "p8",
        "data": {"datasets": ["digits"]},
        "model": [{"arch": "ablation_attention", "width": 0.25}],
        "quant": {"precisions": ["fp32", "W4A4"]},
    }
    plain = studyconfig.from_toml_dict(base)
    eight = studyconfig.from_toml_dict({**base, "quant": {**base["quant"], "matmul_bits": 8}})
    assert plain.matmul_bits is None and eight.matmul_bits == 8
    assert studyconfig.from_toml_dict(tomllib_loads(eight.to_toml())).matmul_bits == 8
    cells = {c.precision: c for c in study.expand_cells(plain)[0][1]}
    cells8 = {c.precision: c for c in study.expand_cells(eight)[0][1]}
    assert keys.quant_config(eight, cells8["W4A4"]).name == "W4A4+P8"
    assert keys.logits_key(plain, cells["W4A4"], "t") != keys.logits_key(eight, cells8["W4A4"], "t")
    assert keys.logits_key(plain, cells["fp32"], "t") == keys.logits_key(eight, cells8["fp32"], "t")
    with pytest.raises(ValueError, match=r"quant\.matmul_bits must be an int in 2\.\.16"):
        studyconfig.from_toml_dict({**base, "quant": {**base["quant"], "matmul_bits": 1}})


def tomllib_loads(text: str) -> dict:
    import tomllib

    return tomllib.loads(text)


def test_a_study_with_matmul_bits_names_the_products_bits_in_the_notes(tmp_path):
    from quantcal import study
    from quantcal.report import html as report
    from quantcal.study import config as studyconfig

    cfg = {
        "name": "p8",
        "data": {"datasets": ["digits"]},
        "model": [{"arch": "ablation_attention", "width": 0.25}],
        "train": {"epochs": 1, "augment": False},
        "quant": {"precisions": ["fp32", "W4A4"], "matmul_bits": 8},
        "recal": {"methods": ["none"]},
        "metrics": {"bootstrap": 20},
    }
    path = tmp_path / "p8.toml"
    path.write_text(studyconfig.from_toml_dict(cfg).to_toml())
    study.run_study(str(path), tmp_path / "run", quiet=True)
    rows = {r["precision"]: r for r in report.load_rows(tmp_path / "run")}
    assert "6 product(s) of two activations" in rows["W4A4"]["notes"]
    assert "at 8 bits ([quant] matmul_bits)" in rows["W4A4"]["notes"]
    assert "product(s)" not in rows["fp32"]["notes"]
