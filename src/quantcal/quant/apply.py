"""``quantize(model, config, calib_batches)``: post-training fake quantization of any CNN.

Steps (Nagel et al., "A White Paper on Neural Network Quantization", arXiv 2106.08295, §3):

1. ``models.to_deploy``: an eval-mode copy with branches reparameterized, functional layers
   made modules and BatchNorm folded, as an ``fx.GraphModule`` (the input model is never
   modified), checked to compute the model's function on the first range-calibration images;
2. every ``Conv1d/2d/3d`` and ``Linear`` leaf module in the graph is a quantized layer; with
   ``first_last_8bit`` the first and last of them in graph order use ``max(bits, 8)``;
3. the quantization method (``method="ptq"`` by default; ``quant.available_methods()``) sets
   each layer from the deploy graph and the range-calibration batches. ``ptq``: the batches run
   through the **fp32** deploy graph and each layer's observer sees that layer's fp32 input (the
   simple, order-independent min-max PTQ of the study; ``QuantConfig(sequential=True)``
   observes in graph order on the network quantized so far); a second fp32 pass counts, per
   layer, the fraction of inputs that saturate the chosen range (the "clipping fraction");
4. each layer is replaced by a ``QuantConv``/``QuantLinear`` holding integer weights
   (symmetric per channel, or per tensor) with their scales, the integer bias on the int32
   accumulator grid ``s_x * s_w[c]`` (``QuantConfig.bias_bits``), and the input's asymmetric
   per-tensor scale and zero-point; its forward is one fake-quant of the input plus the
   ordinary conv/linear with the weight dequantized from the stored integers;
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
    dequantize_bias,
    dequantize_per_channel,
    fake_quantize_per_tensor_fast,
    quantize_bias,
    quantize_per_channel,
    weight_int_dtype,
    weight_scale_per_channel,
    weight_scale_per_tensor,
)

__all__ = [
    "LayerTarget",
    "QuantConv",
    "QuantLinear",
    "QuantizedLayer",
    "batch_inputs",
    "fake_quant_disabled",
    "finish_quantized",
    "observe_ranges",
    "quantize",
    "quantized_layers",
]

#: Weight scale granularities (``QuantConfig.weight_granularity``).
WEIGHT_GRANULARITIES = ("channel", "tensor")
_QUANTIZABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class QuantizedLayer(nn.Module, abc.ABC):
    """A conv/linear layer with a fake-quantized input activation and integer weights.

    It holds what an integer runtime holds (Jacob et al., CVPR 2018, §2.4; ONNX QDQ):
    ``weight_int`` (int8, or int16 above 8 bits) with ``weight_scale`` and ``weight_zero_point``
    (0: symmetric) per output channel (all equal for per-tensor granularity), ``bias_int``
    (int64 values of a ``bias_bits``-bit integer, None for a float bias) on the accumulator grid
    ``s_x * s_w[c]``, and the input's asymmetric per-tensor ``act_scale`` and
    ``act_zero_point``. ``weight`` and ``bias`` are the dequantized values the forward uses,
    always derived from the stored integers (``weight = weight_int * weight_scale``), so what is
    measured is what ``export_onnx`` writes. ``weight_fp32`` / ``bias_fp32`` keep the fp32 deploy
    layer (``fake_quant_disabled``); ``bias_float`` is the float bias the integer bias encodes
    (``bias_fp32`` plus any correction a method made).

    Methods change a layer only through ``set_weight_int``, ``set_bias`` and
    ``set_act_qparams``, which keep every derived value consistent. Plain attributes record the
    bits, the granularity, the observer's range, the clipping fraction on the range-calibration
    data and the layer kind.
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
        weight_granularity: str = "channel",
    ) -> None:
        super().__init__()
        if weight_granularity not in WEIGHT_GRANULARITIES:
            raise ValueError(
                f"weight_granularity must be one of {', '.join(WEIGHT_GRANULARITIES)}, got "
                f"{weight_granularity!r}"
            )
        weight = source.weight.detach()
        scale_fn = (
            weight_scale_per_channel if weight_granularity == "channel" else weight_scale_per_tensor
        )
        scale = scale_fn(weight, weight_bits, axis=0).to(weight.device)
        self.weight_bits = weight_bits
        self.act_bits = act_bits
        self.weight_granularity = weight_granularity
        self.register_buffer("weight_fp32", weight.clone())
        self.register_buffer("weight_scale", scale)
        self.register_buffer(
            "weight_zero_point", torch.zeros(scale.shape, dtype=torch.int32, device=weight.device)
        )
        q = quantize_per_channel(weight, scale, weight_bits, 0)
        self.register_buffer("weight_int", q.to(weight_int_dtype(weight_bits)))
        self.register_buffer("weight", None)
        bias = source.bias.detach().clone() if source.bias is not None else None
        self.register_buffer("bias_fp32", bias)
        self.register_buffer("bias_float", None if bias is None else bias.clone())
        self.register_buffer("bias_int", None)
        self.register_buffer("bias", None)
        #: The configured integer bias width (None: float biases).
        self.bias_bits_config = bias_bits
        self.bias_bits: int | None = None
        #: Bias values beyond the integer grid; the remedy is to keep this layer's bias in float
        #: (``bias_bits`` None) rather than clamp it, and ``quantize`` names the layer.
        self.bias_overflow = 0
        self.register_buffer("act_scale", None)
        self.register_buffer("act_zero_point", None)
        self.range_min, self.range_max = float(act_range[0]), float(act_range[1])
        self.observer = observer
        self.clip_fraction = math.nan
        self.kind = type(source).__name__
        self.fake_quant_enabled = True
        # Set by ``quantize`` when the graph proves every input of this layer is a temporary
        # that nothing else reads (see ``_mark_owned_inputs``): the forward then fake-quantizes
        # the input in place instead of allocating a copy.
        self.owns_input = False
        self._q_min, self._q_max = activation_qrange(act_bits)
        act_scale, zero_point = activation_qparams(act_range[0], act_range[1], act_bits)
        self.set_act_qparams(act_scale, zero_point)  # also derives weight and bias

    # -- the only ways a method changes a layer -------------------------------------------
    def set_act_qparams(self, scale: float, zero_point: int) -> None:
        """Set the input's per-tensor scale (its float32 value is used) and integer zero-point;
        the bias is re-quantized on the new accumulator grid."""
        scale = float(torch.tensor(float(scale), dtype=torch.float32))
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"activation scale must be finite and > 0, got {scale}")
        zero_point = int(zero_point)
        if not self._q_min <= zero_point <= self._q_max:
            raise ValueError(
                f"zero_point must be in [{self._q_min}, {self._q_max}] for {self.act_bits} "
                f"bits, got {zero_point}"
            )
        device = self.weight_fp32.device
        self.act_scale = torch.tensor(scale, dtype=torch.float32, device=device)
        self.act_zero_point = torch.tensor(zero_point, dtype=torch.int32, device=device)
        # Python copies of the activation constants: the forward needs no device sync.
        self._scale = scale
        self._inv_scale = float(torch.reciprocal(torch.tensor(scale, dtype=torch.float32)))
        self._zero_point = zero_point
        self._derive()

    def set_weight_int(self, q: torch.Tensor, scale: torch.Tensor | None = None) -> None:
        """Store integer weights ``q`` (same shape as the weight, within the symmetric range
        ``[-(2^(b-1) - 1), 2^(b-1) - 1]``) and optionally new per-channel scales; the
        dequantized weight and the bias grid follow."""
        lo, hi = -(2 ** (self.weight_bits - 1) - 1), 2 ** (self.weight_bits - 1) - 1
        if q.shape != self.weight_fp32.shape:
            raise ValueError(
                f"integer weights must have shape {tuple(self.weight_fp32.shape)}, got "
                f"{tuple(q.shape)}"
            )
        if q.is_floating_point() and not bool((q == q.round()).all()):
            raise ValueError("integer weights must hold integers")
        if q.numel() and (int(q.min()) < lo or int(q.max()) > hi):
            raise ValueError(
                f"integer weights must lie in [{lo}, {hi}] for {self.weight_bits} bits, got "
                f"[{int(q.min())}, {int(q.max())}]"
            )
        if scale is not None:
            scale = scale.detach().to(torch.float32).reshape(-1).to(self.weight_scale.device)
            if scale.shape != self.weight_scale.shape or not bool((scale > 0).all()):
                raise ValueError(
                    f"weight scales must be {self.weight_scale.shape[0]} positive floats, got "
                    f"shape {tuple(scale.shape)}"
                )
            self.weight_scale = scale.clone()
        self.weight_int = q.detach().to(self.weight_int.dtype).to(self.weight_int.device)
        self._derive()

    def set_bias(self, bias: torch.Tensor) -> None:
        """Set the float bias the integer bias encodes (e.g. ``bias_fp32`` minus a correction,
        Nagel et al. 2019 §4.2); it is re-quantized on the accumulator grid. A layer without a
        bias gets one (zero-initialised layers of a method)."""
        shape = (self.weight_fp32.shape[0],)
        if tuple(bias.shape) != shape:
            raise ValueError(f"bias must have shape {shape}, got {tuple(bias.shape)}")
        self.bias_float = bias.detach().to(self.weight_fp32.dtype).to(self.weight_fp32.device)
        self._derive()

    def _derive(self) -> None:
        """``weight`` and ``bias`` from the stored integers (and the bias's integers from
        ``bias_float`` on the current grid)."""
        if self.weight_int is None or self.act_scale is None:
            return
        w = dequantize_per_channel(self.weight_int, self.weight_scale, 0)
        self.weight = w.to(self.weight_fp32.dtype)
        bias, bits = self.bias_float, self.bias_bits_config
        self.bias_overflow = 0
        if bias is None or bits is None:
            self.bias_int, self.bias, self.bias_bits = None, bias, None if bias is None else bits
            return
        self.bias_overflow = bias_overflow(bias, self._scale, self.weight_scale, bits)
        if self.bias_overflow:  # named by ``quantize``; clamping would wipe the bias
            self.bias_int, self.bias, self.bias_bits = None, bias.clone(), None
            return
        q = quantize_bias(bias, self._scale, self.weight_scale, bits)
        self.bias_int = q
        self.bias = dequantize_bias(q, self._scale, self.weight_scale).to(bias.dtype)
        self.bias_bits = bits

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
    gm: nn.Module,
    modules: dict[str, nn.Module],
    hook_fn: Any,
    xs: list[torch.Tensor],
    *,
    outputs: bool = False,
) -> None:
    """Run ``xs`` through ``gm`` (no grad) calling ``hook_fn(name, tensor)`` with each named
    module's input, or with its output when ``outputs``."""
    device = _device_of(gm)
    handles = [
        module.register_forward_hook(lambda _m, _a, out, name=name: hook_fn(name, out))
        if outputs
        else module.register_forward_pre_hook(lambda _m, args, name=name: hook_fn(name, args[0]))
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
    method: str = "ptq",
    method_options: dict[str, Any] | None = None,
    train_data: Any = None,
    train_config: Any = None,
    work_dir: Any = None,
    reparameterize: Any = None,
    log: Any = None,
) -> nn.Module:
    """Quantize ``model`` with a registered method (see the module docstring for the steps of
    the default, ``"ptq"``; ``quant.available_methods()`` lists the rest).

    Args:
        model: any fx-traceable ``nn.Module`` (train or eval form; it is not modified).
        config: a ``QuantConfig``, a precision string ("W4A8"), or None / "fp32" for the fp32
            deploy model (``to_deploy(model)``; ``calib_batches`` is then not used).
        calib_batches: range-calibration batches: an iterable of input tensors or ``(x, y)``
            tuples (the ``ptq_calib`` split, never ``val`` or ``test``); empty -> ValueError.
            Their first 32 images also check that the deploy form computes the model's
            function (``to_deploy(check_input=...)``; a ``UserWarning`` when it does not).
            Methods that reconstruct or correct (``cle_bc``, ``adaround``) use them too.
        method: a registered quantization method: "ptq" (min-max post-training quantization,
            the study's), "cle_bc", "adaround", "qat", ...; an unknown name is a ValueError
            listing the valid ones.
        method_options: the method's options (``quant.get_method(name).defaults`` lists them;
            an unknown key is a ValueError).
        train_data: the training data of methods that train (``qat``): a ``data.Splits`` or
            ``data.Split``; ``train_config`` the ``train.TrainConfig`` they start from (default:
            the method's own) and ``work_dir`` a folder for their resumable checkpoints.
        reparameterize: a ``reparameterize_model``-style helper for the model's deploy form
            (see ``models.deploy.to_deploy``); default: the blocks' own methods.
        log: a callable taking progress lines (methods that take long say what they do).

    Returns:
        a new frozen eval-mode ``nn.Module`` (an ``fx.GraphModule``) on the model's device,
        with ``quant_config``, ``precision`` and ``quant_method`` attributes. Its logits do not
        depend on the evaluation batch size, up to float accumulation order: a conv's fp32
        output can differ in the last bit between batch sizes, and where that crosses a
        rounding boundary the element moves by one quantization step.
    """
    from quantcal.models.deploy import to_deploy
    from quantcal.quant.methods import get_method

    if isinstance(config, str):
        config = parse_precision(config)
    if config is not None and not isinstance(config, QuantConfig):
        raise TypeError(
            f"config must be a QuantConfig, a precision string such as 'W8A8', or None (fp32); "
            f"got {type(config).__name__}"
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize needs an nn.Module, got {type(model).__name__}")
    spec = get_method(method)
    options = spec.resolve(method_options)
    if config is None:
        deploy = to_deploy(model, reparameterize=reparameterize)
        deploy.requires_grad_(False)
        deploy.quant_config = None
        deploy.precision = "fp32"
        deploy.quant_method = None
        return deploy
    xs = batch_inputs(calib_batches)
    gm = to_deploy(
        model, reparameterize=reparameterize, check_input=xs[0][:32].to(_device_of(model))
    )
    target = LayerTarget.of(gm, config)
    from quantcal.quant.methods import MethodContext

    ctx = MethodContext(
        calib=xs,
        options=options,
        train_data=train_data,
        log=log or (lambda _line: None),
        train_config=train_config,
        work_dir=work_dir,
    )
    qlayers = spec.fn(gm, target, ctx)
    return finish_quantized(gm, target, qlayers, xs, method=spec.name, options=options)


class LayerTarget:
    """What a method must quantize in a deploy graph: the quantizable layers in graph order
    (``names``), their fp32 modules, their (weight, activation) bits under the config's plan
    and ``first_last_8bit``, and the computations left in fp32 (named in a warning here)."""

    def __init__(
        self,
        config: QuantConfig,
        names: list[str],
        modules: dict[str, nn.Module],
        bits: dict[str, tuple[int, int]],
        left: list[str],
    ) -> None:
        self.config, self.names, self.modules, self.bits, self.left = (
            config,
            names,
            modules,
            bits,
            left,
        )

    @classmethod
    def of(cls, gm: torch.fx.GraphModule, config: QuantConfig) -> LayerTarget:
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
            warnings.warn(message, UserWarning, stacklevel=3)
        unknown = sorted(set(config.plan()) - set(names))
        if unknown:
            raise ValueError(
                f"QuantConfig.layer_bits names {len(unknown)} layer(s) this model does not "
                f"quantize: {', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}; its "
                f"layers are {', '.join(names[:8])}{' ...' if len(names) > 8 else ''}"
            )
        modules = {name: gm.get_submodule(name) for name in names}
        bits = {name: _layer_bits(config, i, len(names), name) for i, name in enumerate(names)}
        return cls(config, names, modules, bits, left)

    def observer(self, name: str) -> RangeObserver:
        """A fresh range estimator of the config for layer ``name``'s activation bits."""
        c = self.config
        return get_observer(c.observer, bits=self.bits[name][1], **c.observer_options())

    def layer(self, name: str, act_range: tuple[float, float]) -> QuantizedLayer:
        """Layer ``name`` quantized from its current fp32 module with the given input range."""
        module = self.modules[name]
        cls = QuantLinear if isinstance(module, nn.Linear) else QuantConv
        return cls(
            module,
            weight_bits=self.bits[name][0],
            act_bits=self.bits[name][1],
            act_range=act_range,
            observer=self.config.observer,
            bias_bits=self.config.bias_bits,
            weight_granularity=self.config.weight_granularity,
        )


def observe_ranges(
    gm: nn.Module, target: LayerTarget, xs: list[torch.Tensor]
) -> dict[str, tuple[float, float]]:
    """Every layer's input range from one pass of ``xs`` through the **fp32** graph (the
    study's order-independent range setting)."""
    observers = {name: target.observer(name) for name in target.names}
    _run_with_pre_hooks(gm, target.modules, lambda name, x: observers[name].observe(x), xs)
    for name, module in target.modules.items():
        if observers[name].count == 0:
            raise ValueError(
                f"layer {name!r} ({type(module).__name__}) saw no input during range calibration; "
                "is it used in forward()?"
            )
    return {name: observers[name].range() for name in target.names}


def finish_quantized(
    gm: torch.fx.GraphModule,
    target: LayerTarget,
    qlayers: dict[str, QuantizedLayer],
    xs: list[torch.Tensor],
    *,
    method: str = "ptq",
    options: dict[str, Any] | None = None,
) -> torch.fx.GraphModule:
    """Install ``qlayers`` in ``gm`` (a method's result), name overflowing biases, record the
    clipping fractions a method did not measure itself (on the fp32 inputs), and freeze."""
    missing = [n for n in target.names if n not in qlayers]
    if missing:
        raise RuntimeError(f"quantization method {method!r} left layers unquantized: {missing}")
    _warn_bias_overflow(qlayers, target.config.bias_bits)
    unmeasured = {n: q for n, q in qlayers.items() if math.isnan(q.clip_fraction)}
    if unmeasured:
        current = {n: gm.get_submodule(n) for n in unmeasured}
        fp32 = {n: m for n, m in current.items() if not isinstance(m, QuantizedLayer)}
        if len(fp32) == len(current):
            _record_clip_fractions(gm, fp32, unmeasured, xs)
    for name, qlayer in qlayers.items():
        _set_submodule(gm, name, qlayer)
    _mark_owned_inputs(gm, qlayers)
    gm.requires_grad_(False)
    gm.quant_config = target.config
    gm.precision = target.config.name
    gm.quant_method = {"name": method, "options": dict(options or {})}
    #: (quantized, total) conv/linear computations and the names of those left in fp32.
    gm.quant_coverage = {
        "quantized": len(target.names),
        "total": len(target.names) + len(target.left),
        "fp32": target.left,
    }
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
