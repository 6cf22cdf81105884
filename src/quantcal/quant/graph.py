"""The traced graph and the modules in it: which conv/linear layers quantize and in what order,
which computations stay fp32, and running batches through a graph with hooks or swapping one of
its modules for another.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "QUANTIZABLE",
    "batch_inputs",
    "device_of",
    "layer_order",
    "run_with_pre_hooks",
    "set_submodule",
    "unquantized_computations",
]

#: The leaf modules ``quantize`` replaces by quantized layers.
QUANTIZABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def batch_inputs(batches: Iterable[Any], what: str = "calib_batches") -> list[torch.Tensor]:
    """The input tensors of an iterable of tensors or ``(x, y, ...)`` tuples, as a list."""
    if isinstance(batches, torch.Tensor):
        raise TypeError(
            f"{what} must be an iterable of batches (tensors or (x, y) tuples), not one tensor; "
            f"wrap it in a list: [{what}]"
        )
    if batches is None or not isinstance(batches, Iterable):
        raise TypeError(f"{what} must be an iterable of tensors or (x, y) tuples, got {batches!r}")
    xs: list[torch.Tensor] = []
    for i, batch in enumerate(batches):
        x = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(
                f"{what}[{i}] must be a float tensor or an (x, y) tuple with a float tensor x, "
                f"got {type(x).__name__}"
            )
        if x.numel():
            xs.append(x)
    if not xs:
        raise ValueError(
            f"{what} is empty: range calibration needs at least one non-empty batch of inputs "
            "(e.g. splits.ptq_calib.batches(256))"
        )
    return xs


def device_of(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


#: Conv/linear computations that appear as function calls in a traced graph (functional code,
#: or a module subclass that fx traced through, such as a weight-standardized conv).
_FUNCTIONAL_LAYERS = {
    F.conv1d: "conv1d",  # the same objects as torch.conv1d, ...
    F.conv2d: "conv2d",
    F.conv3d: "conv3d",
    F.linear: "F.linear",
    F.conv_transpose1d: "conv_transpose1d",
    F.conv_transpose2d: "conv_transpose2d",
    F.conv_transpose3d: "conv_transpose3d",
    torch.matmul: "torch.matmul",
    operator.matmul: "@",
    torch.mm: "torch.mm",
    torch.addmm: "torch.addmm",
    torch.bmm: "torch.bmm",
    torch.einsum: "torch.einsum",
    torch.baddbmm: "torch.baddbmm",
    F.bilinear: "F.bilinear",
    F.scaled_dot_product_attention: "scaled_dot_product_attention",
}
_MATMUL_METHODS = ("matmul", "mm", "bmm", "addmm", "baddbmm", "__matmul__")
_UNSUPPORTED_MODULES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _scope(node: torch.fx.Node) -> str:
    """The innermost module whose ``forward`` made the call (fx records it), else the node's
    name."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return node.name
    path = list(stack.values())[-1]
    return str(path[0] if isinstance(path, tuple) else path) or node.name


def _weighted_leaf(module: nn.Module) -> bool:
    """A leaf module (one fx does not trace into, such as ``nn.MultiheadAttention`` or an
    ``nn.LSTM``) that multiplies by a weight matrix quantcal does not quantize."""
    if isinstance(module, (*QUANTIZABLE, nn.Embedding, nn.EmbeddingBag)):
        return False
    return isinstance(module, _UNSUPPORTED_MODULES) or any(
        p.dim() >= 2 for p in module.parameters()
    )


def unquantized_computations(gm: torch.fx.GraphModule) -> list[str]:
    """The conv/linear computations of a traced graph that ``quantize`` leaves in fp32, each as
    ``"owner (kind)"``: function calls on activations (see ``_FUNCTIONAL_LAYERS``; those with
    constant weights were already made modules by ``to_deploy``), transposed convs, and other
    leaf modules with weight matrices (attention, recurrent layers). Computations on constants
    alone (a weight's own standardization) are not layers and are not listed."""
    from quantcal.models.lift import constant_nodes, weight_owner

    constants = constant_nodes(gm)
    # blocks fx could not trace (``to_deploy``): their layers are quantized by module and what
    # they leave in fp32 is found at run time (``quant.fallback``, ``quant.runtime_count``)
    opaque = getattr(gm, "opaque_blocks", None) or {}
    out = []
    for node in gm.graph.nodes:
        if node in constants:
            continue
        # a product with a constant operand is named by that weight's module; a product of
        # two activations (attention) by the module whose forward computes it
        has_weight = any(n in constants for n in node.all_input_nodes)
        owner = (weight_owner(node) if has_weight else "") or _scope(node)
        if node.op == "call_function" and node.target in _FUNCTIONAL_LAYERS:
            out.append(f"{owner} ({_FUNCTIONAL_LAYERS[node.target]} call)")
        elif node.op == "call_method" and node.target in _MATMUL_METHODS:
            out.append(f"{owner} (.{node.target} call)")
        elif node.op == "call_module" and node.target not in opaque:
            module = gm.get_submodule(node.target)
            if _weighted_leaf(module):
                out.append(f"{node.target} ({type(module).__name__})")
    return out


def layer_order(gm: torch.fx.GraphModule) -> list[str]:
    """Names of the quantizable leaf modules, in graph (execution) order, each once."""
    names: list[str] = []
    for node in gm.graph.nodes:
        if (
            node.op == "call_module"
            and node.target not in names
            and isinstance(gm.get_submodule(node.target), QUANTIZABLE)
        ):
            names.append(str(node.target))
    return names


def run_with_pre_hooks(
    gm: nn.Module,
    modules: dict[str, nn.Module],
    hook_fn: Any,
    xs: list[torch.Tensor],
    *,
    outputs: bool = False,
    all_inputs: bool = False,
) -> None:
    """Run ``xs`` through ``gm`` (no grad) calling ``hook_fn(name, tensor)`` with each named
    module's input, with its output when ``outputs``, or ``hook_fn(name, *inputs)`` with all
    its inputs when ``all_inputs`` (a product's two operands)."""
    device = device_of(gm)

    def pre(name: str):
        if all_inputs:
            return lambda _m, args: hook_fn(name, *args)
        return lambda _m, args: hook_fn(name, args[0])

    handles = [
        module.register_forward_hook(lambda _m, _a, out, name=name: hook_fn(name, out))
        if outputs
        else module.register_forward_pre_hook(pre(name))
        for name, module in modules.items()
    ]
    try:
        with torch.no_grad():
            for x in xs:
                gm(x.to(device))
    finally:
        for h in handles:
            h.remove()


def set_submodule(root: nn.Module, target: str, module: nn.Module) -> None:
    parent_name, _, leaf = target.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, leaf, module)
