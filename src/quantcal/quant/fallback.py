"""Layers quantized "by module": the conv/linear modules inside blocks torch.fx could not trace.

``models.to_deploy`` keeps each block fx cannot trace (data-dependent control flow, shapes read
in Python) as one opaque leaf module of the deploy graph and records it in the graph's
``opaque_blocks``. The rest of the network is traced and quantized as usual; inside such a
block, as eager-mode toolkits do, every ``nn.Conv*``/``nn.Linear`` submodule whose forward is
the plain layer is swapped for a ``QuantConv``/``QuantLinear`` (``set_submodule`` takes the
dotted path inside the block), its input range observed by a forward pre-hook on the fp32
model during range calibration: the same observers, the same layer classes.

A block that is itself a conv whose ``forward`` pads its input for TF "same" from the input
size (``timm.layers.Conv2dSame``; ``models.opaque.conv_form`` checks it on probe inputs)
becomes a :class:`QuantConvSame`, which fake-quantizes the input and then pads it with zeros
exactly as the module does: the value 0 always lies on the activation grid (the range is
widened to contain it), so padding before or after the fake-quant gives the same tensor, and
the observer sees the unpadded input as it does for a conv's static zero padding.

Everything else inside a block (attention matmuls, weights used through ``F.linear``, a conv
subclass with its own arithmetic) runs in fp32 and is named by the run-time count
(``quant.runtime_count``); the layers quantized by module are listed in the model's
``quant_coverage["by_module"]``. BatchNorms inside a block are not folded (``to_deploy`` says
so). ``ptq`` observes them like any layer; ``qat`` fine-tunes them like any layer (a
BatchNorm left inside a block trains in train mode then, as any unfolded BatchNorm does).
Methods that run the graph node by node (``QuantConfig(sequential=True)``, ``cle_bc``'s bias
correction, ``adaround``) cannot reach layers inside a block and refuse such models; a
same-padding conv that is itself the block is a graph node, which they reach.
"""

from __future__ import annotations

import warnings

import torch
from torch import fx, nn

from quantcal.models.opaque import conv_form, pad_same
from quantcal.quant.graph import QUANTIZABLE, layer_order
from quantcal.quant.layers import QuantConv, QuantizedLayer, QuantLinear

__all__ = [
    "QuantConvSame",
    "layer_class",
    "layers_by_module",
    "sequential_refusal",
    "warn_by_module",
]


class QuantConvSame(QuantConv):
    """``QuantConv`` with TF "same" padding computed from each input's size
    (``timm.layers.Conv2dSame``): the fake-quantized input is zero-padded, then convolved with
    padding 0. Exact with fake quant disabled; 0 is on the input grid, so the padding commutes
    with the input's fake-quant."""

    def layer_op(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        x = pad_same(x, self.kernel_size, self.stride, self.dilation)
        return self._conv(x, weight, bias, self.stride, 0, self.dilation, self.groups)


def layer_class(module: nn.Module) -> type[QuantizedLayer]:
    """The quantized layer class for an fp32 conv/linear module."""
    if isinstance(module, nn.Linear):
        return QuantLinear
    return QuantConvSame if conv_form(module) == "same" else QuantConv


def layers_by_module(gm: fx.GraphModule) -> tuple[list[str], dict[str, str]]:
    """The quantizable layers of a deploy graph in graph order, and those quantized by module.

    Without opaque blocks this is ``layer_order(gm)`` and ``{}``. Each opaque block
    (``gm.opaque_blocks``) contributes, at its place in the graph, the conv/linear modules
    inside it (in module order) that compute the plain layer or a "same"-padded conv
    (``conv_form``), or itself when it is such a conv; ``{name: block}`` names the block of each.
    """
    blocks = getattr(gm, "opaque_blocks", None) or {}
    graph_layers = layer_order(gm)
    if not blocks:
        return graph_layers, {}
    names: list[str] = []
    by_module: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        target = str(node.target)
        if target in blocks:
            block = gm.get_submodule(target)
            inside = list(block.named_modules(prefix=target))
            for name, module in inside if isinstance(block, QUANTIZABLE) else inside[1:]:
                if name not in names and conv_form(module) is not None:
                    names.append(name)
                    by_module[name] = target
        elif target in graph_layers and target not in names:
            names.append(target)
    return names, by_module


def warn_by_module(by_module: dict[str, str], stacklevel: int = 4) -> None:
    """Name the layers quantized by module, per block, in a ``UserWarning``."""
    if not by_module:
        return
    per_block: dict[str, list[str]] = {}
    for name, block in by_module.items():
        per_block.setdefault(block, []).append(name)
    listed = "; ".join(
        f"{block} (the block is the layer)"
        if names == [block]
        else f"{block}: {', '.join(n.removeprefix(block + '.') for n in names)}"
        for block, names in per_block.items()
    )
    warnings.warn(
        f"quantize: {len(by_module)} conv/linear layer(s) quantized by module inside "
        f"{len(per_block)} block(s) torch.fx could not trace (input ranges observed at the "
        f"module): {listed}",
        UserWarning,
        stacklevel=stacklevel,
    )


def sequential_refusal(gm: fx.GraphModule, names: list[str]) -> ValueError | None:
    """The error for a node-by-node pass over a graph whose layers include some it cannot
    reach (quantized by module inside an opaque block), else None."""
    called = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    inside = [n for n in names if n not in called]
    if not inside:
        return None
    blocks = sorted({b for b in (getattr(gm, "opaque_blocks", None) or {}) if b})
    return ValueError(
        f"this quantization needs each layer's inputs in graph order (QuantConfig("
        f"sequential=True), cle_bc's bias correction, adaround), but {len(inside)} layer(s) are "
        f"quantized by module inside block(s) torch.fx could not trace ({', '.join(blocks)}), "
        f"e.g. {', '.join(inside[:3])}: use method 'ptq' without sequential=True (or qat), or "
        "make the blocks traceable"
    )
