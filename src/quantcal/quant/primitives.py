"""Pure fake-quantization math: symmetric per-channel weights, asymmetric per-tensor activations.

The scheme is the one of Kuang & Wong (arXiv 2309.13866) and of most integer accelerators
(Krishnamoorthi, "Quantizing deep convolutional networks for efficient inference", arXiv 1806.08342;
Nagel et al., "A White Paper on Neural Network Quantization", arXiv 2106.08295):

* weights, per output channel ``c``: ``q_max = 2^(b-1) - 1``, ``s_c = max|W_c| / q_max``,
  ``q = clamp(round(W / s_c), -q_max, q_max)`` (symmetric, "narrow" range, zero-point 0);
* activations, per tensor: the range ``[lo, hi]`` is first widened to contain 0, then
  ``s = (hi - lo) / (2^b - 1)``, ``z = clamp(round(-lo / s), 0, 2^b - 1)`` (an integer), and
  ``q = clamp(round(x / s) + z, 0, 2^b - 1)``; zero is exactly representable (``q = z``).

Fake quantization is ``dequantize(quantize(x))``. Rounding is round-half-to-even, and ``x / s``
is computed as ``x * float32(1 / s)`` exactly as the ``torch.fake_quantize_per_*_affine`` ops do, so
the functions here agree with those ops bit for bit. Inputs are made contiguous first:
``fake_quantize_per_tensor_affine`` returned wrong values on non-contiguous inputs (pytorch #75009),
which ShuffleNet's channel split and shuffle produce.
"""

from __future__ import annotations

import torch

MIN_BITS = 2
MAX_BITS = 16
# The torch fake-quant ops are used up to this width; wider ranges use the own equivalent below
# (bit-identical arithmetic), so behaviour does not depend on the torch version's range checks.
_TORCH_OP_MAX_BITS = 8


def check_bits(bits: int, what: str = "bits") -> int:
    """Validate a bit width: an int in [2, 16]; returns it."""
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError(f"{what} must be an int in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(
            f"{what} must be in [{MIN_BITS}, {MAX_BITS}], got {bits}; "
            "use e.g. 8 for int8 or 4 for int4"
        )
    return bits


def weight_qrange(bits: int) -> tuple[int, int]:
    """Integer range of symmetric weights: ``(-(2^(b-1) - 1), 2^(b-1) - 1)``."""
    q_max = 2 ** (check_bits(bits, "weight bits") - 1) - 1
    return -q_max, q_max


def activation_qrange(bits: int) -> tuple[int, int]:
    """Integer range of asymmetric activations: ``(0, 2^b - 1)``."""
    return 0, 2 ** check_bits(bits, "activation bits") - 1


def _inverse_scale(scale: torch.Tensor) -> torch.Tensor:
    # float32(1) / float32(scale), as the ATen kernels compute it.
    return torch.reciprocal(scale.to(torch.float32))


