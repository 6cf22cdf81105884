"""Deploy form: what integer hardware would run (reparameterized branches, BatchNorm folded).

``to_deploy(model)`` returns an eval-mode copy in which

1. every block with a deploy-form method (``fuse``, ``reparameterize`` or ``switch_to_deploy``;
   MobileOne, Vasu et al., CVPR 2023; RepVGG, Ding et al., CVPR 2021) is converted, parents
   before children as ``timm.models.reparameterize_model`` does, whether the method returns the
   equivalent module or rewrites the block in place and returns None; or a user's helper does it;
2. conv, linear and BatchNorm function calls whose weights are constants become modules
   (``quantcal.models.lift``: weight-standardized convs, fused BN + activation modules), and
3. every BatchNorm whose input is the output of a conv layer used only by that
   BatchNorm is folded into that layer (Jacob et al., "Quantization and Training of Neural
   Networks for Efficient Integer-Arithmetic-Only Inference", CVPR 2018, §3.2):
   ``W' = W * gamma / sqrt(var + eps)``, ``b' = (b - mean) * gamma / sqrt(var + eps) + beta``.

Folding works on the ``torch.fx`` graph, so it is generic: any fx-traceable model, no
per-family code. A BatchNorm that cannot be folded stays and is named in a warning.
"""

from __future__ import annotations

import copy
import inspect
import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from quantcal.models.lift import lift_functional_layers
from quantcal.models.opaque import conv_form, opaque_notes

__all__ = [
    "DEPLOY_CHECK_RTOL",
    "REPARAMETERIZE_METHODS",
    "fold_bn_weights",
    "to_deploy",
    "trace",
    "trace_opaque",
]

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

    def __init__(self, leaves: set[int] | None = None) -> None:
        super().__init__()
        self.stack: list[tuple[str, str]] = []
        self.modules_stack: list[nn.Module] = []  # the modules of ``stack``
        self.leaves = leaves or set()  # ids of blocks kept opaque (``trace_opaque``)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        """torch's leaves, plus subclasses of a conv or linear layer (a library's own
        ``Linear``) that keep its ``forward``: they compute exactly that layer with the module's
        own weight, so they stay modules and get quantized as such. A subclass with its own
        ``forward`` (weight standardization, say) is traced through, and its functional call is
        named by ``quantize``. The blocks in ``leaves`` are leaves too (``trace_opaque``)."""
        if id(m) in self.leaves:
            return True
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
        self.modules_stack.append(m)
        result = super().call_module(m, forward, args, kwargs)
        self.stack.pop()  # left in place when tracing fails, so the error can name the module
        self.modules_stack.pop()
        return result


def _fixed_defaults(model: nn.Module) -> dict[str, Any]:
    """The forward's optional arguments with constant defaults (``attn_mask=None``,
    ``is_causal=False``), traced as those constants: quantcal calls every graph with the input
    batch alone, so a mask or flag the model may take is fixed at its default (timm's ViTs take
    both), and no decomposition has to handle a value computed at run time."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    return {
        p.name: p.default
        for p in params[1:]
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        and p.default is not p.empty
        and (p.default is None or isinstance(p.default, (bool, int, float, str)))
    }


def trace(model: nn.Module) -> fx.GraphModule:
    """``torch.fx`` trace of ``model``; failure is a ValueError naming the failing module.

    The message names the innermost submodule being traced when the error happened (its path and
    class) and the usual fixes.
    """
    tracer = _PathTracer()
    try:
        graph = tracer.trace(model, concrete_args=_fixed_defaults(model) or None)
    except Exception as err:  # fx raises many types (TraceError, TypeError, RuntimeError, ...)
        raise _trace_error(model, tracer, err) from err
    name = type(model).__name__
    return fx.GraphModule(tracer.root, graph, class_name=name)


