"""``quantize(model, config, calib_batches)``: post-training fake quantization of any CNN.

Steps (Nagel et al., "A White Paper on Neural Network Quantization", arXiv 2106.08295, §3):

1. ``models.to_deploy``: an eval-mode copy with branches reparameterized, functional layers
   made modules and BatchNorm folded, as an ``fx.GraphModule`` (the input model is never
   modified), checked to compute the model's function on the first range-calibration images;
2. every ``Conv1d/2d/3d`` and ``Linear`` leaf module in the graph is a quantized layer; with
   ``first_last_8bit`` the first and last of them in graph order use ``max(bits, 8)``;
3. range calibration, one pass: the range-calibration batches run through the **fp32** deploy
   graph and each quantized layer's observer sees that layer's fp32 input (observation is not
   sequential: upstream layers are not quantized yet; this is the simple, order-independent
   min-max PTQ of the study); a second fp32 pass counts, per layer, the fraction of inputs that
   saturate the chosen range (the "clipping fraction");
4. each layer is replaced by a ``QuantConv``/``QuantLinear`` holding its fake-quantized weight,
   computed once (symmetric per-channel), its bias on the int32 accumulator grid
   ``s_x * s_w[c]`` (``QuantConfig.bias_bits``), and the input's asymmetric per-tensor scale and
   zero-point; its forward is one fake-quant of the input plus the ordinary conv/linear;
5. the result is frozen (no gradients) and in eval mode, with ``quant_config`` (the
   ``QuantConfig``) and ``precision`` attributes; every layer keeps a record of its parameters
   (``quant.inspect`` reads them) and its fp32 weight, so ``fake_quant_disabled(qmodel)`` runs the
   exact fp32 deploy model for comparisons.
"""

from __future__ import annotations

import abc
import contextlib
import math
import operator
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from quantcal.quant.config import QuantConfig, parse_precision
from quantcal.quant.observers import RangeObserver, get_observer
from quantcal.quant.primitives import (
    activation_qparams,
    activation_qrange,
    bias_overflow,
    fake_quantize_bias,
    fake_quantize_per_channel,
    fake_quantize_per_tensor_fast,
    weight_scale_per_channel,
)

__all__ = [
    "QuantConv",
    "QuantLinear",
    "QuantizedLayer",
    "batch_inputs",
    "fake_quant_disabled",
    "quantize",
    "quantized_layers",
]

_QUANTIZABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class QuantizedLayer(nn.Module, abc.ABC):
    """A conv/linear layer with a fake-quantized input activation and a fixed fake-quant weight.

    Buffers (move with ``.to()``): ``weight`` (the dequantized symmetric per-channel weight),
    ``bias`` (on the int32 accumulator grid ``s_x * s_w[c]`` unless ``bias_bits`` is None),
    ``weight_fp32``, ``bias_fp32``, ``weight_scale`` (per output channel), ``act_scale`` and
    ``act_zero_point``. Plain attributes record the bits, the observer's range, the clipping
    fraction on the range-calibration data and the layer kind.
    """

    def __init__(
        self,
        source: nn.Module,
        *,
        weight_bits: int,
        act_bits: int,
        act_range: tuple[float, float],
        observer: str,
        bias_bits: int | None = 32,
    ) -> None:
        super().__init__()
        weight = source.weight.detach()
        scale = weight_scale_per_channel(weight, weight_bits, axis=0)
        self.register_buffer("weight", fake_quantize_per_channel(weight, scale, weight_bits, 0))
        self.register_buffer("weight_fp32", weight.clone())
        self.register_buffer("weight_scale", scale.to(weight.device))
        act_scale, zero_point = activation_qparams(act_range[0], act_range[1], act_bits)
        bias = source.bias.detach().clone() if source.bias is not None else None
        self.register_buffer("bias_fp32", bias)
        #: Bias values beyond the integer grid; the remedy is to keep this layer's bias in float
        #: (``bias_bits`` None) rather than clamp it, and ``quantize`` names the layer.
        self.bias_overflow = 0
        if bias is not None and bias_bits is not None:
            self.bias_overflow = bias_overflow(bias, act_scale, scale, bias_bits)
            if self.bias_overflow:
                bias_bits = None
            else:
                bias = fake_quantize_bias(bias, act_scale, scale, bias_bits)
        self.register_buffer("bias", bias)
        self.bias_bits = bias_bits if bias is not None else None
        self.register_buffer("act_scale", torch.tensor(act_scale, dtype=torch.float32))
        self.register_buffer("act_zero_point", torch.tensor(zero_point, dtype=torch.int32))
        self.weight_bits = weight_bits
        self.act_bits = act_bits
        self.range_min, self.range_max = float(act_range[0]), float(act_range[1])
        self.observer = observer
        self.clip_fraction = math.nan
        self.kind = type(source).__name__
        self.fake_quant_enabled = True
        # Set by ``quantize`` when the graph proves every input of this layer is a temporary
        # that nothing else reads (see ``_mark_owned_inputs``): the forward then fake-quantizes
        # the input in place instead of allocating a copy.
        self.owns_input = False
        # Python copies of the activation constants: the forward needs no device sync.
        self._scale = act_scale
        self._inv_scale = float(torch.reciprocal(torch.tensor(act_scale, dtype=torch.float32)))
        self._zero_point = zero_point
        self._q_min, self._q_max = activation_qrange(act_bits)

    @property
    def act_zero_point_int(self) -> int:
        return self._zero_point

    @property
    def act_scale_float(self) -> float:
        return self._scale

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """The fake-quantized input (asymmetric per tensor, contiguous first); ``x`` is never
        modified."""
        return self._fake_quant(x, inplace=False)

    def _fake_quant(self, x: torch.Tensor, inplace: bool) -> torch.Tensor:
        return fake_quantize_per_tensor_fast(
            x,
            self._scale,
            self._inv_scale,
            self._zero_point,
            self._q_min,
            self._q_max,
            inplace=inplace,
        )

    def saturation_count(self, x: torch.Tensor) -> int:
        """How many elements of ``x`` are clipped: more than half a step outside the
        representable range ``[(q_min - z) s, (q_max - z) s]``, so that ``round(x / s) + z``
        saturates."""
        lo = (self._q_min - self._zero_point - 0.5) * self._scale
        hi = (self._q_max - self._zero_point + 0.5) * self._scale
        x_min, x_max = torch.aminmax(x.detach())
        if float(x_min) >= lo and float(x_max) <= hi:
            return 0
        return int((x < lo).sum()) + int((x > hi).sum())

    @abc.abstractmethod
    def layer_op(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """The conv/linear with the given weight and bias (no quantization)."""
        ...

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fake_quant_enabled:
            return self.layer_op(x, self.weight_fp32, self.bias_fp32)
        xq = self._fake_quant(x, inplace=self.owns_input and not x.requires_grad)
        return self.layer_op(xq, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (
            f"{self.kind}, W{self.weight_bits}A{self.act_bits}, act_scale={self._scale:.4g}, "
            f"zero_point={self._zero_point}, range=[{self.range_min:.4g}, {self.range_max:.4g}]"
        )


class QuantConv(QuantizedLayer):
    """Fake-quantized ``Conv1d/2d/3d`` (all padding modes, groups, dilation)."""

    def __init__(self, source: nn.Module, **kwargs: Any) -> None:
        super().__init__(source, **kwargs)
        self.stride = source.stride
        self.padding = source.padding
        self.dilation = source.dilation
        self.groups = source.groups
        self.padding_mode = source.padding_mode
        self.in_channels = source.in_channels
        self.out_channels = source.out_channels
        self.kernel_size = source.kernel_size
        self._reversed_padding_repeated_twice = source._reversed_padding_repeated_twice
        self._conv = _CONV_FN[len(source.kernel_size)]

    @property
    def depthwise(self) -> bool:
        return self.groups > 1 and self.groups == self.in_channels

    def layer_op(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return self._conv(x, weight, bias, self.stride, 0, self.dilation, self.groups)
        return self._conv(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)


class QuantLinear(QuantizedLayer):
    """Fake-quantized ``Linear``."""

    depthwise = False

    def __init__(self, source: nn.Module, **kwargs: Any) -> None:
        super().__init__(source, **kwargs)
        self.in_features = source.in_features
        self.out_features = source.out_features

    def layer_op(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        return F.linear(x, weight, bias)


# ----------------------------------------------------------------------------- helpers


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


def quantized_layers(qmodel: nn.Module) -> list[tuple[str, QuantizedLayer]]:
    """``(name, layer)`` of every quantized layer of ``qmodel``, in module order."""
    return [(n, m) for n, m in qmodel.named_modules() if isinstance(m, QuantizedLayer)]


@contextlib.contextmanager
def fake_quant_disabled(qmodel: nn.Module) -> Iterator[nn.Module]:
    """Within the block, ``qmodel`` computes the fp32 deploy model exactly (fp32 weights, no
    activation quantization); the previous state is restored afterwards."""
    layers = [m for _, m in quantized_layers(qmodel)]
    states = [m.fake_quant_enabled for m in layers]
    try:
        for m in layers:
            m.fake_quant_enabled = False
        yield qmodel
    finally:
        for m, state in zip(layers, states):
            m.fake_quant_enabled = state


def _device_of(model: nn.Module) -> torch.device:
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
    if isinstance(module, (*_QUANTIZABLE, nn.Embedding, nn.EmbeddingBag)):
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
        elif node.op == "call_module":
            module = gm.get_submodule(node.target)
            if _weighted_leaf(module):
                out.append(f"{node.target} ({type(module).__name__})")
    return out


def _layer_order(gm: torch.fx.GraphModule) -> list[str]:
    """Names of the quantizable leaf modules, in graph (execution) order, each once."""
    names: list[str] = []
    for node in gm.graph.nodes:
        if (
            node.op == "call_module"
            and node.target not in names
            and isinstance(gm.get_submodule(node.target), _QUANTIZABLE)
        ):
            names.append(str(node.target))
    return names


def _run_with_pre_hooks(
    gm: nn.Module, modules: dict[str, nn.Module], hook_fn: Any, xs: list[torch.Tensor]
) -> None:
    device = _device_of(gm)
    handles = [
        module.register_forward_pre_hook(lambda _m, args, name=name: hook_fn(name, args[0]))
        for name, module in modules.items()
    ]
    try:
        with torch.no_grad():
            for x in xs:
                gm(x.to(device))
    finally:
        for h in handles:
            h.remove()


def _set_submodule(root: nn.Module, target: str, module: nn.Module) -> None:
    parent_name, _, leaf = target.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, leaf, module)


def _layer_bits(config: QuantConfig, index: int, count: int, name: str) -> tuple[int, int]:
    w, a = config.bits_of(name)
    if config.first_last_8bit and index in (0, count - 1):
        return max(w, 8), max(a, 8)
    return w, a


# ----------------------------------------------------------------------------- quantize


def quantize(
    model: nn.Module,
    config: QuantConfig | str | None,
    calib_batches: Iterable[Any] | None,
    *,
    reparameterize: Any = None,
) -> nn.Module:
    """Post-training fake quantization of ``model`` (see the module docstring for the steps).

    Args:
        model: any fx-traceable ``nn.Module`` (train or eval form; it is not modified).
        config: a ``QuantConfig``, a precision string ("W4A8"), or None / "fp32" for the fp32
            deploy model (``to_deploy(model)``; ``calib_batches`` is then not used).
        calib_batches: range-calibration batches: an iterable of input tensors or ``(x, y)``
            tuples (the ``ptq_calib`` split, never ``val`` or ``test``); empty -> ValueError.
            Their first 32 images also check that the deploy form computes the model's
            function (``to_deploy(check_input=...)``; a ``UserWarning`` when it does not).
        reparameterize: a ``reparameterize_model``-style helper for the model's deploy form
            (see ``models.deploy.to_deploy``); default: the blocks' own methods.

    Returns:
        a new frozen eval-mode ``nn.Module`` (an ``fx.GraphModule``) on the model's device.
        Its logits do not depend on the evaluation batch size, up to float accumulation
        order: a conv's fp32 output can differ in the last bit between batch sizes, and where
        that crosses a rounding boundary the element moves by one quantization step.
    """
    from quantcal.models.deploy import to_deploy

    if isinstance(config, str):
        config = parse_precision(config)
    if config is not None and not isinstance(config, QuantConfig):
        raise TypeError(
            f"config must be a QuantConfig, a precision string such as 'W8A8', or None (fp32); "
            f"got {type(config).__name__}"
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize needs an nn.Module, got {type(model).__name__}")
    if config is None:
        deploy = to_deploy(model, reparameterize=reparameterize)
        deploy.requires_grad_(False)
        deploy.quant_config = None
        deploy.precision = "fp32"
        return deploy
    xs = batch_inputs(calib_batches)
    gm = to_deploy(
        model, reparameterize=reparameterize, check_input=xs[0][:32].to(_device_of(model))
    )
    names = _layer_order(gm)
    left = unquantized_computations(gm)
    if left:
        message = (
            f"quantize: {len(names)} of {len(names) + len(left)} conv/linear computations "
            f"quantized; left in fp32: {', '.join(left)}"
        )
        if config.on_unsupported == "error":
            raise ValueError(
                message + ". Rewrite them as nn.Conv*/nn.Linear modules, or pass "
                "QuantConfig(on_unsupported='warn') to measure the model with them in fp32"
            )
        warnings.warn(message, UserWarning, stacklevel=2)
    modules = {name: gm.get_submodule(name) for name in names}
    unknown = sorted(set(config.plan()) - set(names))
    if unknown:
        raise ValueError(
            f"QuantConfig.layer_bits names {len(unknown)} layer(s) this model does not quantize: "
            f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}; its layers are "
            f"{', '.join(names[:8])}{' ...' if len(names) > 8 else ''}"
        )
    bits = {name: _layer_bits(config, i, len(names), name) for i, name in enumerate(names)}
    observers: dict[str, RangeObserver] = {
        name: get_observer(config.observer, bits=bits[name][1], **config.observer_options())
        for name in names
    }
    _run_with_pre_hooks(gm, modules, lambda name, x: observers[name].observe(x), xs)
    qlayers: dict[str, QuantizedLayer] = {}
    for name, module in modules.items():
        if observers[name].count == 0:
            raise ValueError(
                f"layer {name!r} ({type(module).__name__}) saw no input during range calibration; "
                "is it used in forward()?"
            )
        cls = QuantLinear if isinstance(module, nn.Linear) else QuantConv
        qlayers[name] = cls(
            module,
            weight_bits=bits[name][0],
            act_bits=bits[name][1],
            act_range=observers[name].range(),
            observer=config.observer,
            bias_bits=config.bias_bits,
        )
    _warn_bias_overflow(qlayers, config.bias_bits)
    _record_clip_fractions(gm, modules, qlayers, xs)
    for name, qlayer in qlayers.items():
        _set_submodule(gm, name, qlayer)
    _mark_owned_inputs(gm, qlayers)
    gm.requires_grad_(False)
    gm.quant_config = config
    gm.precision = config.name
    #: (quantized, total) conv/linear computations and the names of those left in fp32.
    gm.quant_coverage = {"quantized": len(names), "total": len(names) + len(left), "fp32": left}
    return gm.eval()


def _warn_bias_overflow(qlayers: dict[str, QuantizedLayer], bits: int | None) -> None:
    """Name every layer whose bias did not fit the integer grid (kept in float instead)."""
    over = {n: q for n, q in qlayers.items() if q.bias_overflow}
    if not over:
        return
    listed = ", ".join(
        f"{n} ({q.bias_overflow} of {q.bias_fp32.numel()} values, input range "
        f"[{q.range_min:.3g}, {q.range_max:.3g}], smallest weight scale "
        f"{float(q.weight_scale.min()):.3g})"
        for n, q in over.items()
    )
    warnings.warn(
        f"quantize: {len(over)} layer(s) have biases beyond the int{bits} accumulator grid "
        f"s_x*s_w[c] (a tiny input range, or an output channel with near-zero weights such as "
        f"one whose folded BatchNorm gamma is ~0; clamping would wipe the bias); their biases "
        f"stay in float: {listed}",
        UserWarning,
        stacklevel=3,
    )


def _record_clip_fractions(
    gm: nn.Module,
    modules: dict[str, nn.Module],
    qlayers: dict[str, QuantizedLayer],
    xs: list[torch.Tensor],
) -> None:
    """Second fp32 pass: the fraction of each layer's range-calibration inputs that saturate."""
    clipped = dict.fromkeys(modules, 0)
    total = dict.fromkeys(modules, 0)

    def count(name: str, x: torch.Tensor) -> None:
        clipped[name] += qlayers[name].saturation_count(x)
        total[name] += x.numel()

    _run_with_pre_hooks(gm, modules, count, xs)
    for name, qlayer in qlayers.items():
        qlayer.clip_fraction = clipped[name] / total[name] if total[name] else math.nan


# Modules and functions whose output is a new tensor that aliases none of their inputs.
_FRESH_MODULES: tuple[type[nn.Module], ...] = (
    QuantizedLayer,
    *_QUANTIZABLE,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
)
_FRESH_FUNCTIONS = {operator.add, operator.mul, operator.sub, torch.add, torch.mul, torch.cat}
_FRESH_METHODS = {"add", "mul", "sub"}
# Elementwise activations: their output may be their input itself (``inplace=True``), so it is
# a temporary only when their input is one that nothing else reads.
_ACTIVATION_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.Hardtanh,
    nn.LeakyReLU,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.SiLU,
)
_ACTIVATION_FUNCTIONS = {F.relu, F.relu6, F.hardtanh, F.leaky_relu, F.hardswish, F.silu, torch.relu}
_ACTIVATION_METHODS = {"relu", "relu_"}


def _value_kind(gm: torch.fx.GraphModule, node: torch.fx.Node) -> str | None:
    """ "fresh" (a new tensor), "activation" (elementwise, may return its input) or None."""
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        if isinstance(module, _FRESH_MODULES):
            return "fresh"
        return "activation" if isinstance(module, _ACTIVATION_MODULES) else None
    tables = {
        "call_function": (_FRESH_FUNCTIONS, _ACTIVATION_FUNCTIONS),
        "call_method": (_FRESH_METHODS, _ACTIVATION_METHODS),
    }
    if node.op not in tables:
        return None
    fresh, activation = tables[node.op]
    if node.target in fresh:
        return "fresh"
    return "activation" if node.target in activation else None


def _is_temporary(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """Whether ``node``'s value is a tensor created inside the graph that aliases nothing else
    and that only one node reads. Conservative: anything not known is not a temporary (views,
    ``contiguous``, graph inputs, attributes, unknown calls)."""
    if len(node.users) != 1 or "out" in node.kwargs:  # out= writes into an existing tensor
        return False
    kind = _value_kind(gm, node)
    if kind == "activation":  # a temporary when its input is one
        arg = node.args[0] if node.args else None
        return isinstance(arg, torch.fx.Node) and _is_temporary(gm, arg)
    return kind == "fresh"


def _mark_owned_inputs(gm: torch.fx.GraphModule, qlayers: dict[str, QuantizedLayer]) -> None:
    """Set ``owns_input`` on each quantized layer whose every call reads a temporary (see
    ``_is_temporary``), so its forward may fake-quantize that input in place. Bit-identical to
    the copying path; it only saves an allocation per layer."""
    owned = dict.fromkeys(qlayers, True)
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target in qlayers:
            arg = node.args[0] if node.args else None
            if not (isinstance(arg, torch.fx.Node) and _is_temporary(gm, arg)):
                owned[str(node.target)] = False
    for name, qlayer in qlayers.items():
        qlayer.owns_input = owned[name]
