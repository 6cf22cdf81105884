"""Multi-head self-attention for the hybrid families and the ablation's attention unit.

One computation (Vaswani et al., NeurIPS 2017, §3.2.2) in two layouts:

    head_i = softmax(Q_i K_iᵀ / √d) V_i,   Q = x W_q + b_q, K = x W_k + b_k, V = x W_v + b_v,
    MHSA(x) = concat(head_1, ..., head_h) W_o + b_o,

with h heads of d = C / h channels each. :class:`TokenAttention` takes tokens (B, N, C) with
``nn.Linear`` projections (ViT, Dosovitskiy et al. 2021; MobileViT's transformer, Mehta &
Rastegari 2022; EfficientFormer's Meta3D block, Li et al. 2022); :class:`ConvAttention` takes a
feature map (B, C, H, W) with 1x1 ``nn.Conv2d`` projections, the N = H·W positions as tokens
(BoTNet's MHSA, Srinivas et al., CVPR 2021), so a BatchNorm after its output projection folds.

The products go through ``F.scaled_dot_product_attention`` (one fused kernel in training);
:mod:`quantcal.quant.attention` decomposes it into Q·Kᵀ, the scale, a float softmax and A·V,
each product quantized on both operands, and :func:`quantcal.models.stats.count_macs` counts
its two products (2·N²·C multiply-accumulates per image), which PyTorch's counter misses on CPU.
Both modules are ``torch.fx``-traceable (shape-free reshapes only).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ConvAttention", "TokenAttention", "attend", "attention_macs", "heads_for"]


def heads_for(channels: int, head_dim: int = 16, max_heads: int = 8) -> int:
    """Heads for ``channels``: ``channels // head_dim`` clipped to [1, max_heads], lowered to the
    nearest divisor of ``channels`` (so every head has the same width)."""
    h = max(1, min(max_heads, channels // head_dim))
    while channels % h:
        h -= 1
    return h


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head attention of tokens (B, N, C) -> (B, N, C): split C into ``heads`` groups,
    softmax(Q Kᵀ / √d) V per group, concatenate."""
    q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).flatten(2)


def attention_macs(tokens: int, channels: int, value_channels: int | None = None) -> int:
    """Multiply-accumulates of the two products of one image: Q·Kᵀ (N·N·C) and A·V (N·N·C_v)."""
    cv = channels if value_channels is None else value_channels
    return tokens * tokens * (channels + cv)


class TokenAttention(nn.Module):
    """MHSA on tokens (B, N, C): ``qkv`` Linear(C, 3C), :func:`attend`, ``proj`` Linear(C, C)."""

    def __init__(self, channels: int, heads: int) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(f"{channels} channels do not split into {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.proj(attend(q, k, v, self.heads))


class ConvAttention(nn.Module):
    """BoTNet's MHSA on a feature map (B, C, H, W): a learned absolute position embedding
    (1, C, H, W) added to the input (ViT's, on the grid; BoTNet uses relative logits), ``qkv``
    Conv2d(C, 3D, 1) (D = ``inner``, default C), :func:`attend` over the H·W positions, ``proj``
    Conv2d(D, C, 1, bias=False) (the caller's BatchNorm follows it and folds into it). ``size``
    is (H, W), fixed at build."""

    def __init__(
        self, channels: int, heads: int, size: tuple[int, int], *, inner: int | None = None
    ) -> None:
        super().__init__()
        inner = channels if inner is None else inner
        if inner < 1 or inner % heads:
            raise ValueError(f"{inner} attention channels do not split into {heads} heads")
        self.heads = heads
        self.size = tuple(size)
        self.pos = nn.Parameter(torch.zeros(1, channels, *self.size))
        self.init_weights()
        self.qkv = nn.Conv2d(channels, 3 * inner, 1)
        self.proj = nn.Conv2d(inner, channels, 1, bias=False)

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Position embedding ~ N(0, 0.02²) clipped at ±2σ (ViT's); ``create_model`` calls this
        with its seeded generator after the generic init."""
        self.pos.copy_(
            torch.randn(self.pos.shape, generator=generator).mul_(0.02).clamp_(-0.04, 0.04)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x + self.pos).flatten(2).transpose(1, 2).chunk(3, dim=-1)
        out = attend(q, k, v, self.heads)  # (B, N, C)
        # contiguous: a strided view must not reach a (fake-quantized) conv (pytorch #75009)
        return self.proj(out.transpose(1, 2).unflatten(2, self.size).contiguous())