def _trace_error(model: nn.Module, tracer: _PathTracer, err: Exception) -> ValueError:
    """The ValueError of a failed trace, naming the innermost module being traced."""
    where = (
        f"submodule {tracer.stack[-1][0]!r} ({tracer.stack[-1][1]})"
        if tracer.stack
        else f"the top-level module ({type(model).__name__})"
    )
    return ValueError(
        f"torch.fx could not trace {type(model).__name__}: the error arose in {where}: "
        f"{type(err).__name__}: {err}. quantcal rewrites fx graphs, so the model must be "
        "symbolically traceable: make control flow independent of tensor values and shapes, "
        "or wrap the offending function with torch.fx.wrap (a leaf function) and call every "
        "conv and linear module outside it: quantize cannot quantize what runs inside a "
        "wrapped function (it names those computations as left in fp32)."
    )


def trace_opaque(model: nn.Module) -> tuple[fx.GraphModule, dict[str, str]]:
    """``trace``, keeping each block fx cannot trace as one opaque leaf module: when a trace
    fails inside a registered submodule, that innermost block becomes a leaf and the trace
    starts over, until it succeeds. Returns the graph and ``{block path: "Class: error"}`` (in
    the order found; empty when the model traces). A failure in the top-level module, in an
    unregistered module or at a leaf raises ``trace``'s ValueError."""
    leaves: dict[int, tuple[str, str]] = {}
    while True:
        tracer = _PathTracer(set(leaves))
        try:
            graph = tracer.trace(model, concrete_args=_fixed_defaults(model) or None)
            break
        except Exception as err:  # fx raises many types (TraceError, TypeError, RuntimeError, ...)
            block = tracer.modules_stack[-1] if tracer.modules_stack else None
            path = tracer.stack[-1][0] if tracer.stack else ""
            if block is None or id(block) in leaves or path.startswith("<unregistered"):
                raise _trace_error(model, tracer, err) from err
            leaves[id(block)] = (path, f"{type(block).__name__}: {type(err).__name__}: {err}")
    gm = fx.GraphModule(tracer.root, graph, class_name=type(model).__name__)
    called = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    # a block found early may sit inside one found later: only the outermost stay leaves
    return gm, {path: why for path, why in leaves.values() if path in called}


#: Methods that turn a training-form block into its deploy form, in the order they are tried:
#: quantcal's and timm's ``reparameterize`` (MobileOne, RepVGG/byobnet, FastViT, RepGhost), the
#: original RepVGG / RepGhost code's ``switch_to_deploy``, and ``fuse`` (LeViT-style conv+BN
#: pairs), the same names as ``timm.models.reparameterize_model``.
REPARAMETERIZE_METHODS = ("fuse", "reparameterize", "switch_to_deploy")


def _deploy_method(module: nn.Module) -> tuple[str, Any] | None:
    """The module's deploy-form method (see ``REPARAMETERIZE_METHODS``), if it takes no
    required arguments."""
    for name in REPARAMETERIZE_METHODS:
        fn = getattr(module, name, None)
        if not callable(fn) or isinstance(fn, nn.Module):
            continue
        try:
            required = [
                p
                for p in inspect.signature(fn).parameters.values()
                if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
            ]
        except (TypeError, ValueError):
            continue
        if not required:
            return name, fn
    return None


def _apply_deploy_method(module: nn.Module, name: str, fn: Any) -> nn.Module:
    """Call it: a returned module replaces ``module``; None means it rewrote itself in place."""
    new = fn()
    if new is None:
        return module.eval()
    if not isinstance(new, nn.Module):
        raise TypeError(
            f"{type(module).__name__}.{name}() must return an nn.Module or None (in place), "
            f"got {type(new).__name__}"
        )
    return new.eval()


def _reparameterize(module: nn.Module) -> nn.Module:
    """Replace every block that has a deploy-form method by its deploy form.

    The walk is the one of ``timm.models.reparameterize_model``: a module with a method is
    converted before its children are visited (the method may read its branches), then the
    walk goes on inside what it became. Both conventions are accepted: the method returns the
    equivalent module (quantcal's MobileOne, LeViT's ``fuse``), or rewrites the module in place
    and returns None (the public MobileOne, RepVGG, FastViT and RepGhost code)."""
    found = _deploy_method(module)
    if found is not None:
        module = _apply_deploy_method(module, *found)
    for name, child in list(module.named_children()):
        new_child = _reparameterize(child)
        if new_child is not child:
            setattr(module, name, new_child)
    return module


