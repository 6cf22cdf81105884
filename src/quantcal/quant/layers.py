"""The quantized layer classes and the helpers that find and switch them in a model.

``QuantizedLayer`` (and its ``QuantConv`` / ``QuantLinear`` forms) holds what an integer runtime
holds: integer weights with their scales, the integer bias on the accumulator grid, and the input's
per-tensor scale and zero-point; its forward fake-quantizes the input and runs the conv/linear with
the dequantized weight. ``quantized_layers`` lists them in a model and ``fake_quant_disabled``
switches them to the exact fp32 deploy layer for comparisons.
"""

from __future__ import annotations

import abc
import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

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
    "WEIGHT_GRANULARITIES",
    "QuantConv",
    "QuantLinear",
    "QuantizedLayer",
    "fake_quant_disabled",
    "quantized_layers",
]

#: Weight scale granularities (``QuantConfig.weight_granularity``).
WEIGHT_GRANULARITIES = ("channel", "tensor")
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


def quantized_layers(qmodel: nn.Module) -> list[tuple[str, QuantizedLayer]]:
    """``(name, layer)`` of every quantized layer of ``qmodel``, in module order."""
    return [(n, m) for n, m in qmodel.named_modules() if isinstance(m, QuantizedLayer)]


@contextlib.contextmanager
def fake_quant_disabled(qmodel: nn.Module) -> Iterator[nn.Module]:
    """Within the block, ``qmodel`` computes the fp32 deploy model exactly (fp32 weights, no
    activation quantization); the previous state is restored afterwards. Every module with a
    ``fake_quant_enabled`` switch is switched: the quantized layers and the quantized
    activation products (``quant.matmul.QuantMatMul``)."""
    layers = [m for m in qmodel.modules() if hasattr(m, "fake_quant_enabled")]
    states = [m.fake_quant_enabled for m in layers]
    try:
        for m in layers:
            m.fake_quant_enabled = False
        yield qmodel
    finally:
        for m, state in zip(layers, states):
            m.fake_quant_enabled = state
