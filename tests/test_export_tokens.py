"""quant.export_onnx on transformer-style models (issue #26, item 4): a Linear on (B, N, C)
tokens is written MatMul + Add and gets its int32 bias there, a forward that reads a quantized
conv's ``.weight`` exports, and layers whose constants the exporter merges (identical weights
and per-channel scales) pass the export's check; onnxruntime agrees with the simulation."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quantcal import quant

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


class Block(nn.Module):
    """A pre-norm transformer block on (B, N, C) tokens, attention written with plain matmuls."""

    def __init__(self, dim: int, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, dim * 2)
        self.fc2 = nn.Linear(dim * 2, dim)

    def forward(self, x):
        b, n, c = x.shape
        h = self.heads
        qkv = self.qkv(self.norm1(x)).reshape(b, n, 3, h, c // h).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q @ k.transpose(-2, -1)) * (c // h) ** -0.5).softmax(-1)
        x = x + self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TinyViT(nn.Module):
    """Patch-embed conv, class token, position embedding, two blocks, class-token head."""

    def __init__(self, dim: int = 16, classes: int = 5) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 8, stride=8)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, 17, dim) * 0.02)
        self.blocks = nn.Sequential(Block(dim), Block(dim))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        return self.head(self.norm(self.blocks(x))[:, 0])


class TinyMobileViT(nn.Module):
    """Conv stem, a MobileViT block (local conv, unfold into 2x2-patch tokens, a transformer
    block over them, fold back, conv fuse with the input), mean-pool head."""

    def __init__(self, dim: int = 16, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.local = nn.Conv2d(8, 8, 3, padding=1)
        self.to_tokens = nn.Conv2d(8, dim, 1)
        self.block = Block(dim)
        self.from_tokens = nn.Conv2d(dim, 8, 1)
        self.fuse = nn.Conv2d(16, 8, 3, padding=1)
        self.head = nn.Linear(8, classes)

    def forward(self, x):
        x = F.silu(self.stem(x))  # (B, 8, 16, 16)
        y = self.to_tokens(F.silu(self.local(x)))
        b, c, h, w = y.shape
        t = y.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 3, 5, 2, 4, 1)  # unfold
        t = self.block(t.reshape(b * 4, (h // 2) * (w // 2), c))
        y = t.reshape(b, 2, 2, h // 2, w // 2, c).permute(0, 5, 3, 1, 4, 2)  # fold
        y = self.from_tokens(y.reshape(b, c, h, w))
        x = F.silu(self.fuse(torch.cat([x, y], 1)))
        return self.head(x.mean((2, 3)))


class PositionalEncodingFourier(nn.Module):
    """timm's (EdgeNeXt, XCiT): reads ``token_projection.weight`` for its device and dtype."""

    def __init__(self, hidden: int = 8, dim: int = 16) -> None:
        super().__init__()
        self.token_projection = nn.Conv2d(hidden * 2, dim, 1)
        self.hidden = hidden

    def forward(self, b: int, h: int, w: int):
        device = self.token_projection.weight.device
        dtype = self.token_projection.weight.dtype
        y = torch.arange(1, h + 1, device=device).to(torch.float32).unsqueeze(1).repeat(1, 1, w)
        x = torch.arange(1, w + 1, device=device).to(torch.float32).repeat(1, h, 1)
        dim_t = torch.arange(self.hidden, device=device).to(torch.float32)
        dim_t = 100 ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.hidden)
        pos_x, pos_y = x[:, :, :, None] / dim_t, y[:, :, :, None] / dim_t
        pos = torch.cat((pos_y.sin(), pos_x.cos()), dim=3).permute(0, 3, 1, 2)
        return self.token_projection(pos.to(dtype)).repeat(b, 1, 1, 1)


class WithPositions(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 4, stride=4)
        self.pos_embed = PositionalEncodingFourier()
        self.mix = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = self.stem(x)
        b, _, h, w = x.shape
        x = torch.relu(self.mix(x + self.pos_embed(b, h, w)))
        return self.head(x.mean((2, 3)))