def _single_module_call(gm: fx.GraphModule, target: str) -> bool:
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == target]
    return len(calls) == 1


#: Reads of a tensor that depend on its shape, dtype or device only, never on its values
#: (timm's ``BatchNormAct2d`` asserts ``x.ndim == 4`` on the conv output it normalises).
_METADATA_ATTRIBUTES = ("ndim", "shape", "dtype", "device", "is_cuda")
_METADATA_METHODS = ("size", "dim", "ndimension", "numel")


def _value_users(node: fx.Node) -> list[fx.Node]:
    """The users of ``node`` that read its values: folding a BatchNorm into the conv changes
    the conv's values, not its shape, so shape-only readers may keep reading it."""
    import operator

    out = []
    for user in node.users:
        if (
            user.op == "call_function"
            and user.target in (getattr, operator.attrgetter)
            and len(user.args) > 1
            and user.args[1] in _METADATA_ATTRIBUTES
        ):
            continue
        if user.op == "call_method" and user.target in _METADATA_METHODS:
            continue
        out.append(user)
    return out


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
    if isinstance(layer, _CONVS) and conv_form(layer) not in ("plain", "same"):
        return None  # an opaque conv subclass (weight standardization, ...): its own function
    if isinstance(layer, _CONVS):
        bn_type = next(b for c, b in _BN_FOR_CONV.items() if isinstance(layer, c))
        ok = isinstance(bn, bn_type) and layer.out_channels == channels
    else:  # Linear -> BatchNorm1d is not folded: BN1d's channel axis depends on the input rank
        return None
    if not ok or len(_value_users(src)) != 1 or not _single_module_call(gm, src.target):
        return None
    if _parameters_read(gm, (str(src.target), str(bn_node.target))):
        return None  # folding would change what that direct read sees
    return src


def _parameters_read(gm: fx.GraphModule, modules: tuple[str, ...]) -> bool:
    """Whether the graph reads a parameter or buffer of one of ``modules`` directly (a
    ``get_attr`` node, e.g. ``self.conv.weight`` in a forward)."""
    prefixes = tuple(m + "." for m in modules)
    return any(n.op == "get_attr" and str(n.target).startswith(prefixes) for n in gm.graph.nodes)


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


#: Relative tolerance of the deploy check: ``max |deploy(x) - model(x)|`` over
#: ``max |model(x)|``. Folding in float64 and casting back leaves ~1e-6 on deep float32 nets; a
#: wrong reparameterization or fold is off by far more.
DEPLOY_CHECK_RTOL = 1e-3


def _max_diff(reference: torch.Tensor, out: Any) -> float:
    if not isinstance(out, torch.Tensor) or out.shape != reference.shape:
        return math.inf
    return float((out.double() - reference.double()).abs().max()) if out.numel() else 0.0


def _smallest_variances(unfolded: nn.Module, k: int = 3) -> str:
    """The BatchNorms with the smallest running variance (the ill-conditioned folds first)."""
    found = [
        (float(m.running_var.min()), name, float(m.eps))
        for name, m in unfolded.named_modules()
        if isinstance(m, _BNS) and getattr(m, "running_var", None) is not None
    ]
    found.sort()
    return ", ".join(f"{name} (running variance {v:.3g}, eps {e:.3g})" for v, name, e in found[:k])


