"""Functional layers with constant weights become modules, so they can be folded and quantized.

Code that is traced through by ``torch.fx`` shows its conv, linear and BatchNorm computations as
function calls: a weight-standardized conv (``F.conv2d(x, standardize(self.weight), ...)``), a
library's ``Linear`` with its own ``forward``, ``x @ self.proj``, a fused BatchNorm + activation
module calling ``F.batch_norm``. In the deploy form the weights are constant, so each such call
whose input is an activation and whose weight, bias and statistics are computed from parameters
and buffers alone is *lifted*: the weight subgraph is evaluated once (the weight the layer really
computes with, after standardization, gains and so on) and the call is replaced by an
``nn.Conv*d``, ``nn.Linear`` or ``nn.BatchNorm*d`` module holding those constants. The result is
the same function; BatchNorm folding and quantization then treat them like any module.

A call is left as it is when any of this does not hold (a weight that depends on the input, as in
dynamic or conditional convs; a stride computed at run time; a BatchNorm in training mode or not
after a conv); ``quant.unquantized_computations`` and ``to_deploy`` name what is left.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

__all__ = ["constant_nodes", "lift_functional_layers", "weight_owner"]

# Positional parameter names of the functions lifted (torch.conv2d is F.conv2d, etc.).
_CONV_PARAMS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONVS = {F.conv1d: nn.Conv1d, F.conv2d: nn.Conv2d, F.conv3d: nn.Conv3d}
_LINEAR_PARAMS = ("input", "weight", "bias")
_MATMULS = (operator.matmul, torch.matmul, torch.mm)
_BN_PARAMS = {
    F.batch_norm: (
        "input",
        "running_mean",
        "running_var",
        "weight",
        "bias",
        "training",
        "momentum",
        "eps",
    ),
    torch.batch_norm: (
        "input",
        "weight",
        "bias",
        "running_mean",
        "running_var",
        "training",
        "momentum",
        "eps",
        "cudnn_enabled",
    ),
}
_BN_DEFAULTS = {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5}
_BN_FOR_CONV = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d, nn.Conv3d: nn.BatchNorm3d}


def _bind(node: fx.Node, names: tuple[str, ...], defaults: dict[str, Any]) -> dict[str, Any] | None:
    """The call's arguments by name (positional and keyword), or None for unknown keywords."""
    bound = dict(defaults)
    if len(node.args) > len(names):
        return None
    bound.update(zip(names, node.args))
    for key, value in node.kwargs.items():
        if key not in names:
            return None
        bound[key] = value
    return bound if all(n in bound for n in names if n not in defaults) else None


class _Constants:
    """Which nodes of a graph compute constants (depend on no graph input), and their values."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.nodes: set[fx.Node] = set()
        self.values: dict[fx.Node, Any] = {}
        for node in gm.graph.nodes:
            if node.op == "get_attr" or (
                node.op in ("call_function", "call_method", "call_module")
                and all(n in self.nodes for n in node.all_input_nodes)
            ):
                self.nodes.add(node)

    def is_constant(self, arg: Any) -> bool:
        """A node computing a constant tensor (plain values are not nodes; None is absent)."""
        return isinstance(arg, fx.Node) and arg in self.nodes

    def is_activation(self, arg: Any) -> bool:
        return isinstance(arg, fx.Node) and arg not in self.nodes

    def value(self, node: fx.Node) -> Any:
        """The node's value, evaluated once (no gradients)."""
        if node not in self.values:
            args = fx.node.map_arg(node.args, self.value)
            kwargs = fx.node.map_arg(node.kwargs, self.value)
            with torch.no_grad():
                if node.op == "get_attr":
                    out: Any = self.gm
                    for part in str(node.target).split("."):
                        out = getattr(out, part)
                elif node.op == "call_function":
                    out = node.target(*args, **kwargs)
                elif node.op == "call_method":
                    out = getattr(args[0], str(node.target))(*args[1:], **kwargs)
                else:
                    out = self.gm.get_submodule(str(node.target))(*args, **kwargs)
            self.values[node] = out
        return self.values[node]

    def tensor(self, arg: Any) -> torch.Tensor | None:
        """A detached copy of the constant tensor ``arg`` (None stays None)."""
        if arg is None:
            return None
        value = self.value(arg)
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{arg.name} is not a tensor")
        return value.detach().clone()


def constant_nodes(gm: fx.GraphModule) -> set[fx.Node]:
    """The nodes of ``gm`` whose values depend on no graph input (weight computations)."""
    return _Constants(gm).nodes


