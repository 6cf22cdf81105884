"""What a mixed-precision plan costs: per-layer weight elements, output channels and MACs
(:func:`layer_costs`) and a plan's weight bytes or BOPs over them (:func:`plan_cost`).

Weight bytes count each quantized layer's weight at its bits, rounded up per tensor, plus one fp32
scale per output channel; BOPs are Σ MACs · weight bits · activation bits per image (Baskin et
al. 2021).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["COSTS", "LayerCost", "layer_costs", "plan_cost"]

COSTS = ("weight_bytes", "bops")


@dataclass(frozen=True)
class LayerCost:
    """A quantized layer's weight elements, output channels and MACs per image."""

    params: int
    out_channels: int
    macs: int


def layer_costs(deploy: nn.Module, example: torch.Tensor) -> dict[str, LayerCost]:
    """Per quantizable layer of a deploy-form (or quantized) model: weight elements, output
    channels and MACs for one image of ``example``'s shape (conv: output elements times
    ``C_in / groups · prod(kernel)``; linear: output elements times ``in_features``)."""
    from quantcal.quant.layers import QuantizedLayer

    costs: dict[str, LayerCost] = {}
    handles = []

    def hook(name: str):
        def fn(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            w = module.weight
            # each output element costs one weight row: C_in/groups * prod(kernel) for a conv,
            # in_features for a linear
            macs = out[0].numel() * w[0].numel()
            costs[name] = LayerCost(int(w.numel()), int(w.shape[0]), int(macs))

        return fn

    for name, m in deploy.named_modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, QuantizedLayer)):
            handles.append(m.register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            deploy(example[:1])
    finally:
        for h in handles:
            h.remove()
    return costs


def _weight_bytes(c: LayerCost, w: int) -> float:
    return c.params * 4 if w >= 32 else math.ceil(c.params * w / 8) + 4 * c.out_channels


def plan_cost(
    costs: dict[str, LayerCost], plan: dict[str, tuple[int, int]], kind: str = "weight_bytes"
) -> float:
    """The plan's cost over the quantized layers: ``weight_bytes`` (weights at their bits plus
    per-channel fp32 scales) or ``bops`` (Σ MACs · w · a per image)."""
    if kind not in COSTS:
        raise ValueError(f"unknown cost {kind!r}; choose one of {', '.join(COSTS)}")
    if kind == "weight_bytes":
        return float(sum(_weight_bytes(c, plan[n][0]) for n, c in costs.items()))
    return float(sum(c.macs * plan[n][0] * plan[n][1] for n, c in costs.items()))
