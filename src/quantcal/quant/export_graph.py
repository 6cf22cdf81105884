"""The ONNX graph passes of ``export_onnx``: integer weights, integer biases, and the check that
every quantized layer is in the graph as measured.

A quantized layer appears in an exported graph as a *quantized product*: a ``Conv``, ``Gemm`` or
``MatMul`` node whose activation input is a ``DequantizeLinear`` and whose weight input is a
``DequantizeLinear`` of a constant weight with per-output-channel scales. Two details of the
exporters' graphs are followed rather than assumed away:

- a ``Linear`` applied to tokens (a (B, N, C) input, as in every ViT, Swin or MLP-Mixer) is
  written ``Add(MatMul(x, Transpose(W)), b)``, not ``Gemm``: the weight is read through
  ``Transpose`` nodes (its channel axis moves with them) and the bias is the ``Add``'s constant
  operand;
- exporters merge equal constants into one initializer read through ``Identity`` nodes (two
  all-zero biases, the identical per-channel scales of copied weights) and the dynamo exporter
  merges identical ``DequantizeLinear`` nodes outright, so one weight dequantizer can feed
  several layers: constants are resolved through ``Identity`` and layers are matched to
  products by value, never counted.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "QuantizedProduct",
    "constant_arrays",
    "drop_unused_constants",
    "fold_weight_quantizers",
    "quantize_bias_initializers",
    "quantized_products",
]

_PRODUCTS = ("Conv", "Gemm", "MatMul")
_INT8, _INT32 = np.dtype(np.int8), np.dtype(np.int32)


def _onnx() -> Any:
    return importlib.import_module("onnx")  # export.py checks that it is installed


def constant_arrays(graph: Any) -> dict[str, np.ndarray]:
    """Every constant value of ``graph`` by name: initializers, ``Constant`` nodes, and the
    outputs of ``Identity`` nodes that read one (how exporters share a merged constant)."""
    numpy_helper = _onnx().numpy_helper
    arrays = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:  # ONNX graphs are topologically sorted: one pass follows chains
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            arrays[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        elif node.op_type == "Identity" and node.input[0] in arrays:
            arrays[node.output[0]] = arrays[node.input[0]]
    return arrays


def _producers(graph: Any) -> dict[str, Any]:
    return {out: node for node in graph.node for out in node.output}


def _attribute(node: Any, name: str, default: Any) -> Any:
    for a in node.attribute:
        if a.name == name:
            return list(a.ints) if a.ints else a.i
    return default


def fold_weight_quantizers(model: Any) -> int:
    """Replace ``QuantizeLinear(constant weight)`` by an int8 initializer; returns the count.

    Integers are ``clamp(round_half_even(W * float32(1 / s_c)), -128, 127)``, quantcal's own
    arithmetic (``primitives.quantize_per_channel``), so runtime and simulation share weights.
    The weight, scale and zero-point may be read through ``Identity`` nodes (merged constants).
    """
    numpy_helper = _onnx().numpy_helper
    graph = model.graph
    consts = constant_arrays(graph)
    taken = {init.name for init in graph.initializer}
    folded = 0
    for node in list(graph.node):
        if node.op_type != "QuantizeLinear" or len(node.input) < 3:
            continue
        if any(name not in consts for name in node.input[:3]):
            continue
        w = consts[node.input[0]].astype(np.float32)
        scale = consts[node.input[1]].astype(np.float32)
        zero = consts[node.input[2]]
        if zero.dtype != _INT8 or np.any(zero != 0):
            continue  # not a symmetric weight quantizer
        axis = _attribute(node, "axis", 1)
        shape = [1] * w.ndim
        if scale.ndim:
            shape[axis % w.ndim] = -1
        inv = (np.float32(1.0) / scale).reshape(shape).astype(np.float32)
        q = np.clip(np.rint(w * inv), -128, 127).astype(np.int8)
        name = f"{node.input[0]}_int8"
        while name in taken:  # two quantizers of one merged weight: one initializer each
            name += "_"
        taken.add(name)
        graph.initializer.append(numpy_helper.from_array(q, name=name))
        for other in graph.node:
            for i, inp in enumerate(other.input):
                if inp == node.output[0]:
                    other.input[i] = name
        graph.node.remove(node)
        folded += 1
    drop_unused_constants(graph)
    return folded


def drop_unused_constants(graph: Any) -> None:
    """Remove ``Identity``/``Constant`` nodes whose outputs nothing reads, then unused
    initializers (the float weights a fold replaced, and what only they read)."""
    outputs = {o.name for o in graph.output}
    while True:
        used = {inp for n in graph.node for inp in n.input} | outputs
        dead = [
            n
            for n in graph.node
            if n.op_type in ("Identity", "Constant") and not any(o in used for o in n.output)
        ]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    used = {inp for n in graph.node for inp in n.input} | outputs
    keep = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


@dataclass
class QuantizedProduct:
    """One ``Conv``/``Gemm``/``MatMul`` node of the graph computing a quantized layer.

    ``weight`` is the weight dequantizer's constant input as stored (int8 after the fold, with
    the output channels on ``weight_axis``), ``weight_scale`` its scales (1-D float32),
    ``x_scale`` / ``x_zero_point`` the input activation's grid, ``bias_at`` the (node, input
    index) where the layer's bias is read (the product itself for Conv/Gemm, the following
    ``Add`` for MatMul), None without one, and ``bias_int`` the int32 integers that slot
    dequantizes, None while it reads a float bias.
    """

    node: Any
    weight: np.ndarray
    weight_axis: int
    weight_scale: np.ndarray
    x_scale: np.float32
    x_zero_point: int
    bias_at: tuple[Any, int] | None
    bias_int: np.ndarray | None


def _weight_dequantizer(
    name: str, producers: dict[str, Any], consts: dict[str, np.ndarray]
) -> tuple[Any, int] | None:
    """The ``DequantizeLinear`` of a constant that ``name`` reads through ``Identity`` and
    ``Transpose`` nodes, and the axis its channel axis lands on at ``name``; None if none."""
    perms: list[list[int]] = []
    for _ in range(16):
        node = producers.get(name)
        if node is None:
            return None
        if node.op_type == "Identity":
            name = node.input[0]
        elif node.op_type == "Transpose":
            perms.append(_attribute(node, "perm", []))
            name = node.input[0]
        elif node.op_type == "DequantizeLinear":
            if node.input[0] not in consts or node.input[1] not in consts:
                return None
            ndim = consts[node.input[0]].ndim
            axis = _attribute(node, "axis", 1) % max(ndim, 1)
            for perm in reversed(perms):  # from the dequantizer towards the product
                perm = perm or list(range(ndim))[::-1]  # Transpose's default: reverse
                axis = perm.index(axis)
            return node, axis
        else:
            return None
    return None


def _expected_channel_axis(node: Any, weight_ndim: int) -> int:
    """Where a product reads its output channels in its weight input: Conv (O, I, ...) and
    Gemm with transB (O, I): 0; Gemm without it and MatMul (I, O): the last axis."""
    if node.op_type == "Conv" or (node.op_type == "Gemm" and _attribute(node, "transB", 0)):
        return 0
    return weight_ndim - 1


def _bias_slot(
    node: Any,
    out_channels: int,
    consumers: dict[str, list[Any]],
    producers: dict[str, Any],
    consts: dict[str, np.ndarray],
) -> tuple[Any, int] | None:
    """Where ``node`` reads its bias: its input 2 (Conv, Gemm), or for a MatMul the operand of
    its only consumer, an ``Add``, that is a constant (or dequantized int32 constant) vector of
    ``out_channels`` values; None if there is none."""
    if node.op_type != "MatMul":
        return (node, 2) if len(node.input) > 2 and node.input[2] else None
    users = consumers.get(node.output[0], [])
    if len(users) != 1 or users[0].op_type != "Add":
        return None
    add = users[0]
    for i, name in enumerate(add.input):
        if name != node.output[0]:
            value = consts.get(name)
            if value is None:
                value = _dequantized_int32(name, producers, consts)
            if value is not None and value.shape == (out_channels,):
                return add, i
    return None


def _dequantized_int32(
    name: str, producers: dict[str, Any], consts: dict[str, np.ndarray]
) -> np.ndarray | None:
    """The int32 constant that ``name`` dequantizes (an integer bias), else None."""
    dq = producers.get(name)
    if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in consts:
        return None
    q = consts[dq.input[0]]
    return q if q.dtype == _INT32 else None


def quantized_products(graph: Any) -> list[QuantizedProduct]:
    """Every quantized product of ``graph`` (see the module docstring), in graph order."""
    consts = constant_arrays(graph)
    producers = _producers(graph)
    consumers: dict[str, list[Any]] = {}
    for n in graph.node:
        for inp in n.input:
            consumers.setdefault(inp, []).append(n)
    found = []
    for node in graph.node:
        if node.op_type not in _PRODUCTS or len(node.input) < 2:
            continue
        x_dq = producers.get(node.input[0])
        if x_dq is None or x_dq.op_type != "DequantizeLinear" or x_dq.input[1] not in consts:
            continue
        w = _weight_dequantizer(node.input[1], producers, consts)
        if w is None:
            continue
        w_dq, axis = w
        weight = consts[w_dq.input[0]]
        scale = consts[w_dq.input[1]].astype(np.float32).reshape(-1)
        if weight.ndim < 2 or (node.op_type != "Conv" and weight.ndim != 2):
            continue
        if axis != _expected_channel_axis(node, weight.ndim):
            continue
        w_axis = _attribute(w_dq, "axis", 1) % weight.ndim
        out_channels = weight.shape[w_axis]
        if scale.size not in (1, out_channels):
            continue
        zero = consts.get(x_dq.input[2]) if len(x_dq.input) > 2 and x_dq.input[2] else None
        bias_at = _bias_slot(node, out_channels, consumers, producers, consts)
        found.append(
            QuantizedProduct(
                node=node,
                weight=weight,
                weight_axis=w_axis,
                weight_scale=scale,
                x_scale=np.float32(consts[x_dq.input[1]].reshape(())),
                x_zero_point=0 if zero is None else int(zero.reshape(())),
                bias_at=bias_at,
                bias_int=None
                if bias_at is None
                else _dequantized_int32(bias_at[0].input[bias_at[1]], producers, consts),
            )
        )
    return found


def quantize_bias_initializers(model: Any) -> int:
    """Store each quantized product's float bias as an int32 initializer behind a per-axis
    ``DequantizeLinear`` with scale ``float32(s_x) * s_w[c]`` (the QDQ form of integer biases);
    returns the count.

    The bias is the product's own (Conv, Gemm) or the constant operand of the ``Add`` after a
    ``MatMul`` (a Linear on tokens). It qualifies when it lies exactly on that grid
    (``QuantConfig.bias_bits=32``: ``float32(q) * s == b``); a float bias that does not
    (``bias_bits=None``) is left alone. Each product gets its own integers, also when the
    exporter merged equal biases into one initializer: their grids differ.
    """
    onnx = _onnx()
    numpy_helper = onnx.numpy_helper
    graph = model.graph
    consts = constant_arrays(graph)
    done = 0
    for product in quantized_products(graph):
        if product.bias_at is None:
            continue
        node, slot = product.bias_at
        bias_name = node.input[slot]
        bias = consts.get(bias_name)
        if bias is None or bias.dtype != np.float32 or bias.ndim != 1:
            continue
        w_scale = product.weight_scale
        if w_scale.size == 1:
            w_scale = np.repeat(w_scale, bias.size)
        if w_scale.shape != bias.shape:
            continue
        scale = (product.x_scale * w_scale).astype(np.float32)
        q = np.rint(bias.astype(np.float64) / scale.astype(np.float64))
        if np.abs(q).max(initial=0) > 2**31 - 1:
            continue
        if not np.array_equal(q.astype(np.float32) * scale, bias):
            continue  # a float bias off the grid: bias_bits=None
        stem = f"{bias_name}_int32_{done}"
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
        node.input[slot] = f"{stem}_dequantized"
        done += 1
    drop_unused_constants(graph)
    return done
