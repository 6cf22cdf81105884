"""quant.export_onnx: the W8A8 QDQ graph, run by onnxruntime, agrees with the simulation."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from torch import nn

from quantcal import quant
from quantcal.quant.apply import quantized_layers

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.dw = nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        a, b = x.chunk(2, dim=1)
        x = torch.cat([b, a], 1)
        return self.fc(torch.relu(self.dw(x)).mean((2, 3)))


def _calib():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(32, 3, 8, 8, generator=g)]


def _graph_checks(path, qmodel):
    model = onnx.load(str(path))
    ops = Counter(n.op_type for n in model.graph.node)
    n_layers = len(quantized_layers(qmodel))
    int8 = {i.name: i for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8}
    weight_dq = [
        n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in int8
    ]
    assert len(weight_dq) == n_layers
    assert ops["Conv"] + ops["Gemm"] + ops["MatMul"] >= n_layers
    assert ops["QuantizeLinear"] >= 1  # activations are quantized at run time
    for node in weight_dq:  # per-axis scales, one per output channel
        dims = list(int8[node.input[0]].dims)
        scale = next(i for i in model.graph.initializer if i.name == node.input[1])
        assert list(scale.dims) == [dims[0]]
    for node in weight_dq:
        values = onnx.numpy_helper.to_array(int8[node.input[0]])
        assert np.abs(values.astype(np.int32)).max() <= 127  # symmetric narrow range
    # biases: int32 on the accumulator grid s_x * s_w[c], equal to the simulation's
    int32 = {i.name: i for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT32}
    bias_dq = [
        n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in int32
    ]
    layers = [layer for _, layer in quantized_layers(qmodel) if layer.bias_bits == 32]
    if len(bias_dq) < len(layers):  # an exporter may drop all-zero biases: adding 0 is exact
        layers = [layer for layer in layers if layer.bias.any()]
    assert len(bias_dq) == len(layers)
    init = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    sim = sorted(layer.bias.numpy().tobytes() for layer in layers)
    stored = sorted(
        (init[n.input[0]].astype(np.float32) * init[n.input[1]]).tobytes() for n in bias_dq
    )
    assert sim == stored


@pytest.mark.parametrize("exporter", ["auto", "dynamo"])
def test_small_model_exports_and_matches(tmp_path, exporter):
    torch.manual_seed(0)
    qmodel = quant.quantize(Small(), "W8A8", _calib())
    x = torch.randn(64, 3, 8, 8)
    path = quant.export_onnx(qmodel, tmp_path / "small.onnx", x[:2], exporter=exporter)
    assert path.exists() and not list(tmp_path.glob(".*tmp"))
    _graph_checks(path, qmodel)
    with torch.no_grad():
        ref = qmodel(x)
    out = quant.run_onnx(path, x)  # dynamic batch: exported with 2, run with 64
    assert out.shape == ref.shape
    assert (out - ref).abs().max() <= 0.05 * ref.abs().max()
    assert (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.95


@pytest.mark.slow
def test_trained_w8a8_onnxruntime_agrees_with_simulation(tmp_path):
    from test_quant_apply import trained_on_digits

    model, splits = trained_on_digits("shufflenetv2")  # channel split + shuffle in the graph
    qmodel = quant.quantize(model, "W8A8", splits.ptq_calib.batches(100))
    x = torch.cat([x for x, _ in splits.test.batches(512)])
    path = quant.export_onnx(qmodel, tmp_path / "shufflenet.onnx", x[:4])
    _graph_checks(path, qmodel)
    with torch.no_grad():
        ref = qmodel(x)
    scale = ref.abs().mean()
    out = quant.run_onnx(path, x)  # QDQ ops as written: integer grids, float conv
    assert (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.99
    assert (out - ref).abs().mean() <= 1e-2 * scale
    # onnxruntime's fused integer kernels (QLinearConv: int32 accumulation, int32 bias,
    # requantization to the next layer's grid) differ only by one-step rounding ties. Measured:
    # mean |error| 0.13 % (plain) and 0.16 % (fused) of mean |logit|, 100 % top-1; with float
    # biases (earlier width-0.1 fixture) the fused path was 3 % and 98.9 %: the runtime then
    # rounds the bias itself
    fused = quant.run_onnx(path, x, optimize=True)
    assert (fused.argmax(1) == ref.argmax(1)).float().mean() >= 0.99
    assert (fused - ref).abs().mean() <= 1e-2 * scale


def test_float_bias_exports_as_float(tmp_path):
    torch.manual_seed(0)
    qmodel = quant.quantize(Small(), quant.QuantConfig(bias_bits=None), _calib())
    path = quant.export_onnx(qmodel, tmp_path / "float_bias.onnx", torch.randn(2, 3, 8, 8))
    model = onnx.load(str(path))
    assert not [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT32]
    x = torch.randn(16, 3, 8, 8)
    with torch.no_grad():
        ref = qmodel(x)
    assert (quant.run_onnx(path, x) - ref).abs().max() <= 1e-3 * ref.abs().max()
    with pytest.warns(UserWarning, match="beyond the int16 accumulator grid"):  # named, kept float
        q16 = quant.quantize(Small(), quant.QuantConfig(bias_bits=16), _calib())
    with pytest.raises(ValueError, match="int32"):
        quant.export_onnx(q16, tmp_path / "b16.onnx", torch.randn(2, 3, 8, 8))


@pytest.mark.parametrize("exporter", ["auto", "dynamo"])
def test_equal_zero_biases_merged_by_the_exporter_are_quantized(tmp_path, exporter):
    """Exporters merge equal constants (two all-zero biases, as a fresh SE block or classifier
    has) into one initializer read through Identity nodes; each layer still gets its own int32
    bias on its own grid, and a tiny negative bias that rounds to 0 is +0.0, as in ONNX."""
    torch.manual_seed(0)
    model = Small()
    with torch.no_grad():
        model.dw.bias.zero_()
        model.fc.bias.zero_()
        model.conv.bias.fill_(-1e-12)  # rounds to 0 on its grid
    qmodel = quant.quantize(model, "W8A8", _calib())
    layers = dict(quant.quantized_layers(qmodel))
    assert torch.equal(layers["conv"].bias, torch.zeros(6))
    assert not torch.signbit(layers["conv"].bias).any()  # +0.0, not -0.0
    path = quant.export_onnx(
        qmodel, tmp_path / "zeros.onnx", torch.randn(2, 3, 8, 8), exporter=exporter
    )
    _graph_checks(path, qmodel)
    x = torch.randn(16, 3, 8, 8)
    with torch.no_grad():
        ref = qmodel(x)
    assert (quant.run_onnx(path, x) - ref).abs().max() <= 1e-3 * ref.abs().max()


def test_export_bad_input(tmp_path):
    qmodel = quant.quantize(Small(), "W4A4", _calib())
    with pytest.raises(ValueError, match="8-bit activations"):
        quant.export_onnx(qmodel, tmp_path / "m.onnx", torch.randn(1, 3, 8, 8))
    fp32 = quant.quantize(Small(), None, None)
    with pytest.raises(ValueError, match="no quantized layers"):
        quant.export_onnx(fp32, tmp_path / "m.onnx", torch.randn(1, 3, 8, 8))
    w8 = quant.quantize(Small(), "W8A8", _calib())
    with pytest.raises(ValueError, match="exporter"):
        quant.export_onnx(w8, tmp_path / "m.onnx", torch.randn(1, 3, 8, 8), exporter="tf")
    with pytest.raises(TypeError, match="example_input"):
        quant.export_onnx(w8, tmp_path / "m.onnx", None)
    assert not (tmp_path / "m.onnx").exists()


def test_a_mixed_plan_of_8_bit_activations_exports_and_a_4_bit_one_is_named(tmp_path):
    """A plan with W8A8 and W4A8 layers exports (each layer's own integer weights); a layer at
    A4 is refused by name."""
    torch.manual_seed(0)
    cfg = quant.QuantConfig(layer_bits={"dw": (4, 8)})
    qmodel = quant.quantize(Small(), cfg, _calib())
    x = torch.randn(64, 3, 8, 8)
    path = quant.export_onnx(qmodel, tmp_path / "mixed.onnx", x[:2])
    _graph_checks(path, qmodel)
    model = onnx.load(str(path))
    dw = dict(quantized_layers(qmodel))["dw"]
    int8 = [
        onnx.numpy_helper.to_array(i)
        for i in model.graph.initializer
        if i.data_type == onnx.TensorProto.INT8 and list(i.dims) == list(dw.weight.shape)
    ]
    assert int8 and np.abs(int8[0].astype(np.int32)).max() <= 7  # the 4-bit layer's grid
    with torch.no_grad():
        ref = qmodel(x)
    out = quant.run_onnx(path, x)
    assert (out - ref).abs().max() <= 0.05 * ref.abs().max()
    low = quant.quantize(Small(), quant.QuantConfig(layer_bits={"fc": (4, 4)}), _calib())
    with pytest.raises(ValueError, match=r"layer 'fc' is W4A4"):
        quant.export_onnx(low, tmp_path / "low.onnx", x[:2])
