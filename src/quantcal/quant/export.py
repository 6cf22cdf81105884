"""ONNX QDQ export of a quantized model, so an integer runtime can check the simulation.

``export_onnx(qmodel, path, example_input)`` writes the model as an ONNX "QDQ" graph (the format
of onnxruntime's and TensorRT's explicit quantization): before every quantized conv/linear, the
input activation goes through ``QuantizeLinear -> DequantizeLinear`` (per-tensor scale and
zero-point; quantcal's uint8 grid is stored as int8 with the zero-point shifted by -128: the same
values, and onnxruntime's x86 s8s8 kernels avoid u8s8 saturation), the weight is an **int8
initializer** feeding ``DequantizeLinear`` with per-axis (per-output-channel) scales, and the
bias an **int32 initializer** on the accumulator grid ``s_x * s_w[c]`` (``QuantConfig.bias_bits``).
onnxruntime then runs the integer-valued model, an independent check of quantcal's fake-quant
arithmetic.

How: each quantized layer is swapped for a wrapper whose forward uses the
``torch.fake_quantize_per_tensor_affine`` / ``per_channel_affine`` ops, which both torch ONNX
exporters translate into Q/DQ pairs; the weight's ``QuantizeLinear`` (constant input) is then
folded into an int8 initializer with quantcal's own rounding, so the file holds integers.
The graph passes live in ``quant.export_graph``: a Linear on (B, N, C) tokens (ViT, Swin,
MLP-Mixer) is written ``MatMul`` + ``Add`` and its bias becomes int32 on the ``Add`` (kept as the
exporter wrote it rather than reshaped into a ``Gemm``: no shape arithmetic for the dynamic batch,
nothing between the dequantizers and the product, and the bias is the same exact grid value), and
the final check matches every quantized layer by value to a product of the graph with its int8
weights, scales, input grid and int32 bias, following the constants exporters merge (``Identity``
nodes, one shared weight dequantizer) instead of counting nodes. A product of two activations
(``QuantMatMul``: attention's Q·Kᵀ and A·V) is written with QuantizeLinear / DequantizeLinear on
each operand's own per-tensor grid before its ``MatMul``, which runtimes fuse into an integer
product.

Exporter choice: ``exporter="auto"`` uses the TorchScript exporter (``dynamo=False``) when torch
still has it, else the ``torch.export``-based one. Reasons: the model is already a static fx graph,
so tracing is exact; the TorchScript path has translated fake-quant ops to Q/DQ since opset 13 and
handles a dynamic batch axis directly; and it is about ten times faster on these CNNs (seconds
rather than tens of seconds on CPU). ``exporter="dynamo"`` forces the new exporter (onnxscript).

onnx and onnxruntime are an optional extra: ``pip install quantcal[onnx]``.
"""

from __future__ import annotations

import copy
import importlib
import io
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from quantcal._io import atomic_write_bytes
from quantcal.quant.apply import QuantizedLayer, quantized_layers
from quantcal.quant.export_graph import (
    QuantizedProduct,
    fold_weight_quantizers,
    quantize_bias_initializers,
    quantized_products,
)
from quantcal.quant.matmul import MATMUL_OPS, QuantMatMul

__all__ = ["export_onnx", "run_onnx"]

_OPSET = 13  # per-axis QuantizeLinear/DequantizeLinear
_EXTRA_HINT = "install the optional extra: pip install quantcal[onnx]"


def _require(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"ONNX export/inference needs the {module!r} package; {_EXTRA_HINT}"
        ) from err