def _check_float(x: torch.Tensor, what: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{what} must be a floating-point tensor, got dtype {x.dtype}")


def _channel_shape(x: torch.Tensor, axis: int) -> list[int]:
    shape = [1] * x.dim()
    shape[axis] = x.shape[axis]
    return shape


def _check_axis(x: torch.Tensor, axis: int) -> int:
    if x.dim() < 1:
        raise ValueError("per-channel quantization needs a tensor with at least one dimension")
    if not -x.dim() <= axis < x.dim():
        raise ValueError(f"axis {axis} is out of range for a tensor with {x.dim()} dimensions")
    return axis % x.dim()


# ----------------------------------------------------------------------------- weights


def weight_scale_per_channel(weight: torch.Tensor, bits: int, axis: int = 0) -> torch.Tensor:
    """Per-channel symmetric scales ``s_c = max|W_c| / (2^(b-1) - 1)`` as float32, shape (C,).

    A channel whose largest magnitude is zero (or below the smallest normal float32) gets
    scale 1.0, so its reciprocal stays finite; all its values quantize to 0.
    """
    _check_float(weight, "weight")
    axis = _check_axis(weight, axis)
    _, q_max = weight_qrange(bits)
    w = weight.detach().to(torch.float32)
    reduce_dims = [d for d in range(w.dim()) if d != axis]
    amax = w.abs().amax(dim=reduce_dims) if reduce_dims else w.abs()
    scale = amax / q_max
    tiny = torch.finfo(torch.float32).tiny
    return torch.where(scale > tiny, scale, torch.ones_like(scale))


def quantize_per_channel(
    weight: torch.Tensor, scale: torch.Tensor, bits: int, axis: int = 0
) -> torch.Tensor:
    """Integers ``clamp(round(W * (1/s_c)), -q_max, q_max)`` (int32) of symmetric weights."""
    _check_float(weight, "weight")
    axis = _check_axis(weight, axis)
    q_min, q_max = weight_qrange(bits)
    w = weight.detach().contiguous().to(torch.float32)
    inv = _inverse_scale(scale).reshape(_channel_shape(w, axis))
    return torch.round(w * inv).clamp_(q_min, q_max).to(torch.int32)


def dequantize_per_channel(q: torch.Tensor, scale: torch.Tensor, axis: int = 0) -> torch.Tensor:
    """Floats ``q * s_c`` (float32) from symmetric per-channel integers."""
    axis = _check_axis(q, axis)
    return q.to(torch.float32) * scale.to(torch.float32).reshape(_channel_shape(q, axis))


def weight_scale_per_tensor(weight: torch.Tensor, bits: int, axis: int = 0) -> torch.Tensor:
    """One symmetric scale ``s = max|W| / (2^(b-1) - 1)`` for the whole tensor, returned
    repeated per channel (float32, shape ``(C,)``), so per-tensor weights run through the
    per-channel arithmetic and export unchanged (ONNX per-axis with equal scales). The
    granularity of Nagel et al. 2019's headline (per-tensor weights, where cross-layer
    equalization matters most)."""
    _check_float(weight, "weight")
    axis = _check_axis(weight, axis)
    _, q_max = weight_qrange(bits)
    amax = weight.detach().to(torch.float32).abs().amax()
    scale = amax / q_max
    if not bool(scale > torch.finfo(torch.float32).tiny):
        scale = torch.ones_like(scale)
    return scale.expand(weight.shape[axis]).clone()


def weight_int_dtype(bits: int) -> torch.dtype:
    """The integer container of ``bits``-bit symmetric weights: int8 up to 8 bits, else int16."""
    return torch.int8 if check_bits(bits, "weight bits") <= 8 else torch.int16


def fake_quantize_per_channel(
    weight: torch.Tensor, scale: torch.Tensor, bits: int, axis: int = 0
) -> torch.Tensor:
    """``dequantize_per_channel(quantize_per_channel(W))``, same dtype as ``weight``.

    Uses ``torch.fake_quantize_per_channel_affine`` (zero-points 0) for ``bits <= 8`` and a
    bit-identical own equivalent above.
    """
    _check_float(weight, "weight")
    axis = _check_axis(weight, axis)
    q_min, q_max = weight_qrange(bits)
    scale = scale.detach().to(device=weight.device, dtype=torch.float32).contiguous()
    if scale.shape != (weight.shape[axis],):
        raise ValueError(
            f"scale must have shape ({weight.shape[axis]},) for axis {axis} of a weight of "
            f"shape {tuple(weight.shape)}, got {tuple(scale.shape)}"
        )
    w = weight.detach().contiguous()
    if bits <= _TORCH_OP_MAX_BITS:
        zero = torch.zeros(scale.shape, dtype=torch.int32, device=w.device)
        out = torch.fake_quantize_per_channel_affine(
            w.to(torch.float32), scale, zero, axis, q_min, q_max
        )
    else:
        out = dequantize_per_channel(quantize_per_channel(w, scale, bits, axis), scale, axis)
    return out.to(weight.dtype)


# ----------------------------------------------------------------------------- biases


def bias_scale(act_scale: float, weight_scale: torch.Tensor) -> torch.Tensor:
    """The accumulator grid of a layer, ``float32(s_x) * s_w[c]`` in float32 (per channel)."""
    return torch.tensor(act_scale, dtype=torch.float32) * weight_scale.detach().to(torch.float32)


def bias_overflow(
    bias: torch.Tensor, act_scale: float, weight_scale: torch.Tensor, bits: int = 32
) -> int:
    """How many bias values lie beyond the ``bits``-bit accumulator grid: ``|round(b / s)| >
    2^(b-1) - 1`` with ``s = bias_scale(...)``. :func:`fake_quantize_bias` would clamp them; a
    layer whose input range is tiny (``s_x`` near 0) clamps every bias toward 0 and its outputs
    are then wrong, which is never to pass silently."""
    scale = bias_scale(act_scale, weight_scale).to(bias.device).to(torch.float64)
    q = torch.round(bias.detach().to(torch.float64) / scale)
    return int((q.abs() > 2 ** (bits - 1) - 1).sum())


def quantize_bias(
    bias: torch.Tensor, act_scale: float, weight_scale: torch.Tensor, bits: int = 32
) -> torch.Tensor:
    """The integer bias ``clamp(round(b / s), -(2^(b-1) - 1), 2^(b-1) - 1)`` (int64, division
    in float64, round half to even) on the accumulator grid ``s = bias_scale(...)``."""
    _check_float(bias, "bias")
    if isinstance(bits, bool) or not isinstance(bits, int) or not 8 <= bits <= 32:
        raise ValueError(f"bias bits must be an int in 8..32, got {bits!r}")
    scale = bias_scale(act_scale, weight_scale).to(bias.device)
    if scale.shape != bias.shape:
        raise ValueError(
            f"bias of shape {tuple(bias.shape)} needs one weight scale per channel, got "
            f"{tuple(weight_scale.shape)}"
        )
    q_max = 2 ** (bits - 1) - 1
    q = torch.round(bias.detach().to(torch.float64) / scale.to(torch.float64))
    return q.clamp_(-q_max, q_max).to(torch.int64)


def dequantize_bias(q: torch.Tensor, act_scale: float, weight_scale: torch.Tensor) -> torch.Tensor:
    """``float32(q) * s`` (float32): the value an integer runtime adds (ONNX
    ``DequantizeLinear`` of the int32 bias); an integer 0 gives +0.0, never -0.0."""
    scale = bias_scale(act_scale, weight_scale).to(q.device)
    return q.to(torch.float32) * scale + 0.0


def fake_quantize_bias(
    bias: torch.Tensor, act_scale: float, weight_scale: torch.Tensor, bits: int = 32
) -> torch.Tensor:
    """The bias on the accumulator grid: ``dequantize_bias(quantize_bias(...))``, returned in
    the dtype of ``bias``."""
    q = quantize_bias(bias, act_scale, weight_scale, bits)
    return dequantize_bias(q, act_scale, weight_scale).to(bias.dtype)


# ----------------------------------------------------------------------------- activations


def activation_qparams(lo: float, hi: float, bits: int) -> tuple[float, int]:
    """Asymmetric per-tensor ``(scale, zero_point)`` for the range ``[lo, hi]``.

    The range is widened to contain 0 (``lo' = min(lo, 0)``, ``hi' = max(hi, 0)``), then
    ``s = (hi' - lo') / (2^b - 1)`` in float32 and ``z = clamp(round(-lo' / s), 0, 2^b - 1)``.
    An all-zero range gives ``(1.0, 0)``. The scale is returned as the Python float of its
    float32 value, so every consumer uses the same number.
    """
    _, q_max = activation_qrange(bits)
    lo, hi = float(lo), float(hi)
    if not (torch.isfinite(torch.tensor(lo)) and torch.isfinite(torch.tensor(hi))):
        raise ValueError(f"activation range must be finite, got [{lo}, {hi}]")
    if lo > hi:
        raise ValueError(f"activation range must have lo <= hi, got [{lo}, {hi}]")
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = torch.tensor((hi - lo) / q_max, dtype=torch.float32)
    if not bool(scale > torch.finfo(torch.float32).tiny):
        return 1.0, 0
    zero_point = int(torch.round(torch.tensor(-lo, dtype=torch.float32) / scale).clamp(0, q_max))
    return float(scale), zero_point


def quantize_per_tensor(x: torch.Tensor, scale: float, zero_point: int, bits: int) -> torch.Tensor:
    """Integers ``clamp(round(x * (1/s)) + z, 0, 2^b - 1)`` (int32)."""
    _check_float(x, "x")
    q_min, q_max = activation_qrange(bits)
    inv = float(_inverse_scale(torch.tensor(scale)))
    xf = x.detach().contiguous().to(torch.float32)
    return (torch.round(xf * inv) + zero_point).clamp_(q_min, q_max).to(torch.int32)


def dequantize_per_tensor(q: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """Floats ``(q - z) * s`` (float32)."""
    return (q.to(torch.float32) - zero_point) * torch.tensor(scale, dtype=torch.float32)


def fake_quantize_per_tensor(
    x: torch.Tensor, scale: float, zero_point: int, bits: int
) -> torch.Tensor:
    """``dequantize_per_tensor(quantize_per_tensor(x))`` in the dtype of ``x``; differentiable
    through the straight-through estimator for ``bits <= 8`` (the torch op) and not above.

    Uses ``torch.fake_quantize_per_tensor_affine`` for ``bits <= 8`` and a bit-identical own
    equivalent above; the input is made contiguous first (pytorch #75009).
    """
    _check_float(x, "x")
    q_min, q_max = activation_qrange(bits)
    if not q_min <= zero_point <= q_max:
        raise ValueError(
            f"zero_point must be in [{q_min}, {q_max}] for {bits} bits, got {zero_point}"
        )
    x = x.contiguous()
    if bits <= _TORCH_OP_MAX_BITS:
        out = torch.fake_quantize_per_tensor_affine(
            x.to(torch.float32), float(scale), int(zero_point), q_min, q_max
        )
    else:
        out = fake_quantize_per_tensor_fast(
            x.to(torch.float32), *_own_params(scale, zero_point, bits)
        )
    return out.to(x.dtype)


def _own_params(scale: float, zero_point: int, bits: int) -> tuple[float, float, int, int, int]:
    inv = float(_inverse_scale(torch.tensor(scale)))
    q_min, q_max = activation_qrange(bits)
    return float(scale), inv, int(zero_point), q_min, q_max


def fake_quantize_per_tensor_fast(
    x: torch.Tensor,
    scale: float,
    inv_scale: float,
    zero_point: int,
    q_min: int,
    q_max: int,
    *,
    inplace: bool = False,
) -> torch.Tensor:
    """The per-tensor fake-quant arithmetic with precomputed constants, in fused in-place steps.

    ``(clamp(round(x * inv_scale) + z, q_min, q_max) - z) * scale``; ``inv_scale`` must be
    ``float32(1 / scale)``. Bit-identical to ``torch.fake_quantize_per_tensor_affine``; used by
    the quantized layers' forward (no autograd mask is built) and for ``bits > 8``.

    With ``inplace=True`` a contiguous ``x`` is overwritten with the result and returned (no
    allocation: on CPU a fresh output costs more than the arithmetic, as its pages are first
    touched); the caller must own ``x``. A non-contiguous ``x`` is copied either way.
    """
    # clamp(round(y) + z, q_min, q_max) - z == clamp(round(y), q_min - z, q_max - z) exactly
    # (integers are exact in float32 up to 2^24): four passes over memory instead of six.
    y = x.contiguous()
    if inplace or y is not x:
        y.mul_(inv_scale)  # y is x itself (owned by the caller) or a fresh contiguous copy
    else:
        y = x * inv_scale
    return y.round_().clamp_(q_min - zero_point, q_max - zero_point).mul_(scale)
