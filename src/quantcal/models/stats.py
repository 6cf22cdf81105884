"""Efficiency columns of every report: parameters, MACs and weight storage of a model.

MACs are counted by PyTorch's own ``torch.utils.flop_counter.FlopCounterMode`` on an eval-mode
forward of one image: it counts 2 FLOPs per multiply-accumulate of convolutions and matrix
products (Linear), and nothing for BN, activations, pooling or element-wise adds, so
MACs = FLOPs / 2 (the convention of the papers' "FLOPs" columns).

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
from torch.utils.flop_counter import FlopCounterMode

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


def count_macs(model: nn.Module, example: torch.Tensor) -> int:
    """MACs of ``model(example)`` by FlopCounterMode (FLOPs / 2), run in eval mode, no grad.

    The model's train/eval flags are restored afterwards.
    """
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
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
        bops = int(plan_cost(costs, plan, "bops"))
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