class _QDQLayer(nn.Module):
    """Export-time stand-in for a ``QuantizedLayer``: ops that the exporter turns into Q/DQ.

    ``decomposed=False`` (TorchScript exporter): the ``torch.fake_quantize_per_*_affine`` ops;
    the weight's QuantizeLinear is folded into an int8 initializer afterwards.
    ``decomposed=True`` (dynamo exporter, whose tracer has no fake-tensor rule for the fake-quant
    ops): ``quantized_decomposed`` quantize/dequantize ops with the int8 weight as a buffer.

    A forward that reads the layer's attributes keeps working: ``weight`` and ``bias`` are the
    layer's (timm's ``PositionalEncodingFourier`` reads ``token_projection.weight.device``), and
    the layer's child modules are the wrapper's too (``to_deploy`` makes a functional conv with
    ``self.conv.weight`` the module ``conv.conv``, which the graph calls by that path).
    """

    def __init__(self, layer: QuantizedLayer, decomposed: bool) -> None:
        super().__init__()
        self.layer = layer
        self.decomposed = decomposed
        for name, child in layer.named_children():  # wrapped in turn by ``_with_qdq_layers``
            if not hasattr(self, name):
                self.add_module(name, child)
        if decomposed:  # the layer's stored integers, as they are
            self.register_buffer("weight_int8", layer.weight_int.to(torch.int8))
            q = self.weight_int8
            zero = torch.zeros(q.shape[0], dtype=torch.int64, device=q.device)
            self.register_buffer("weight_zero_point", zero)

    @property
    def weight(self) -> torch.Tensor:
        """The wrapped layer's dequantized weight, for forwards that read ``conv.weight``."""
        return self.layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        """The wrapped layer's bias (the float value its integer bias encodes), or None."""
        return self.layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        # The uint8 activation grid [0, 255] with zero-point z is stored as int8 [-128, 127] with
        # zero-point z - 128: the same real values, and onnxruntime's x86 integer kernels run
        # s8s8 exactly, while u8s8 (VPMADDUBSW) can saturate 16-bit sums.
        scale, zero_point = layer.act_scale_float, layer.act_zero_point_int - 128
        x = x.contiguous()
        if self.decomposed:
            ops = torch.ops.quantized_decomposed
            q = ops.quantize_per_tensor(x, scale, zero_point, -128, 127, torch.int8)
            xq = ops.dequantize_per_tensor(q, scale, zero_point, -128, 127, torch.int8)
            wq = ops.dequantize_per_channel(
                self.weight_int8,
                layer.weight_scale,
                self.weight_zero_point,
                0,
                -128,
                127,
                torch.int8,
            )
            return layer.layer_op(xq, wq, layer.bias)
        xq = torch.fake_quantize_per_tensor_affine(x, scale, zero_point, -128, 127)
        # Symmetric weights use [-q_max, q_max] within int8's [-128, 127]; the stored scales keep
        # |W / s| <= q_max, so the int8 container clamps nothing.
        # The weight fed in is the layer's dequantized stored integers (q * s), so the fold's
        # rint(q * s * (1 / s)) gives back exactly q (|q| <= 127: the float error is < 1e-4),
        # whatever rounding the method chose; ``export_onnx`` checks it.
        zeros = torch.zeros_like(layer.weight_scale, dtype=torch.int32)
        wq = torch.fake_quantize_per_channel_affine(
            layer.weight, layer.weight_scale, zeros, 0, -128, 127
        )
        return layer.layer_op(xq, wq, layer.bias)