def _first_attribute(nodes: list[fx.Node]) -> str:
    """The first parameter or buffer among ``nodes``, followed back through the ops that compute
    them ("" when there is none)."""
    seen: set[fx.Node] = set()
    stack = list(nodes)
    while stack:
        n = stack.pop(0)
        if n in seen:
            continue
        seen.add(n)
        if n.op == "get_attr":
            return str(n.target)
        if n.op not in ("placeholder", "call_module"):
            stack.extend(n.all_input_nodes)
    return ""


def weight_owner(node: fx.Node) -> str:
    """The module owning the first parameter or buffer among the node's inputs (see
    ``_first_attribute``; "" when there is none)."""
    return _first_attribute(node.all_input_nodes).rpartition(".")[0]


def _lifted_name(weight: fx.Node) -> str:
    """Where a lifted layer goes: the module whose ``weight`` (or BatchNorm statistics) it
    computes with (``stem.conv``), or the parameter's own path when it has another name
    (``attn.q``)."""
    attribute = _first_attribute([weight])
    owner, _, leaf = attribute.rpartition(".")
    return owner if leaf in ("weight", "running_mean") else attribute


def _plain(*values: Any) -> bool:
    """True when no value is (or holds) a graph node: it is known when the graph is built."""
    found: list[fx.Node] = []
    fx.node.map_arg(values, found.append)
    return not found


def _conv_module(kind: type[nn.Module], call: dict[str, Any], c: _Constants) -> nn.Module:
    weight = c.tensor(call["weight"])
    bias = c.tensor(call["bias"])
    groups = int(call["groups"])
    layer = kind(
        weight.shape[1] * groups,
        weight.shape[0],
        tuple(weight.shape[2:]),
        stride=call["stride"],
        padding=call["padding"],
        dilation=call["dilation"],
        groups=groups,
        bias=bias is not None,
        device=weight.device,
        dtype=weight.dtype,
    )
    return _holding(layer, weight, bias)


def _linear_module(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    layer = nn.Linear(
        weight.shape[1],
        weight.shape[0],
        bias=bias is not None,
        device=weight.device,
        dtype=weight.dtype,
    )
    return _holding(layer, weight, bias)


def _holding(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """``layer`` with the given constant weight and bias (frozen)."""
    layer.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias, requires_grad=False)
    return layer


def _conv_call(node: fx.Node, c: _Constants) -> nn.Module | None:
    kind = _CONVS[node.target]
    defaults = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}
    call = _bind(node, _CONV_PARAMS, defaults)
    if call is None or not c.is_activation(call["input"]) or not c.is_constant(call["weight"]):
        return None
    if call["bias"] is not None and not c.is_constant(call["bias"]):
        return None
    if not _plain(call["stride"], call["padding"], call["dilation"], call["groups"]):
        return None
    return _conv_module(kind, call, c)


def _linear_call(node: fx.Node, c: _Constants) -> nn.Module | None:
    call = _bind(node, _LINEAR_PARAMS, {"bias": None})
    if call is None or not c.is_activation(call["input"]) or not c.is_constant(call["weight"]):
        return None
    if call["bias"] is not None and not c.is_constant(call["bias"]):
        return None
    weight = c.tensor(call["weight"])
    if weight.dim() != 2:
        return None
    return _linear_module(weight, c.tensor(call["bias"]))


def _matmul_call(node: fx.Node, c: _Constants) -> nn.Module | None:
    """``x @ W`` with an activation ``x`` and a constant 2-D ``W``: ``Linear`` with weight
    ``W.T``."""
    if len(node.args) != 2 or node.kwargs:
        return None
    x, w = node.args
    if not (c.is_activation(x) and c.is_constant(w)):
        return None
    weight = c.tensor(w)
    if weight.dim() != 2:
        return None
    return _linear_module(weight.t().contiguous(), None)


def _batch_norm_call(gm: fx.GraphModule, node: fx.Node, c: _Constants) -> nn.Module | None:
    """An eval-mode functional BatchNorm right after a conv module: the matching BN module."""
    call = _bind(node, _BN_PARAMS[node.target], {**_BN_DEFAULTS, "cudnn_enabled": True})
    if call is None or not c.is_activation(call["input"]) or call["training"] is not False:
        return None
    if not (c.is_constant(call["running_mean"]) and c.is_constant(call["running_var"])):
        return None
    for key in ("weight", "bias"):
        if call[key] is not None and not c.is_constant(call[key]):
            return None
    if not _plain(call["eps"]):
        return None
    src = call["input"]
    if src.op != "call_module":
        return None
    kind = next(
        (b for conv, b in _BN_FOR_CONV.items() if isinstance(gm.get_submodule(src.target), conv)),
        None,
    )
    if kind is None:
        return None
    mean = c.tensor(call["running_mean"])
    bn = kind(
        mean.shape[0],
        eps=float(call["eps"]),
        affine=True,
        device=mean.device,
        dtype=mean.dtype,
    ).eval()
    bn.running_mean.copy_(mean)
    bn.running_var.copy_(c.tensor(call["running_var"]))
    with torch.no_grad():
        weight, bias = c.tensor(call["weight"]), c.tensor(call["bias"])
        if weight is not None:
            bn.weight.copy_(weight)
        if bias is not None:
            bn.bias.copy_(bias)
    bn.requires_grad_(False)
    return bn


