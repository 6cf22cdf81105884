"""Efficiency columns of every report: parameters, MACs and weight storage of a model.

MACs are counted by PyTorch's own ``torch.utils.flop_counter.FlopCounterMode`` on an eval-mode
forward of one image: it counts 2 FLOPs per multiply-accumulate of convolutions and matrix
products (Linear, and the products of two activations, Q·Kᵀ and A·V, of attention), and nothing
for BN, activations, softmax, pooling or element-wise adds, so MACs = FLOPs / 2 (the convention
of the papers' "FLOPs" columns). PyTorch's counter has no formula for the fused CPU kernel of
``F.scaled_dot_product_attention``
(``aten._scaled_dot_product_flash_attention_for_cpu``) and counted 0 for it (PyTorch 2.13);
:func:`count_macs` gives that kernel PyTorch's own formula for the other fused kernels
(``sdpa_flop_count``: 2·B·H·N·S·(d + d_v) FLOPs).

Bit operations (BOPs, Baskin et al. 2021) of one image: Σ MACs · w · a over the conv/linear
layers at each layer's bits, plus the products of two activations (:func:`product_macs`: Q·Kᵀ
and A·V of attention) at p · p bits where ``QuantConfig.quantize_matmuls`` quantizes them (both
operands at ``QuantConfig.product_bits``, the activation bits unless ``matmul_bits`` says
otherwise), and at 32 · 32 otherwise or where they run inside a block the
quantizer leaves opaque (named fp32 in the coverage).

Weight storage at ``weight_bits`` = b (the PTQ scheme of the study, REFERENCE.md §5):
- the weight of every Conv/Linear layer takes b bits per element, rounded up to whole bytes per
  tensor, plus one fp32 scale per output channel when b < 32 (symmetric per-channel: no zero-point);
- every other parameter (biases, BN affine) takes 32 bits; buffers (BN running statistics) are
  not counted: they are folded into the convs in the deploy form.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

_QUANTIZED_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass(frozen=True)
class ModelStats:
    """Size and cost of a model for one (in_chans, image_size, image_size) input."""

    params: int  # all parameters
    macs: int  # multiply-accumulates of one image (FLOPs / 2)
    weight_bytes: int  # storage at weight_bits, rule in the module docstring
    weight_bits: int
    quantized_params: int  # elements of Conv/Linear weights (the ones stored at weight_bits)
    image_size: int
    in_chans: int
    #: bit operations of one image, Σ MACs · weight bits · activation bits over the conv/linear
    #: layers (Baskin et al. 2021); None when the activation bits are not known
    bops: int | None = None

    @property
    def mparams(self) -> float:
        """Parameters in millions."""
        return self.params / 1e6

    @property
    def mmacs(self) -> float:
        """MACs in millions."""
        return self.macs / 1e6

    def as_dict(self) -> dict[str, Any]:
        """Plain dict of the fields (for result rows)."""
        return asdict(self)


def weight_storage_bytes(model: nn.Module, weight_bits: int) -> tuple[int, int]:
    """(bytes, quantized element count) of ``model``'s parameters at ``weight_bits``."""
    quantized: dict[int, torch.Tensor] = {}
    for m in model.modules():
        if isinstance(m, _QUANTIZED_LAYERS):
            quantized[id(m.weight)] = m.weight
    total = 0
    for p in model.parameters():
        if id(p) in quantized:
            if weight_bits >= 32:
                total += p.numel() * 4
            else:
                total += math.ceil(p.numel() * weight_bits / 8) + p.shape[0] * 4
        else:
            total += p.numel() * 4
    return total, sum(p.numel() for p in quantized.values())


def _cpu_sdpa_flops(q_shape, k_shape, v_shape, *args: Any, out_shape: Any = None, **kw: Any) -> int:
    return sdpa_flop_count(q_shape, k_shape, v_shape)


def _custom_flops() -> dict[Any, Any]:
    """Formulas FlopCounterMode lacks: the fused CPU attention kernel (module docstring)."""
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    return {} if op is None else {op: _cpu_sdpa_flops}


