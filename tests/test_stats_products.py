"""MACs and BOPs of products of two activations (attention's Q·Kᵀ and A·V): PyTorch's counter
misses the fused CPU attention kernel, and a quantized product costs a·a bit operations."""

from __future__ import annotations

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from quantcal import models, quant
from quantcal.models.deploy import to_deploy
from quantcal.models.stats import count_macs, describe, product_macs
from quantcal.quant.plan_costs import layer_costs


class _SDPA(nn.Module):
    def __init__(self, explicit: bool) -> None:
        super().__init__()
        self.explicit = explicit
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, N, 8) -> 2 heads of 4
        q = self.proj(x).unflatten(-1, (2, 4)).transpose(1, 2)
        if self.explicit:
            a = (q @ q.transpose(-1, -2) / 2.0).softmax(-1)
            return a @ q
        return F.scaled_dot_product_attention(q, q, q)


@torch.fx.wrap
def _opaque_product(x: torch.Tensor) -> torch.Tensor:
    return x @ x.transpose(-1, -2)


class _Hidden(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, 6)
        y = self.proj(x)
        return _opaque_product(y) + (y @ y.transpose(-1, -2))


def test_count_macs_counts_the_fused_attention_kernel_as_two_products():
    x = torch.randn(3, 10, 8)
    fused, explicit = count_macs(_SDPA(False), x), count_macs(_SDPA(True), x)
    by_hand = 3 * 10 * 8 * 8 + 2 * (3 * 2 * 10 * 10 * 4)  # linear + Q·Kᵀ + A·V
    assert fused == explicit == by_hand


def test_product_macs_splits_graph_code_from_opaque_calls():
    x = torch.randn(2, 5, 6)
    gm = torch.fx.symbolic_trace(_Hidden())
    one = 2 * 5 * 5 * 6
    assert product_macs(gm, x) == (one, one)  # the wrapped call is opaque, the other is not
    assert product_macs(_Hidden(), x) == (0, 2 * one)  # untraced: every call is in Python code
    with torch.no_grad():  # a product with a parameter operand is a weight computation
        w = nn.Parameter(torch.randn(6, 6))
        mod = nn.Module()
        mod.w = w
        mod.forward = lambda t: t @ mod.w
        assert product_macs(mod, x) == (0, 0)


@pytest.mark.parametrize("matmuls", [True, False])
def test_bops_charge_products_at_activation_bits(matmuls):
    model = models.create_model("ablation_attention", num_classes=10, width=0.25, seed=0)
    deploy = to_deploy(model)
    example = torch.zeros(1, 3, 32, 32)
    config = quant.QuantConfig(weight_bits=4, act_bits=8, quantize_matmuls=matmuls)
    stats = describe(deploy, 32, in_chans=3, config=config)
    layers = sum(c.macs for c in layer_costs(deploy, example).values())
    d = model.attention_channels
    products = 3 * 2 * 64 * 64 * d  # three attention units over 8x8 positions
    assert stats.macs == layers + products
    assert stats.bops == layers * 4 * 8 + products * (8 * 8 if matmuls else 32 * 32)
    base = describe(to_deploy(models.create_model("ablation_base", num_classes=10, width=0.25)))
    assert base.bops == base.macs * 32 * 32  # fp32 default: every MAC at 32 x 32