class Copies(nn.Module):
    """Two pairs of layers with the same weights (so the same per-channel scales), and one
    pair with the same input grid too: exporters merge their constants."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 8, 1)
        self.d = nn.Conv2d(8, 8, 1)
        self.b.load_state_dict(self.a.state_dict())
        self.d.load_state_dict(self.c.state_dict())
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        y = torch.relu(self.a(x)) + torch.relu(self.b(x * 0.5))
        y = self.c(y) + self.d(torch.relu(y))  # relu(y) == y: the same input grid
        return self.head(y.mean((2, 3)))


def _quantize(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    calib = [torch.randn(32, 3, 32, 32, generator=g)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # attention's products of two activations quantized too (QDQ on both operands)
        return quant.quantize(model.eval(), "W8A8", calib)


def _agrees(qmodel: nn.Module, path) -> None:
    """test_quant_export's agreement tolerance (a rounding tie may flip one step)."""
    x = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = qmodel(x)
    out = quant.run_onnx(path, x)  # exported with a batch of 2, run with 64
    assert out.shape == ref.shape
    assert (out - ref).abs().max() <= 0.05 * ref.abs().max()
    assert (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.95


def _int32_bias_inputs(path) -> dict[str, int]:
    """How many int32 bias dequantizers each op type of the graph reads."""
    model = onnx.load(str(path))
    int32 = {i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT32}
    dq = {
        n.output[0]
        for n in model.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in int32
    }
    seen: dict[str, int] = {}
    for n in model.graph.node:
        for name in n.input:
            if name in dq:
                seen[n.op_type] = seen.get(n.op_type, 0) + 1
    return seen


@pytest.mark.parametrize("exporter", ["auto", "dynamo"])
@pytest.mark.parametrize("make", [TinyViT, TinyMobileViT], ids=["vit", "mobilevit"])
def test_token_linears_export_with_int32_biases_and_agree(tmp_path, make, exporter):
    qmodel = _quantize(make())
    x = torch.randn(2, 3, 32, 32)
    path = quant.export_onnx(qmodel, tmp_path / "m.onnx", x, exporter=exporter)
    layers = quant.quantized_layers(qmodel)
    token_linears = sum(layer.kind == "Linear" for name, layer in layers if "block" in name)
    assert token_linears >= 4
    biases = _int32_bias_inputs(path)
    assert biases.get("Add", 0) == token_linears  # MatMul + Add: the bias on the Add
    assert sum(biases.values()) == len(layers)  # every layer's bias is int32
    _agrees(qmodel, path)


@torch.fx.wrap
def conv_with(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x, weight, bias, padding=1)


class ReadsWeight(nn.Module):
    """A second conv with ``self.conv``'s weights, in the traced forward itself."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.head = nn.Linear(3, 5)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        y = F.conv2d(y, self.conv.weight, self.conv.bias, padding=1)
        return self.head(y.mean((2, 3)))


class ReadsWeightOpaquely(ReadsWeight):
    """The same inside a function fx does not trace: it runs outside the quantized layers."""

    def forward(self, x):
        y = torch.relu(self.conv(x))
        y = conv_with(y, self.conv.weight, self.conv.bias)
        return self.head(y.mean((2, 3)))


@pytest.mark.parametrize("exporter", ["auto", "dynamo"])
def test_a_forward_reading_a_quantized_conv_weight_exports_and_agrees(tmp_path, exporter):
    qmodel = _quantize(WithPositions())
    assert qmodel.quant_coverage["quantized"] == qmodel.quant_coverage["total"] == 4
    path = quant.export_onnx(
        qmodel, tmp_path / "m.onnx", torch.randn(2, 3, 32, 32), exporter=exporter
    )
    _agrees(qmodel, path)


@pytest.mark.parametrize("exporter", ["auto", "dynamo"])
def test_a_weight_used_outside_its_layer_is_quantized_or_named_and_exports(tmp_path, exporter):
    """In the traced graph, ``to_deploy`` makes the functional conv the module ``conv.conv``
    (quantized, inside the quantized ``conv``); inside an opaque function it runs outside the
    quantized layers and the run-time count names it. Both export and agree."""
    traced = _quantize(ReadsWeight())
    assert traced.quant_coverage == {"quantized": 3, "total": 3, "fp32": []}
    assert "conv.conv" in dict(quant.quantized_layers(traced))
    opaque = _quantize(ReadsWeightOpaquely())
    cov = opaque.quant_coverage
    assert cov["quantized"] == 2 and cov["total"] == 3
    (entry,) = cov["fp32"]
    assert entry.startswith("conv_with (conv2d call at test_export_tokens.py:")
    for i, qmodel in enumerate([traced, opaque]):
        x = torch.randn(2, 3, 32, 32)
        path = quant.export_onnx(qmodel, tmp_path / f"{i}.onnx", x, exporter=exporter)
        _agrees(qmodel, path)


@pytest.mark.parametrize("exporter", ["auto", "dynamo"])
def test_layers_whose_constants_the_exporter_merges_pass_the_check(tmp_path, exporter):
    """Copied weights: the TorchScript exporter reads the second layer's weight and scales
    through Identity nodes, the dynamo exporter merges the two weight dequantizers into one;
    every layer is still found with its own integers, scales, input grid and bias."""
    qmodel = _quantize(Copies())
    layers = dict(quant.quantized_layers(qmodel))
    assert torch.equal(layers["a"].weight_scale, layers["b"].weight_scale)
    assert torch.equal(layers["c"].weight_int, layers["d"].weight_int)
    path = quant.export_onnx(
        qmodel, tmp_path / "m.onnx", torch.randn(2, 3, 32, 32), exporter=exporter
    )
    model = onnx.load(str(path))
    int8 = [
        i
        for i in model.graph.initializer
        if i.data_type == onnx.TensorProto.INT8 and len(i.dims) > 1
    ]
    assert len(int8) <= len(layers)  # shared where the exporter merged them
    assert not [
        i
        for i in model.graph.initializer
        if i.data_type == onnx.TensorProto.FLOAT and list(i.dims) == list(layers["a"].weight.shape)
    ]  # no float weights left
    assert sum(_int32_bias_inputs(path).values()) == len(layers)
    _agrees(qmodel, path)


def test_the_check_names_a_layer_the_graph_does_not_hold_as_measured(tmp_path, monkeypatch):
    """Without the int32-bias pass, the check refuses the file and names the first layer."""
    from quantcal.quant import export

    qmodel = _quantize(TinyViT())
    monkeypatch.setattr(export, "quantize_bias_initializers", lambda model: 0)
    with pytest.raises(RuntimeError, match=r"layer 'patch' \(Conv2d.*int32 bias is not in"):
        quant.export_onnx(qmodel, tmp_path / "m.onnx", torch.randn(2, 3, 32, 32))
    assert not (tmp_path / "m.onnx").exists()
    monkeypatch.setattr(export, "fold_weight_quantizers", lambda model: 0)
    with pytest.raises(RuntimeError, match=r"layer 'patch' .*no Conv/Gemm/MatMul"):
        quant.export_onnx(qmodel, tmp_path / "m.onnx", torch.randn(2, 3, 32, 32))