#: torch functions that multiply two tensors as a matrix product (a product of two activations
#: unless an operand is a parameter)
_PRODUCTS = frozenset(
    {"matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "einsum", "scaled_dot_product_attention"}
)


class _ProductCount(torch.overrides.TorchFunctionMode):
    """MACs of products of two activations, split by where they run: in a traced graph's
    code (quantizable) or inside an opaque function or leaf module."""

    def __init__(self) -> None:
        super().__init__()
        self.graph = 0
        self.opaque = 0
        self.depth = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (
            self.depth
            or getattr(func, "__name__", "") not in _PRODUCTS
            or any(isinstance(a, nn.Parameter) for a in (*args, *kwargs.values()))
        ):
            return func(*args, **kwargs)
        from quantcal.quant.runtime_count import caller_site

        inside_opaque = caller_site() is not None
        self.depth += 1
        try:
            counter = FlopCounterMode(display=False, custom_mapping=_custom_flops())
            with counter:
                out = func(*args, **kwargs)
        finally:
            self.depth -= 1
        macs = counter.get_total_flops() // 2
        if inside_opaque:
            self.opaque += macs
        else:
            self.graph += macs
        return out


def product_macs(model: nn.Module, example: torch.Tensor) -> tuple[int, int]:
    """(MACs of products of two activations in the traced graph's own code, MACs of those
    inside opaque functions or leaf modules) of ``model(example)``, eval mode, no grad.

    A product is a matmul/bmm/einsum/``scaled_dot_product_attention`` call none of whose
    operands is a parameter. For a deploy-form ``GraphModule`` the first are the products the
    quantizer replaces with quantized ones; for an untraced module every call is in the
    second."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    mode = _ProductCount()
    try:
        with torch.no_grad(), mode:
            model(example)
    finally:
        for m, training in modes.items():
            m.train(training)
    return mode.graph, mode.opaque


def count_macs(model: nn.Module, example: torch.Tensor) -> int:
    """MACs of ``model(example)`` by FlopCounterMode (FLOPs / 2), run in eval mode, no grad.

    The model's train/eval flags are restored afterwards.
    """
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        counter = FlopCounterMode(display=False, custom_mapping=_custom_flops())
        with torch.no_grad(), counter:
            model(example)
    finally:
        for m, training in modes.items():
            m.train(training)
    return counter.get_total_flops() // 2


def describe(
    model: nn.Module,
    image_size: int | None = None,
    *,
    in_chans: int | None = None,
    weight_bits: int = 32,
    config: Any = None,
) -> ModelStats:
    """Parameters, MACs of one image and weight bytes at ``weight_bits`` (see module docstring).

    ``image_size`` and ``in_chans`` default to the model's ``image_size``/``in_chans``
    attributes (set by :func:`~quantcal.models.create_model`); pass them for other modules.
    With ``config`` (a ``quant.QuantConfig``, a mixed plan included; ``model`` then in its
    deploy form, whose layer names the plan uses), weight bytes and BOPs follow each layer's
    bits and ``weight_bits`` is ignored; without it, BOPs are given for fp32 (32 x 32) only.
    """
    if image_size is None:
        image_size = getattr(model, "image_size", None)
    if in_chans is None:
        in_chans = getattr(model, "in_chans", None)
    for name, value in (("image_size", image_size), ("in_chans", in_chans)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(
                f"describe needs a positive int {name}; got {value!r}. Pass {name}=... for "
                "models not built by create_model."
            )
    bad = isinstance(weight_bits, bool) or not isinstance(weight_bits, int)
    if bad or not 1 <= weight_bits <= 32:
        raise ValueError(
            f"weight_bits must be an int in [1, 32] (e.g. 8 or 4), got {weight_bits!r}"
        )
    ref = next(model.parameters(), None)
    example = torch.zeros(
        1,
        in_chans,
        image_size,
        image_size,
        device=ref.device if ref is not None else None,
        dtype=ref.dtype if ref is not None else None,
    )
    bops = None
    if config is not None:
        from quantcal.quant.plan import layer_costs, plan_cost

        costs = layer_costs(model, example)
        plan = {n: config.bits_of(n) for n in costs}
        w32, quantized = weight_storage_bytes(model, 32)
        other = w32 - 4 * sum(c.params for c in costs.values())
        weight_bytes = int(other + plan_cost(costs, plan, "weight_bytes"))
        graph_products, opaque_products = product_macs(model, example)
        product_bits = config.product_bits**2 if config.quantize_matmuls else 32 * 32
        bops = int(plan_cost(costs, plan, "bops"))
        bops += graph_products * product_bits + opaque_products * 32 * 32
        weight_bits = config.weight_bits
    else:
        weight_bytes, quantized = weight_storage_bytes(model, weight_bits)
    macs = count_macs(model, example)
    if bops is None and weight_bits == 32:
        bops = macs * 32 * 32
    return ModelStats(
        params=sum(p.numel() for p in model.parameters()),
        macs=macs,
        weight_bytes=weight_bytes,
        weight_bits=weight_bits,
        quantized_params=quantized,
        image_size=image_size,
        in_chans=in_chans,
        bops=bops,
    )
