"""Deploy form: what integer hardware would run (reparameterized branches, BatchNorm folded).

``to_deploy(model)`` returns an eval-mode copy in which

1. every submodule with a callable ``reparameterize()`` (MobileOne blocks; Vasu et al., CVPR 2023)
   is replaced, children first, by the single equivalent module it returns (or, when it
   returns None, kept as it rewrote itself in place), and
2. every BatchNorm whose input is the output of a conv layer used only by that
   BatchNorm is folded into that layer (Jacob et al., "Quantization and Training of Neural
   Networks for Efficient Integer-Arithmetic-Only Inference", CVPR 2018, §3.2):
   ``W' = W * gamma / sqrt(var + eps)``, ``b' = (b - mean) * gamma / sqrt(var + eps) + beta``.

Folding works on the ``torch.fx`` graph, so it is generic: any fx-traceable model, no
per-family code. A BatchNorm that cannot be folded stays and is named in a warning.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from quantcal.models.lift import lift_functional_layers

__all__ = ["fold_bn_weights", "to_deploy", "trace"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BNS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_BN_FOR_CONV = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d, nn.Conv3d: nn.BatchNorm3d}
_KEPT_ATTRIBUTE_TYPES = (int, float, str, bool, tuple, list, dict, type(None))


def fold_bn_weights(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float,
    gamma: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold an eval-mode BatchNorm into the preceding layer's (weight, bias).

    ``weight`` has the output channels on dim 0 (conv ``(C_out, C_in/g, *k)`` or linear
    ``(out, in)``). Computed in float64 and cast back to ``weight``'s dtype:
    ``W' = W * gamma / sqrt(var + eps)``, ``b' = (b - mean) * gamma / sqrt(var + eps) + beta``
    (a missing bias is 0, a missing gamma 1, a missing beta 0).
    """
    channels = weight.shape[0]
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if t.shape != (channels,):
            raise ValueError(
                f"{name} has shape {tuple(t.shape)} but the layer has {channels} output channels"
            )
    f64 = torch.float64
    mean, var = running_mean.detach().to(f64), running_var.detach().to(f64)
    g = torch.ones_like(mean) if gamma is None else gamma.detach().to(f64)
    b0 = torch.zeros_like(mean) if beta is None else beta.detach().to(f64)
    b = torch.zeros_like(mean) if bias is None else bias.detach().to(f64)
    factor = g / torch.sqrt(var + eps)
    shape = [-1] + [1] * (weight.dim() - 1)
    new_w = weight.detach().to(f64) * factor.reshape(shape)
    new_b = (b - mean) * factor + b0
    return new_w.to(weight.dtype), new_b.to(weight.dtype)


_LEAF_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


