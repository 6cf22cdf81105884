"""Hybrid convolution + self-attention families, CIFAR form: MobileViT-XXS (Mehta & Rastegari,
"MobileViT: Light-weight, General-purpose, and Mobile-friendly Vision Transformer", ICLR 2022,
arXiv 2110.02178) and EfficientFormer-L1 (Li et al., "EfficientFormer: Vision Transformers at
MobileNet Speed", NeurIPS 2022, arXiv 2206.01191).

Both use the shared multi-head self-attention :class:`~quantcal.models._attention.TokenAttention`
(``qkv`` Linear, ``F.scaled_dot_product_attention``, ``proj`` Linear), so
:mod:`quantcal.quant.attention` quantizes their products Q·Kᵀ and A·V and
:func:`~quantcal.models.stats.count_macs` counts them (2·N²·C multiply-accumulates per
attention of N tokens of C channels). Every reshape uses sizes fixed at build time from
``image_size`` (shape-free ``flatten``/``unflatten``/``permute``), so both trace with
``torch.fx``; BatchNorm only follows a Conv2d, so :func:`~quantcal.models.deploy.to_deploy`
folds every one; LayerNorm, SiLU, GELU and softmax stay in float.

**MobileViT-XXS** (paper Table 4 and Appendix A; timm's ``mobilevit_xxs`` layout): 3x3 stem conv
to 16 + BN + SiLU; MV2 (MobileNetV2 inverted residual, expansion 2 for XXS, SiLU) to 16; three
MV2 to 24 (the first strided in the ImageNet form); then three stages, each one strided MV2 to C
followed by a MobileViT block with transformer width d and L layers: (C, d, L) = (48, 64, 2),
(64, 80, 4), (80, 96, 3); 1x1 conv to 320 + BN + SiLU; global average pool; Linear. The
MobileViT block: 3x3 conv C->C + BN + SiLU, 1x1 conv C->d (no bias, no BN, as in the paper's
code); unfold into patches of ph x pw pixels, tokens (B·P, N, d) with P = ph·pw pixel positions
per patch and N patches (attention runs among the N pixels at the same position in every patch);
L transformer layers ``x + Attn(LN(x))``, ``x + FFN(LN(x))`` with FFN = Linear(d,
2d)-SiLU-Linear(2d, d); LayerNorm; fold back to (B, d, H, W); 1x1 conv d->C + BN + SiLU;
concatenate with the block's input (input first); 3x3 conv 2C->C + BN + SiLU. Heads:
``heads_for(d, 16, max_heads=4)``, the paper's 4 heads at width 1 (of 16, 20 and 24 channels),
fewer where d is small.

CIFAR adaptations of MobileViT-XXS:

* strides: the ImageNet form (256x256) down-samples 5 times (stem and the first MV2 of the
  24-, 48-, 64- and 80-channel stages) to 8x8; the CIFAR form has the stem and the 24-channel
  stage at stride 1 and the three transformer stages down-sampling as
  :func:`~quantcal.models._common.downsample_strides` allows, so 32x32 gives the blocks maps of
  16, 8 and 4 (final 4x4, as the other families), 28x28: 14, 7, 4; 8x8: 8, 8, 4;
* patches: 2x2 as in the paper, except along a side that 2 does not divide (7 at 28x28), where
  the patch is 1 pixel (P = 1: every pixel is its own token, plain global attention over the
  map) rather than padding the map, which would add tokens made of padding. Token counts per
  attention at 32x32: N = 64, 16, 4 (P = 4 each); at 28x28: 49 (P = 4), 49 (P = 1), 4
  (P = 4); at 8x8: 16, 16, 4 (P = 4 each);
* the paper's ImageNet classifier has dropout before the Linear; omitted (no quantcal family
  has dropout).

**EfficientFormer-L1** (paper §3-4, its L1 configuration; timm's ``efficientformer_l1``): stem
3x3 conv to 24 + BN + ReLU, 3x3 conv to 48 + BN + ReLU; four stages of widths (48, 96, 224,
448) with (3, 2, 6, 4) blocks, a 3x3 stride-2 conv + BN between stages; every block a Meta4D
block (on the map: ``x + (AvgPool3x3(x) - x)`` with stride 1, pad 1, ``count_include_pad``
off; ``x + MLP(x)`` with MLP = 1x1 conv to 4C + BN + GELU + 1x1 conv to C + BN) except the last
block of the last stage, a Meta3D block on the flattened tokens (B, N, C): ``x + Attn(LN(x))``,
``x + MLP(LN(x))`` with MLP = Linear(C, 4C)-GELU-Linear(4C, C); LayerNorm on the tokens; the
tokens reshaped back to the map (B, C, H, W) at the end of ``features``; global average pool
(= the paper's mean over tokens); Linear. Heads: ``heads_for(C, 32, max_heads=8)``, the
paper's 8 heads at width 1.

CIFAR adaptations and simplifications of EfficientFormer-L1:

* strides: the ImageNet form has both stem convs at stride 2 (stages at 1/4 ... 1/32); the
  CIFAR form has both at stride 1 and the three between-stage convs down-sampling as
  :func:`~quantcal.models._common.downsample_strides` allows: stages at 32, 16, 8, 4 for
  32x32 (final 4x4, N = 16 tokens for the Meta3D attention), 28, 14, 7, 4 for 28x28 (N = 16)
  and 8, 8, 8, 4 for 8x8 (N = 16);
* LayerScale (learned per-channel residual gains, init 1e-5) left out: smaller and simpler,
  and with the residual branches at full gain the quantization question is about the products.
  One consequence: Meta4D's token mixer ``x + (AvgPool(x) - x)`` is then exactly ``AvgPool(x)``
  (its residual cancels; with LayerScale the block starts near the identity instead), so every
  Meta4D block smooths its input before its MLP's residual;
* the attention's learned relative-position bias left out: same reason (a bias added to Q·Kᵀ
  before the softmax is a float addition, not a product); and the attention is the standard
  MHSA (q, k, v all C wide) rather than the paper's key width 32 and 4x wider values;
* every conv followed by a BN has no bias (the BN's shift absorbs it; the paper's code has
  both); the distillation head is left out.

Widths: every channel count c, including the transformer width d and the final 320, becomes
:func:`~quantcal.models.mobilenet.divisible_channels` of ``c * width`` (torchvision's
multiple of 8; below width 1 a count under 8 is rounded to an even number, at least 2), as in
:mod:`~quantcal.models.mobilenet`; the heads divide it by :func:`heads_for` (at least 1).

Sizes (deploy form, :func:`~quantcal.models.stats.describe` of ``to_deploy``; 32x32, 100
classes; the attention products counted):

==================  =====  ==========  ========  ======================
model               width  parameters  MACs (M)  of which products (M)
==================  =====  ==========  ========  ======================
mobilevit_xxs       0.5    258,732     23.2      2.44
mobilevit_xxs       1.0    981,068     80.2      4.89
efficientformer_l1  0.5    2,781,412   104.5     0.11
efficientformer_l1  1.0    11,053,316  413.1     0.23
==================  =====  ==========  ========  ======================

For comparison, the paper's ImageNet forms: MobileViT-XXS 1.3 M parameters (ours, deploy form
with 1000 classes: 1,269,968), EfficientFormer-L1 12.3 M (with LayerScale, the wider attention
values and the distillation head). With both stem strides removed EfficientFormer's CIFAR form
costs 5x MobileViT-XXS (its 224-channel stage alone, 6 blocks at 8x8: 154 M MACs); MobileViT's
products are 6 % of its MACs, EfficientFormer's 0.06 %.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from quantcal.models._attention import TokenAttention, heads_for
from quantcal.models._common import (
    SmallImageClassifier,
    classifier_head,
    conv_bn,
    downsample_strides,
)
from quantcal.models.mobilenet import InvertedResidual, divisible_channels
from quantcal.models.registry import register_model

__all__ = [
    "EfficientFormerL1",
    "MV2Block",
    "Meta3D",
    "Meta4D",
    "MobileViTBlock",
    "MobileViTXXS",
    "TransformerLayer",
]


def _side(size: int, stride: int) -> int:
    """Output side of a 3x3/pad-1 (or 1x1) conv with ``stride`` on a side of ``size``."""
    return math.ceil(size / stride)


class TransformerLayer(nn.Module):
    """Pre-norm transformer layer on tokens (B, N, d): ``x + Attn(LN(x))``, then
    ``x + Linear(act(Linear(LN(x))))`` with hidden width ``hidden``."""

    def __init__(self, dim: int, heads: int, hidden: int, act: type[nn.Module]) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = TokenAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), act(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class MV2Block(InvertedResidual):
    """MobileNetV2 inverted residual with SiLU (MobileViT's): [1x1 expand + BN + SiLU] -> 3x3 dw
    (stride) + BN + SiLU -> 1x1 project + BN, plus the input when stride 1 and width kept."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expansion: int) -> None:
        super().__init__(in_ch, out_ch, stride, expansion, act=nn.SiLU)


class MobileViTBlock(nn.Module):
    """MobileViT block (module docstring) on a map of ``size`` x ``size`` fixed at build: local
    3x3 conv, 1x1 to ``dim``, unfold into patches, ``depth`` transformer layers, LayerNorm, fold,
    1x1 back to ``channels``, fuse with the input by a 3x3 conv of the concatenation.

    The patch is ``patch`` pixels along each side that ``patch`` divides, else 1 pixel.
    ``tokens`` (N) and ``positions`` (P) record the attention's layout (B·P sequences of N).
    """

    def __init__(
        self, channels: int, dim: int, depth: int, size: int, patch: int = 2, mlp_ratio: int = 2
    ) -> None:
        super().__init__()
        self.patch = patch if size % patch == 0 else 1
        self.grid = size // self.patch  # patches along a side
        self.tokens = self.grid * self.grid
        self.positions = self.patch * self.patch
        self.heads = heads_for(dim, 16, max_heads=4)
        self.local = nn.Sequential(
            conv_bn(channels, channels, 3, act=nn.SiLU),
            nn.Conv2d(channels, dim, 1, bias=False),
        )
        self.transformer = nn.Sequential(
            *(TransformerLayer(dim, self.heads, mlp_ratio * dim, nn.SiLU) for _ in range(depth))
        )
        self.norm = nn.LayerNorm(dim)
        self.proj = conv_bn(dim, channels, 1, act=nn.SiLU)
        self.fusion = conv_bn(2 * channels, channels, 3, act=nn.SiLU)

    def unfold(self, x: torch.Tensor) -> torch.Tensor:
        """(B, d, H, W) -> (B·P, N, d): row-major patches, pixel position p of every patch in
        sequence p."""
        g, p = self.grid, self.patch
        x = x.unflatten(3, (g, p)).unflatten(2, (g, p))  # (B, d, gh, ph, gw, pw)
        x = x.permute(0, 3, 5, 2, 4, 1)  # (B, ph, pw, gh, gw, d)
        return x.flatten(3, 4).flatten(0, 2).contiguous()

    def fold(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`unfold`: (B·P, N, d) -> (B, d, H, W), contiguous."""
        g, p = self.grid, self.patch
        x = x.unflatten(0, (-1, p, p)).unflatten(3, (g, g))  # (B, ph, pw, gh, gw, d)
        x = x.permute(0, 5, 3, 1, 4, 2)  # (B, d, gh, ph, gw, pw)
        return x.flatten(4, 5).flatten(2, 3).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.local(x)
        y = self.fold(self.norm(self.transformer(self.unfold(y))))
        return self.fusion(torch.cat((x, self.proj(y)), 1))


class _HybridNet(SmallImageClassifier):
    """Base of the two families: :meth:`channels` scales a published channel count."""

    def channels(self, c: float) -> int:
        """``c * width`` as :func:`~quantcal.models.mobilenet.divisible_channels` rounds it (the
        small-width rule below width 1)."""
        return divisible_channels(c * self.width, small=self.width < 1)


#: MobileViT-XXS: stem, MV2 stages (channels, blocks), transformer stages (C, d, L).
MVIT_STEM = 16
MVIT_MV2 = ((16, 1), (24, 3))
MVIT_VIT = ((48, 64, 2), (64, 80, 4), (80, 96, 3))
MVIT_HEAD = 320
MVIT_EXPANSION = 2
MVIT_PATCH = 2


@register_model("mobilevit_xxs")
class MobileViTXXS(_HybridNet):
    """MobileViT-XXS (Mehta & Rastegari 2022), CIFAR form; see the module docstring.

    ``self.strides`` is (stem, 16-, 24-, 48-, 64-, 80-channel stage) strides; each MobileViT
    block records its ``patch``, ``tokens`` (N) and ``positions`` (P).
    """

    family = "mobilevit_xxs"

    def __init__(
        self, *, num_classes: int, image_size: int = 32, in_chans: int = 3, width: float = 1.0
    ) -> None:
        super().__init__(
            num_classes=num_classes, image_size=image_size, in_chans=in_chans, width=width
        )
        ch = self.channels
        self.strides = (1, 1, 1, *downsample_strides(image_size, len(MVIT_VIT)))
        side = image_size
        in_ch = ch(MVIT_STEM)
        layers: list[nn.Module] = [conv_bn(in_chans, in_ch, 3, self.strides[0], act=nn.SiLU)]
        stage = 1
        for c, n in MVIT_MV2:
            stride = self.strides[stage]
            for i in range(n):
                layers.append(MV2Block(in_ch, ch(c), stride if i == 0 else 1, MVIT_EXPANSION))
                in_ch = ch(c)
            side = _side(side, stride)
            stage += 1
        for c, d, depth in MVIT_VIT:
            stride = self.strides[stage]
            layers.append(MV2Block(in_ch, ch(c), stride, MVIT_EXPANSION))
            in_ch = ch(c)
            side = _side(side, stride)
            layers.append(MobileViTBlock(in_ch, ch(d), depth, side, MVIT_PATCH))
            stage += 1
        head = ch(MVIT_HEAD)
        layers.append(conv_bn(in_ch, head, 1, act=nn.SiLU))
        self.features = nn.Sequential(*layers)
        self.classifier = classifier_head(head, num_classes)


class Meta4D(nn.Module):
    """EfficientFormer's Meta4D block on a map (B, C, H, W): ``x + (AvgPool3x3(x) - x)`` then
    ``x + BN(conv1x1(GELU(BN(conv1x1(x)))))`` with hidden width ``mlp_ratio * C``."""

    def __init__(self, channels: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        hidden = mlp_ratio * channels
        self.pool = nn.AvgPool2d(3, 1, 1, count_include_pad=False)
        self.mlp = nn.Sequential(
            *conv_bn(channels, hidden, 1), nn.GELU(), *conv_bn(hidden, channels, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + (self.pool(x) - x)
        return x + self.mlp(x)


class Meta3D(nn.Module):
    """EfficientFormer's Meta3D block on a map of ``size`` x ``size`` fixed at build: flattened
    to tokens (B, N, C), ``x + Attn(LN(x))``, ``x + MLP(LN(x))`` (Linear-GELU-Linear, hidden
    ``mlp_ratio * C``), then the final LayerNorm (``norm``, the paper's norm before the head),
    and back to the map (B, C, H, W). ``tokens`` is N."""

    def __init__(self, channels: int, size: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.size = size
        self.tokens = size * size
        self.heads = heads_for(channels, 32, max_heads=8)
        self.block = TransformerLayer(channels, self.heads, mlp_ratio * channels, nn.GELU)
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.norm(self.block(x.flatten(2).transpose(1, 2)))  # (B, N, C)
        return t.transpose(1, 2).unflatten(2, (self.size, self.size)).contiguous()


#: EfficientFormer-L1: stage widths and depths; the last block of the last stage is Meta3D.
EFF_WIDTHS = (48, 96, 224, 448)
EFF_DEPTHS = (3, 2, 6, 4)
EFF_MLP_RATIO = 4


@register_model("efficientformer_l1")
class EfficientFormerL1(_HybridNet):
    """EfficientFormer-L1 (Li et al. 2022), CIFAR form; see the module docstring.

    ``self.strides`` is (stem conv 1, stem conv 2, down-sampling before stages 2, 3, 4).
    """

    family = "efficientformer_l1"

    def __init__(
        self, *, num_classes: int, image_size: int = 32, in_chans: int = 3, width: float = 1.0
    ) -> None:
        super().__init__(
            num_classes=num_classes, image_size=image_size, in_chans=in_chans, width=width
        )
        ch = self.channels
        self.strides = (1, 1, *downsample_strides(image_size, len(EFF_WIDTHS) - 1))
        widths = tuple(ch(c) for c in EFF_WIDTHS)
        stem = ch(EFF_WIDTHS[0] / 2)
        side = image_size
        layers: list[nn.Module] = [
            conv_bn(in_chans, stem, 3, self.strides[0], act=True),
            conv_bn(stem, widths[0], 3, self.strides[1], act=True),
        ]
        side = _side(_side(side, self.strides[0]), self.strides[1])
        for i, (c, depth) in enumerate(zip(widths, EFF_DEPTHS)):
            if i:
                stride = self.strides[1 + i]
                layers.append(conv_bn(widths[i - 1], c, 3, stride))
                side = _side(side, stride)
            last = i == len(widths) - 1
            layers.extend(Meta4D(c, EFF_MLP_RATIO) for _ in range(depth - last))
            if last:
                layers.append(Meta3D(c, side, EFF_MLP_RATIO))
        self.features = nn.Sequential(*layers)
        self.classifier = classifier_head(widths[-1], num_classes)