def _check_equivalent(
    reference: Any, gm: nn.Module, x: torch.Tensor, unfolded: nn.Module | None = None
) -> dict[str, float] | None:
    """Compare the deploy graph's output on ``x`` with the model's; warn when they differ,
    naming the step that changed them: the BatchNorm fold when the graph before folding
    (``unfolded``) still computes the model's function, else the re-parameterization."""
    with torch.no_grad():
        out = gm(x)
    if not (isinstance(reference, torch.Tensor) and isinstance(out, torch.Tensor)):
        return None
    diff = _max_diff(reference, out)
    scale = float(reference.abs().max()) if reference.numel() else 0.0
    result = {"max_abs_diff": diff, "max_abs_output": scale}
    tolerance = DEPLOY_CHECK_RTOL * max(scale, 1e-12)
    if not diff <= tolerance:
        before_fold = math.inf
        if unfolded is not None:
            with torch.no_grad():
                before_fold = _max_diff(reference, unfolded(x))
        if before_fold <= tolerance:
            cause = (
                "The graph computes it before its BatchNorms are folded (max |difference| "
                f"{before_fold:.3g}), so folding the BatchNorms changed the outputs: a running "
                "variance near zero scales the conv by 1/sqrt(var + eps) and float32 rounding "
                f"with it; smallest: {_smallest_variances(unfolded)}. Every number measured on "
                "this model is suspect: check those statistics (re-estimate them, or raise eps)."
            )
        else:
            cause = (
                "A reparameterize()/fuse()/switch_to_deploy() method or helper changed the "
                "outputs; every number measured on this model is suspect. Check the "
                "re-parameterization (or pass the helper that does it: to_deploy(model, "
                "reparameterize=fn))."
            )
        warnings.warn(
            f"to_deploy: the deploy form does not compute the model's function: on "
            f"{x.shape[0]} input(s) max |deploy - model| = {diff:.3g} against max |model| = "
            f"{scale:.3g}. {cause}",
            UserWarning,
            stacklevel=3,
        )
    return result


def to_deploy(
    model: nn.Module,
    *,
    reparameterize: Callable[[nn.Module], nn.Module | None] | None = None,
    check_input: torch.Tensor | None = None,
) -> nn.Module:
    """Eval-mode deploy copy of ``model``: branches reparameterized, BatchNorm folded.

    Returns a ``torch.fx.GraphModule`` that computes the same eval-mode function (up to float
    rounding), keeps plain attributes such as ``num_classes``, and leaves ``model`` untouched.
    Function calls with constant weights become modules (``models.lift``). A BatchNorm that does
    not directly follow a conv layer (whose output only it uses) stays, and a ``UserWarning``
    names it. A block torch.fx cannot trace stays one opaque leaf module (``trace_opaque``):
    a ``UserWarning`` names it and the BatchNorms left unfolded inside it, and the graph's
    ``opaque_blocks`` records it (``quant.quantize`` quantizes the conv/linear modules inside
    it by module). Raises ValueError when even that fails (the top-level module's own code).

    Args:
        model: any fx-traceable module (train or eval form).
        reparameterize: a helper in the style of ``timm.utils.reparameterize_model`` or the public
            MobileOne's ``reparameterize_model``, called on an eval-mode copy; it returns the
            deploy-form model or None (converted in place). Without it, blocks with a
            ``fuse``/``reparameterize``/``switch_to_deploy`` method are converted
            (``REPARAMETERIZE_METHODS``).
        check_input: a batch of inputs; when given, the deploy form's outputs on it are compared
            with the eval-mode model's, and a ``UserWarning`` says when they differ by more than
            ``DEPLOY_CHECK_RTOL`` of the largest output. The numbers are kept as the graph's
            ``deploy_check`` attribute (``max_abs_diff``, ``max_abs_output``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"to_deploy needs an nn.Module, got {type(model).__name__}")
    if reparameterize is not None and not callable(reparameterize):
        raise TypeError(f"reparameterize must be callable, got {type(reparameterize).__name__}")
    work = copy.deepcopy(model).eval()
    reference = None
    if check_input is not None:
        with torch.no_grad():
            reference = work(check_input)
    if reparameterize is not None:
        new = reparameterize(work)
        if new is not None and not isinstance(new, nn.Module):
            raise TypeError(
                f"reparameterize(model) must return an nn.Module or None (in place), got "
                f"{type(new).__name__}"
            )
        work = (work if new is None else new).eval()
    else:
        work = _reparameterize(work).eval()
    gm, opaque = trace_opaque(work)
    if opaque:
        warnings.warn(opaque_notes(gm, opaque), UserWarning, stacklevel=2)
    lift_functional_layers(gm)
    unfolded = copy.deepcopy(gm) if check_input is not None else None
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
    gm.eval()
    #: The blocks torch.fx could not trace, kept as opaque leaf modules: ``{path: why}``.
    gm.opaque_blocks = opaque
    gm.deploy_check = None
    if check_input is not None:
        gm.deploy_check = _check_equivalent(reference, gm, check_input, unfolded)
    return gm