class _QDQProduct(nn.Module):
    """Export-time stand-in for a ``QuantMatMul``: both operands through QuantizeLinear /
    DequantizeLinear on their own per-tensor grids (stored as int8 with zero-point z - 128, as
    the layers' inputs are), then the product, which integer runtimes run as a quantized MatMul
    (``QLinearMatMul`` or MatMulInteger after fusing the Q/DQ pairs)."""

    def __init__(self, product: QuantMatMul, decomposed: bool) -> None:
        super().__init__()
        self.product = product
        self.decomposed = decomposed

    def _qdq(self, x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
        zp = int(zero_point) - 128
        if self.decomposed:
            ops = torch.ops.quantized_decomposed
            q = ops.quantize_per_tensor(x, scale, zp, -128, 127, torch.int8)
            return ops.dequantize_per_tensor(q, scale, zp, -128, 127, torch.int8)
        return torch.fake_quantize_per_tensor_affine(x.contiguous(), scale, zp, -128, 127)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        p = self.product
        fn = MATMUL_OPS[p.op]
        if not (p.fake_quant_enabled and p.calibrated):
            return fn(a, b)
        return fn(self._qdq(a, p.scale_a, p.zero_point_a), self._qdq(b, p.scale_b, p.zero_point_b))


def _check_exportable(qmodel: nn.Module) -> list[tuple[str, QuantizedLayer]]:
    layers = quantized_layers(qmodel)
    if not layers:
        raise ValueError(
            "export_onnx needs a model returned by quant.quantize with a quantized precision "
            f"(e.g. 'W8A8'); {type(qmodel).__name__} has no quantized layers"
        )
    for name, m in qmodel.named_modules():
        if isinstance(m, QuantMatMul) and m.calibrated and m.act_bits != 8:
            raise ValueError(
                f"product {name!r} quantizes its operands to {m.act_bits} bits; ONNX QDQ export "
                "supports 8-bit activations (QuantizeLinear saturates to the full 8-bit range "
                "only)"
            )
    for name, layer in layers:
        if layer.bias_bits not in (None, 32):
            raise ValueError(
                f"layer {name!r} has {layer.bias_bits}-bit biases; ONNX QDQ export stores biases "
                "as int32 (bias_bits=32, the default) or float (bias_bits=None)"
            )
        if layer.act_bits != 8 or layer.weight_bits > 8:
            raise ValueError(
                f"layer {name!r} is W{layer.weight_bits}A{layer.act_bits}; ONNX QDQ export "
                "supports 8-bit activations (uint8) and weights of at most 8 bits (int8), e.g. "
                "W8A8 or W4A8 (QuantizeLinear saturates to the full 8-bit range only)"
            )
    return layers


def _with_qdq_layers(qmodel: nn.Module, names: list[str], decomposed: bool) -> nn.Module:
    """A CPU copy of ``qmodel`` with the layers ``names`` (in module order: a layer before the
    layers inside it) replaced by ``_QDQLayer`` wrappers and its products by ``_QDQProduct``."""
    model = copy.deepcopy(qmodel).cpu().eval()
    products = [name for name, m in model.named_modules() if isinstance(m, QuantMatMul)]
    for name in [*names, *products]:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        module = model.get_submodule(name)
        wrapper = (_QDQProduct if isinstance(module, QuantMatMul) else _QDQLayer)(
            module, decomposed
        )
        setattr(parent, leaf, wrapper)
    return model


def _export_bytes(
    qmodel: nn.Module, names: list[str], example: torch.Tensor, exporter: str
) -> tuple[bytes, str]:
    """The ONNX bytes of ``qmodel`` with a dynamic batch axis, by the chosen torch exporter, and
    that exporter's name ("torchscript" or "dynamo")."""
    if exporter == "auto":
        try:
            return _export_bytes(qmodel, names, example, "torchscript")
        except Exception as first:  # e.g. a torch without the TorchScript exporter
            try:
                return _export_bytes(qmodel, names, example, "dynamo")
            except Exception as second:
                raise RuntimeError(
                    f"ONNX export failed with both torch exporters: TorchScript: {first}; "
                    f"dynamo: {second}"
                ) from second
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporters' deprecation/tracer chatter
        if exporter == "torchscript":
            buf = io.BytesIO()
            torch.onnx.export(
                _with_qdq_layers(qmodel, names, decomposed=False),
                (example,),
                buf,
                dynamo=False,
                opset_version=_OPSET,
                input_names=["input"],
                output_names=["output"],
                dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
            )
            return buf.getvalue(), exporter
        importlib.import_module("torch.ao.quantization.fx._decomposed")  # quantized_decomposed ops

        batch = torch.export.Dim("batch", min=1)
        program = torch.onnx.export(
            _with_qdq_layers(qmodel, names, decomposed=True),
            (example,),
            dynamo=True,
            dynamic_shapes=({0: batch},),
            input_names=["input"],
            output_names=["output"],
            verbose=False,
        )
        return program.model_proto.SerializeToString(), exporter


def _check_layers_written(
    products: list[QuantizedProduct], layers: list[tuple[str, QuantizedLayer]], exporter: str
) -> None:
    """Every quantized layer is computed by a product of the graph with exactly its stored int8
    weights, per-channel scales and input grid, and with its int32 bias where it has a nonzero
    one (what was measured is what was written). Layers are matched by value, so products that
    share merged constants or one merged weight dequantizer are recognised."""
    for name, layer in layers:
        q = layer.weight_int.detach().cpu().numpy().astype(np.int8)
        scale = layer.weight_scale.detach().cpu().numpy().astype(np.float32)
        x_scale = np.float32(layer.act_scale_float)
        x_zero = layer.act_zero_point_int - 128  # the uint8 grid stored as int8
        matches = [
            p
            for p in products
            if p.weight.dtype == np.int8
            and p.weight.shape == q.shape
            and p.weight_axis == 0
            and np.array_equal(p.weight, q)
            and np.array_equal(np.broadcast_to(p.weight_scale, scale.shape), scale)
            and p.x_scale == x_scale
            and p.x_zero_point == x_zero
        ]
        what = f"quantized layer {name!r} ({layer.kind}, weight {tuple(q.shape)})"
        if not matches:
            raise RuntimeError(
                f"{what}: no Conv/Gemm/MatMul of the ONNX graph reads its stored int8 weights, "
                "per-channel scales and input grid, so the file would not be the measured model; "
                f"the {exporter} exporter wrote a form export_onnx does not recognise"
            )
        if layer.bias_bits != 32 or layer.bias is None or not bool(layer.bias.any()):
            continue  # a float bias, or an all-zero one an exporter may drop (adding 0 is exact)
        bias_int = layer.bias_int.detach().cpu().numpy()
        if not any(
            p.bias_int is not None and np.array_equal(p.bias_int, bias_int) for p in matches
        ):
            raise RuntimeError(
                f"{what}: its int32 bias is not in the ONNX graph on the accumulator grid "
                f"s_x * s_w[c]; the {exporter} exporter wrote the bias in a form export_onnx "
                "does not recognise"
            )


def export_onnx(
    qmodel: nn.Module,
    path: str | os.PathLike[str],
    example_input: torch.Tensor,
    *,
    exporter: str = "auto",
) -> Path:
    """Write ``qmodel`` (from ``quant.quantize``, 8-bit activations, <= 8-bit weights) as an
    ONNX QDQ graph to ``path`` (atomically) and return the path.

    ``example_input``: one input batch of the right shape (the batch axis is exported as dynamic).
    ``exporter``: "auto" (default), "torchscript" or "dynamo"; see the module docstring.
    The graph has one input "input" and one output "output" (the logits).
    """
    onnx = _require("onnx")
    if exporter not in ("auto", "torchscript", "dynamo"):
        raise ValueError(f"exporter must be 'auto', 'torchscript' or 'dynamo', got {exporter!r}")
    if not isinstance(example_input, torch.Tensor) or not example_input.is_floating_point():
        raise TypeError("example_input must be a float tensor batch, e.g. one batch of test images")
    layers = _check_exportable(qmodel)
    names = [name for name, _ in layers]
    data, used = _export_bytes(qmodel, names, example_input.detach().cpu().contiguous(), exporter)
    proto = onnx.load_from_string(data)
    fold_weight_quantizers(proto)
    quantize_bias_initializers(proto)
    _check_layers_written(quantized_products(proto.graph), layers, used)
    onnx.checker.check_model(proto)
    return atomic_write_bytes(path, proto.SerializeToString())


#: The element types of an ONNX model's input that quantcal feeds, as numpy dtypes.
ONNX_FLOAT_INPUTS = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
}