class _PathTracer(fx.Tracer):
    """A tracer that remembers which module it is inside, to name it when tracing fails."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[tuple[str, str]] = []

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        """torch's leaves, plus subclasses of a conv or linear layer (a library's own
        ``Linear``) that keep its ``forward``: they compute exactly that layer with the module's
        own weight, so they stay modules and get quantized as such. A subclass with its own
        ``forward`` (weight standardization, say) is traced through, and its functional call is
        named by ``quantize``."""
        for base in _LEAF_LAYERS:
            if isinstance(m, base) and type(m).forward is base.forward:
                return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        try:
            path = self.path_of_module(m)
        except NameError:  # a module that is not a registered submodule of the root
            path = f"<unregistered {type(m).__name__}>"
        self.stack.append((path, type(m).__name__))
        result = super().call_module(m, forward, args, kwargs)
        self.stack.pop()  # left in place when tracing fails, so the error can name the module
        return result


def trace(model: nn.Module) -> fx.GraphModule:
    """``torch.fx`` trace of ``model``; failure is a ValueError naming the failing module.

    The message names the innermost submodule being traced when the error happened (its path and
    class) and the usual fixes.
    """
    tracer = _PathTracer()
    try:
        graph = tracer.trace(model)
    except Exception as err:  # fx raises many types (TraceError, TypeError, RuntimeError, ...)
        where = (
            f"submodule {tracer.stack[-1][0]!r} ({tracer.stack[-1][1]})"
            if tracer.stack
            else f"the top-level module ({type(model).__name__})"
        )
        raise ValueError(
            f"torch.fx could not trace {type(model).__name__}: the error arose in {where}: "
            f"{type(err).__name__}: {err}. quantcal rewrites fx graphs, so the model must be "
            "symbolically traceable: make control flow independent of tensor values and shapes, "
            "or wrap the offending function with torch.fx.wrap (a leaf function)."
        ) from err
    name = type(model).__name__
    return fx.GraphModule(tracer.root, graph, class_name=name)


def _reparameterize(module: nn.Module) -> nn.Module:
    """Post-order replacement of every submodule with a callable ``reparameterize``.

    Two conventions are accepted: quantcal's, where ``reparameterize()`` returns the equivalent
    module, and the in-place one of the common public MobileOne, RepVGG, FastViT and RepGhost
    code, where it rewrites the module itself and returns None (the module is then kept)."""
    for name, child in list(module.named_children()):
        new_child = _reparameterize(child)
        if new_child is not child:
            setattr(module, name, new_child)
    fn = getattr(module, "reparameterize", None)
    if callable(fn):
        new = fn()
        if new is None:  # reparameterized in place
            return module.eval()
        if not isinstance(new, nn.Module):
            raise TypeError(
                f"{type(module).__name__}.reparameterize() must return an nn.Module or None "
                f"(in place), got {type(new).__name__}"
            )
        return new.eval()
    return module


def _single_module_call(gm: fx.GraphModule, target: str) -> bool:
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == target]
    return len(calls) == 1


def _foldable_producer(gm: fx.GraphModule, bn_node: fx.Node, bn: nn.Module) -> fx.Node | None:
    """The conv node feeding ``bn_node`` if the BN can be folded into it, else None."""
    if bn.running_mean is None or bn.running_var is None:
        return None  # eval mode uses batch statistics: nothing constant to fold
    if len(bn_node.args) != 1 or bn_node.kwargs:
        return None
    src = bn_node.args[0]
    if not isinstance(src, fx.Node) or src.op != "call_module":
        return None
    layer = gm.get_submodule(src.target)
    channels = bn.num_features
    if isinstance(layer, _CONVS):
        bn_type = next(b for c, b in _BN_FOR_CONV.items() if isinstance(layer, c))
        ok = isinstance(bn, bn_type) and layer.out_channels == channels
    else:  # Linear -> BatchNorm1d is not folded: BN1d's channel axis depends on the input rank
        return None
    if not ok or len(src.users) != 1 or not _single_module_call(gm, src.target):
        return None
    return src


def _fold_batchnorms(gm: fx.GraphModule) -> list[str]:
    """Fold every foldable BatchNorm in ``gm`` in place; returns the names of those left."""
    left: list[str] = []
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        bn = gm.get_submodule(node.target)
        if not isinstance(bn, _BNS):
            continue
        src = _foldable_producer(gm, node, bn)
        if src is None:
            left.append(str(node.target))
            continue
        layer = copy.deepcopy(gm.get_submodule(src.target))
        w, b = fold_bn_weights(
            layer.weight, layer.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
        )
        layer.weight = nn.Parameter(w, requires_grad=layer.weight.requires_grad)
        layer.bias = nn.Parameter(b, requires_grad=layer.weight.requires_grad)
        _set_submodule(gm, str(src.target), layer)
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        if not any(n.op == "call_module" and n.target == node.target for n in gm.graph.nodes):
            gm.delete_submodule(node.target)
    gm.graph.lint()
    gm.recompile()
    return left


def _set_submodule(root: nn.Module, target: str, module: nn.Module) -> None:
    parent_name, _, leaf = target.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, leaf, module)


def copy_public_attributes(source: nn.Module, dest: nn.Module) -> None:
    """Copy plain public attributes (``num_classes``, ``image_size``, ...) from source to dest."""
    for key, value in vars(source).items():
        if key.startswith("_") or key == "training" or hasattr(dest, key):
            continue
        if isinstance(value, _KEPT_ATTRIBUTE_TYPES):
            setattr(dest, key, copy.deepcopy(value))


def _functional_batchnorms(gm: fx.GraphModule) -> list[str]:
    """BatchNorms the graph computes as function calls (a fused BN + activation module that fx
    traced through, say), which are not folded: each named by the module owning its weights."""
    import torch.nn.functional as F

    from quantcal.models.lift import constant_nodes

    constants = constant_nodes(gm)
    out = []
    for node in gm.graph.nodes:
        if node in constants:  # part of a weight computation (weight standardization)
            continue
        if node.op == "call_function" and node.target in (F.batch_norm, torch.batch_norm):
            owner = next(
                (
                    str(n.target).rpartition(".")[0]
                    for n in node.all_input_nodes
                    if n.op == "get_attr"
                ),
                node.name,
            )
            out.append(f"{owner} (functional batch_norm)")
    return out


def to_deploy(model: nn.Module) -> nn.Module:
    """Eval-mode deploy copy of ``model``: branches reparameterized, BatchNorm folded.

    Returns a ``torch.fx.GraphModule`` that computes the same eval-mode function (up to float
    rounding), keeps plain attributes such as ``num_classes``, and leaves ``model`` untouched.
    A BatchNorm that does not directly follow a conv layer (whose output only it uses)
    stays, and a ``UserWarning`` names it. Raises ValueError when the model is not fx-traceable.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"to_deploy needs an nn.Module, got {type(model).__name__}")
    work = copy.deepcopy(model).eval()
    work = _reparameterize(work).eval()
    gm = trace(work)
    lift_functional_layers(gm)
    left = _fold_batchnorms(gm) + _functional_batchnorms(gm)
    if left:
        warnings.warn(
            f"to_deploy: {len(left)} BatchNorm layer(s) could not be folded (not directly after a "
            f"conv layer whose output only they use, or without running statistics): "
            f"{', '.join(left)}. They stay as separate layers in the deploy form.",
            UserWarning,
            stacklevel=2,
        )
    copy_public_attributes(model, gm)
    return gm.eval()