def _referenced(gm: fx.GraphModule, path: str) -> bool:
    """Whether any node of the graph uses the attribute ``path`` or something inside it."""
    for node in gm.graph.nodes:
        if node.op in ("get_attr", "call_module"):
            target = str(node.target)
            if target == path or target.startswith(path + ".") or path.startswith(target + "."):
                return True
    return False


def _place(gm: fx.GraphModule, owner: str, kind: str, module: nn.Module) -> str:
    """Register ``module`` at ``owner`` (see ``_lifted_name``) when nothing else of the graph
    uses that path any more, else as a new child of it (``owner.conv``, ``owner.conv_1``)."""
    if owner and not _referenced(gm, owner):
        _set(gm, owner, module)
        return owner
    parent = gm.get_submodule(owner) if owner else gm
    name, k = kind, 0
    while hasattr(parent, name):
        k += 1
        name = f"{kind}_{k}"
    parent.add_module(name, module)
    return f"{owner}.{name}" if owner else name


def _set(root: nn.Module, target: str, module: nn.Module) -> None:
    parent_name, _, leaf = target.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    if leaf in parent._parameters or leaf in parent._buffers:  # the parameter it replaces
        delattr(parent, leaf)
    setattr(parent, leaf, module)


def _weight_arg(node: fx.Node) -> fx.Node:
    """The node a lifted call takes its weight (or BatchNorm statistics) from."""
    if node.target in _BN_PARAMS:
        names = _BN_PARAMS[node.target]
        key = "running_mean"
    elif node.target in _MATMULS or node.op == "call_method":
        return node.args[1]
    else:
        names, key = (_CONV_PARAMS if node.target in _CONVS else _LINEAR_PARAMS), "weight"
    return _bind(node, names, {n: None for n in names})[key]


def _stage(gm: fx.GraphModule, stage: str) -> int:
    """One pass: find the calls to lift, replace each by a module call, drop the weight
    subgraphs they leave unused, then register each module where its weights lived."""
    c = _Constants(gm)
    lifted: list[tuple[fx.Node, str, str, nn.Module]] = []
    for node in list(gm.graph.nodes):
        module, kind = None, ""
        if stage == "layers" and node.op == "call_function":
            if node.target in _CONVS:
                module, kind = _conv_call(node, c), "conv"
            elif node.target is F.linear:
                module, kind = _linear_call(node, c), "linear"
            elif node.target in _MATMULS:
                module, kind = _matmul_call(node, c), "linear"
        elif stage == "layers" and node.op == "call_method" and node.target in ("matmul", "mm"):
            module, kind = _matmul_call(node, c), "linear"
        elif stage == "batchnorms" and node.op == "call_function" and node.target in _BN_PARAMS:
            module, kind = _batch_norm_call(gm, node, c), "bn"
        if module is None:
            continue
        owner = _lifted_name(_weight_arg(node))
        src = node.args[0] if node.args else node.kwargs["input"]
        temporary = f"_quantcal_lifted_{len(lifted)}"
        gm.add_module(temporary, module)
        with gm.graph.inserting_before(node):
            new = gm.graph.create_node(
                "call_module", temporary, (src,), {}, name=owner.replace(".", "_") or kind
            )
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        lifted.append((new, owner, kind, module))
    gm.graph.eliminate_dead_code()
    for new, *_ in lifted:
        delattr(gm, str(new.target))
    for new, owner, kind, module in lifted:
        new.target = _place(gm, owner, kind, module)
    return len(lifted)


def lift_functional_layers(gm: fx.GraphModule) -> int:
    """Lift, in place, every function-call conv, linear, matmul-by-a-constant and eval-mode
    BatchNorm-after-conv of ``gm`` whose weights are constants (see the module docstring);
    returns how many calls were lifted. ``gm`` must be in eval mode with frozen parameters:
    the lifted weights are snapshots."""
    # A BatchNorm is lifted once its conv is a module, so layers go first.
    lifted = _stage(gm, "layers") + _stage(gm, "batchnorms")
    if lifted:
        gm.delete_all_unused_submodules()
        gm.graph.lint()
        gm.recompile()
    return lifted
