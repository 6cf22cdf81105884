"""How ``quantize`` handles products of two activations and the float operations around them.

``quantize_products(gm, config)`` runs before the layers of a deploy graph are listed: with
``QuantConfig.quantize_matmuls`` it decomposes attention (``quant.attention``: SDPA calls and
``nn.MultiheadAttention`` leaves become projections, products and a float softmax) and puts a
``QuantMatMul`` in place of every product of two activations (``quant.matmul``), so the
projections are listed as ordinary linear layers and the products are no longer "left in
fp32". ``calibrate_products`` sets the products' operand ranges once a method's layers are
installed: on the fp32 network (``fake_quant_disabled``; the ``ptq`` range setting, order
independent) or, with ``QuantConfig.sequential``, on the network with its layers quantized.
``float_computations`` names the softmax, LayerNorm and GELU computations, which stay in float
(as integer runtimes keep them: I-BERT and FQ-ViT approximate them separately).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import fx, nn

from quantcal.quant.attention import decompose_attention
from quantcal.quant.layers import fake_quant_disabled
from quantcal.quant.matmul import (
    QuantMatMul,
    matmul_modules,
    module_scope,
    observe_matmuls,
    record_clip_fractions,
    rewrite_matmuls,
)

if TYPE_CHECKING:
    from quantcal.quant.config import QuantConfig

__all__ = ["calibrate_products", "float_computations", "quantize_products"]

_FLOAT_FUNCTIONS = {
    F.softmax: "softmax",
    torch.softmax: "softmax",
    F.layer_norm: "layer_norm",
    F.gelu: "gelu",
}
_FLOAT_METHODS = {"softmax": "softmax"}
_FLOAT_MODULES = ((nn.Softmax, "softmax"), (nn.LayerNorm, "layer_norm"), (nn.GELU, "gelu"))


def quantize_products(gm: fx.GraphModule, config: QuantConfig) -> dict[str, QuantMatMul]:
    """With ``config.quantize_matmuls``: decompose attention and make every product of two
    activations of ``gm`` a ``QuantMatMul`` at ``config.product_bits`` (in place; the fp32 function
    is unchanged). Returns every ``QuantMatMul`` of ``gm`` by name; ``{}`` when off."""
    if not config.quantize_matmuls:
        return {}

    def make(op: str) -> QuantMatMul:
        return QuantMatMul(op, act_bits=config.product_bits, observer=config.observer)

    decompose_attention(gm, make)
    rewrite_matmuls(gm, make)
    return dict(matmul_modules(gm))


def calibrate_products(
    gm: fx.GraphModule, config: QuantConfig, xs: list[torch.Tensor]
) -> dict[str, QuantMatMul]:
    """Set the operand ranges of every ``QuantMatMul`` of ``gm`` (its layers installed) from
    the range-calibration batches ``xs`` (see the module docstring), except those whose
    quantization parameters a method set itself (``qparams_from_method``: ``qat``'s learned
    steps). Returns every product by name."""
    products = dict(matmul_modules(gm))
    todo = {n: m for n, m in products.items() if not m.qparams_from_method}
    kept = {n: m for n, m in products.items() if m.qparams_from_method}
    options = config.observer_options()
    with contextlib.nullcontext() if config.sequential else fake_quant_disabled(gm):
        if todo:
            observe_matmuls(gm, todo, xs, config.observer, options)
        if kept:  # a method's own steps: only how much of the operands they clip
            record_clip_fractions(gm, kept, xs)
    return products


def float_computations(gm: fx.GraphModule) -> list[str]:
    """The softmax, LayerNorm and GELU computations of ``gm``, each as ``"owner (kind)"``
    (owner: the module, or the module whose forward made the call): they stay in float."""
    out = []
    for node in gm.graph.nodes:
        kind = None
        if node.op == "call_function":
            kind = _FLOAT_FUNCTIONS.get(node.target)
        elif node.op == "call_method":
            kind = _FLOAT_METHODS.get(str(node.target))
        elif node.op == "call_module":
            module = gm.get_submodule(str(node.target))
            kind = next((k for cls, k in _FLOAT_MODULES if isinstance(module, cls)), None)
            if kind is not None:
                out.append(f"{node.target} ({kind})")
            continue
        if kind is not None:
            out.append(f"{module_scope(node) or node.name} ({kind})")
    return out