def onnx_fixed_batch(shape: Any) -> int | None:
    """The batch size an ONNX input of ``shape`` (onnxruntime's ``NodeArg.shape``: ints, names,
    None) was exported with, or None when the batch dimension is symbolic (any size)."""
    first = shape[0] if len(shape) else None
    return first if isinstance(first, int) and first > 0 else None


def run_onnx_session(session: Any, x: torch.Tensor, *, batch_size: int = 256) -> np.ndarray:
    """The session's first output on ``x`` fed in chunks, in the element type its input
    declares. A model exported with a fixed batch N gets chunks of exactly N: the last is padded
    with copies of its last image and the padded rows are dropped."""
    inp = session.get_inputs()[0]
    dtype = ONNX_FLOAT_INPUTS.get(inp.type, np.float32)
    fixed = onnx_fixed_batch(inp.shape)
    outs = []
    for chunk in x.split(fixed or batch_size):
        a = chunk.detach().cpu().contiguous().numpy().astype(dtype, copy=False)
        n = a.shape[0]
        if fixed is not None and n < fixed:
            a = np.concatenate([a, np.repeat(a[-1:], fixed - n, axis=0)])
        outs.append(np.asarray(session.run(None, {inp.name: a})[0])[:n])
    return np.concatenate(outs).astype(np.float32, copy=False)


def run_onnx(
    path: str | os.PathLike[str],
    x: torch.Tensor,
    *,
    batch_size: int = 256,
    optimize: bool = False,
) -> torch.Tensor:
    """Run an exported model with onnxruntime (CPU) on ``x``; returns float32 logits.

    ``optimize=False`` (default) runs the QDQ graph as written: onnxruntime's own QuantizeLinear
    (x / s, round half to even, saturate) and DequantizeLinear, then float conv/gemm -- an
    independent execution of the integer grid. ``optimize=True`` lets onnxruntime rewrite the
    graph (graph optimisation level "all", QDQ fusion into its integer kernels), which is what a
    deployment would run but adds the runtime's own approximations.

    ``x`` is fed in the element type the model's input declares (float32, float16 or float64),
    ``batch_size`` images at a time, or in chunks of N for a model exported with a fixed batch
    size N (the last chunk padded, the padded rows dropped).
    """
    ort = _require("onnxruntime")
    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return torch.from_numpy(run_onnx_session(session, x, batch_size=batch_size))
