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
    """

    def __init__(self, layer: QuantizedLayer, decomposed: bool) -> None:
        super().__init__()
        self.layer = layer
        self.decomposed = decomposed
        if decomposed:  # the layer's stored integers, as they are
            self.register_buffer("weight_int8", layer.weight_int.to(torch.int8))
            q = self.weight_int8
            zero = torch.zeros(q.shape[0], dtype=torch.int64, device=q.device)
            self.register_buffer("weight_zero_point", zero)

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


def _check_exportable(qmodel: nn.Module) -> list[tuple[str, QuantizedLayer]]:
    layers = quantized_layers(qmodel)
    if not layers:
        raise ValueError(
            "export_onnx needs a model returned by quant.quantize with a quantized precision "
            f"(e.g. 'W8A8'); {type(qmodel).__name__} has no quantized layers"
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
    model = copy.deepcopy(qmodel).cpu().eval()
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, _QDQLayer(model.get_submodule(name), decomposed))
    return model


def _export_bytes(
    qmodel: nn.Module, names: list[str], example: torch.Tensor, exporter: str
) -> bytes:
    """The ONNX bytes of ``qmodel`` with a dynamic batch axis, by the chosen torch exporter."""
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
            return buf.getvalue()
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
        return program.model_proto.SerializeToString()


def _constant_arrays(graph: Any, numpy_helper: Any) -> dict[str, np.ndarray]:
    arrays = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            arrays[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return arrays


def _fold_weight_quantizers(model: Any) -> int:
    """Replace ``QuantizeLinear(constant weight)`` by an int8 initializer; returns the count.

    Integers are ``clamp(round_half_even(W * float32(1 / s_c)), -128, 127)``, quantcal's own
    arithmetic (``primitives.quantize_per_channel``), so runtime and simulation share weights.
    """
    numpy_helper = _require("onnx").numpy_helper
    graph = model.graph
    consts = _constant_arrays(graph, numpy_helper)
    init_names = {init.name for init in graph.initializer}
    folded = 0
    for node in list(graph.node):
        if node.op_type != "QuantizeLinear" or node.input[0] not in init_names:
            continue
        if len(node.input) < 3 or node.input[1] not in consts or node.input[2] not in consts:
            continue
        w = consts[node.input[0]].astype(np.float32)
        scale = consts[node.input[1]].astype(np.float32)
        zero = consts[node.input[2]]
        if zero.dtype != np.int8 or np.any(zero != 0):
            continue  # not a symmetric weight quantizer
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        shape = [1] * w.ndim
        if scale.ndim:
            shape[axis % w.ndim] = -1
        inv = (np.float32(1.0) / scale).reshape(shape).astype(np.float32)
        q = np.clip(np.rint(w * inv), -128, 127).astype(np.int8)
        name = f"{node.input[0]}_int8"
        graph.initializer.append(numpy_helper.from_array(q, name=name))
        for other in graph.node:
            for i, inp in enumerate(other.input):
                if inp == node.output[0]:
                    other.input[i] = name
        graph.node.remove(node)
        folded += 1
    _drop_unused_initializers(graph)
    return folded


def _drop_unused_initializers(graph: Any) -> None:
    used = {inp for n in graph.node for inp in n.input} | {o.name for o in graph.output}
    keep = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def _producers(graph: Any) -> dict[str, Any]:
    return {out: node for node in graph.node for out in node.output}


def _quantize_bias_initializers(model: Any) -> int:
    """Store each quantized Conv/Gemm bias as an int32 initializer behind a per-axis
    ``DequantizeLinear`` with scale ``float32(s_x) * s_w[c]`` (the QDQ form of integer biases);
    returns the count.

    A layer qualifies when its input and weight come from ``DequantizeLinear`` nodes with
    constant scales and its float bias lies exactly on that grid (``QuantConfig.bias_bits=32``:
    ``float32(q) * s == b``); a float bias that does not (``bias_bits=None``) is left alone.
    """
    onnx = _require("onnx")
    numpy_helper = onnx.numpy_helper
    graph = model.graph
    consts = _constant_arrays(graph, numpy_helper)
    inits = {init.name: init for init in graph.initializer}
    producers = _producers(graph)
    done = 0
    for node in list(graph.node):
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3:
            continue
        x_dq, w_dq = producers.get(node.input[0]), producers.get(node.input[1])
        # The exporter may merge equal constants (e.g. two all-zero biases) into one initializer
        # read through Identity nodes: follow them to the initializer.
        bias_name = node.input[2]
        seen = 0
        while bias_name not in inits and seen < 8:
            p = producers.get(bias_name)
            if p is None or p.op_type != "Identity":
                break
            bias_name, seen = p.input[0], seen + 1
        if bias_name not in inits or x_dq is None or w_dq is None:
            continue
        if x_dq.op_type != "DequantizeLinear" or w_dq.op_type != "DequantizeLinear":
            continue
        if x_dq.input[1] not in consts or w_dq.input[1] not in consts:
            continue
        bias = numpy_helper.to_array(inits[bias_name])
        if bias.dtype != np.float32 or bias.ndim != 1:
            continue
        x_scale = np.float32(consts[x_dq.input[1]].reshape(()))
        w_scale = consts[w_dq.input[1]].astype(np.float32).reshape(-1)
        if w_scale.size == 1:
            w_scale = np.repeat(w_scale, bias.size)
        if w_scale.shape != bias.shape:
            continue
        scale = (x_scale * w_scale).astype(np.float32)
        q = np.rint(bias.astype(np.float64) / scale.astype(np.float64))
        if np.abs(q).max(initial=0) > 2**31 - 1:
            continue
        if not np.array_equal(q.astype(np.float32) * scale, bias):
            continue  # a float bias off the grid: bias_bits=None
        stem = f"{bias_name}_int32_{done}"  # one per layer: a merged bias has several scales
        graph.initializer.append(numpy_helper.from_array(q.astype(np.int32), name=stem))
        graph.initializer.append(numpy_helper.from_array(scale, name=f"{stem}_scale"))
        graph.initializer.append(
            numpy_helper.from_array(np.zeros(bias.shape, np.int32), name=f"{stem}_zero_point")
        )
        dq = onnx.helper.make_node(
            "DequantizeLinear",
            [stem, f"{stem}_scale", f"{stem}_zero_point"],
            [f"{stem}_dequantized"],
            name=f"{stem}_DequantizeLinear",
            axis=0,
        )
        graph.node.insert(list(graph.node).index(node), dq)
        node.input[2] = f"{stem}_dequantized"
        done += 1
    _drop_unused_initializers(graph)
    return done


def _count_int8_weight_dequantizers(model: Any) -> int:
    int8 = {i.name for i in model.graph.initializer if i.data_type == 3}  # TensorProto.INT8
    return sum(n.op_type == "DequantizeLinear" and n.input[0] in int8 for n in model.graph.node)


def _check_stored_weights(model: Any, layers: list[QuantizedLayer]) -> None:
    """Every layer's stored integer weights are one of the graph's int8 weight initializers,
    exactly (what was measured is what was written)."""
    numpy_helper = _require("onnx").numpy_helper
    written: dict[tuple[int, ...], list[np.ndarray]] = {}
    for init in model.graph.initializer:
        if init.data_type == 3:  # INT8
            arr = numpy_helper.to_array(init)
            written.setdefault(tuple(arr.shape), []).append(arr)
    for i, layer in enumerate(layers):
        q = layer.weight_int.detach().cpu().numpy().astype(np.int8)
        if not any(np.array_equal(q, w) for w in written.get(tuple(q.shape), [])):
            raise RuntimeError(
                f"quantized layer {i} ({layer.kind}, weight {tuple(q.shape)}): its stored integer "
                "weights are not in the ONNX graph; the export would not be the measured model"
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
    names = [name for name, _ in _check_exportable(qmodel)]
    data = _export_bytes(qmodel, names, example_input.detach().cpu().contiguous(), exporter)
    proto = onnx.load_from_string(data)
    _fold_weight_quantizers(proto)
    int32_biases = _quantize_bias_initializers(proto)
    with_bias = [
        layer
        for _, layer in quantized_layers(qmodel)
        if layer.bias is not None and layer.bias_bits == 32
    ]
    expected_biases = len(with_bias)
    # an exporter may drop an all-zero bias (adding nothing is exact): fewer int32 biases then
    zero = sum(not bool(layer.bias.any()) for layer in with_bias)
    if not expected_biases - zero <= int32_biases <= expected_biases:
        raise RuntimeError(
            f"the ONNX graph has {int32_biases} int32 biases for {expected_biases} quantized "
            "layers with int32 biases; the exporter's graph changed (try exporter='torchscript' "
            "or exporter='dynamo')"
        )
    int8_weights = _count_int8_weight_dequantizers(proto)
    if int8_weights != len(names):
        raise RuntimeError(
            f"the ONNX graph has {int8_weights} int8 weight DequantizeLinear nodes for "
            f"{len(names)} quantized layers; the exporter's Q/DQ translation changed "
            "(try exporter='torchscript' or exporter='dynamo')"
        )
    _check_stored_weights(proto, [layer for _, layer in quantized_layers(qmodel)])
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
