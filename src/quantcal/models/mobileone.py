"""MobileOne-S0 (Vasu et al., "MobileOne: An Improved One millisecond Mobile Backbone", CVPR 2023).

Train-time form, in the style of timm's ``byobnet.MobileOneBlock``: each block sums k conv+BN
branches, a 1x1 conv+BN "scale" branch (only when the kernel is larger than 1) and a BN-only
skip (only when the shape is kept), then ReLU. :meth:`MobileOneBlock.reparameterize` returns the
equivalent single conv (the deploy form).

S0: width multipliers (0.75, 1, 1, 2), so stem 48 and stages of 48 / 128 / 256 / 1024 channels
with 2 / 8 / 10 / 1 blocks; each block is a 3x3 depthwise MobileOneBlock followed by a 1x1
pointwise one, both with k = 4 branches; the stem has 1 conv branch. Global average pool, Linear.
100 classes, 32x32: 4.37 M parameters train-time, 1.16 M and 85.6 M MACs deployed (REFERENCE.md).

Size adaptation: the ImageNet form down-samples in the stem and in all four stages. The 32x32
form (the reference) has stem stride 1 and first stage stride 1, so stages 2-4 take 32 -> 16 ->
8 -> 4. For other sizes stages 2-4 use :func:`~quantcal.models._common.downsample_strides`
(``min_final=4``): the earliest of them turn into stride 1 while the final map would otherwise
fall below 4x4 (28 -> 14 -> 7 -> 4; 16: strides (1, 2, 2); 8: (1, 1, 2)). ``width`` scales all
channel counts (stem included), rounded to the nearest integer (at least 1).
"""

from __future__ import annotations

import torch
from torch import nn

from quantcal.models._common import (
    SmallImageClassifier,
    classifier_head,
    conv_bn,
    downsample_strides,
    round_channels,
)
from quantcal.models.registry import register_model

S0_STEM = 48
S0_STAGES: tuple[tuple[int, int], ...] = ((48, 2), (128, 8), (256, 10), (1024, 1))
S0_BRANCHES = 4


def fuse_conv_bn_weights(
    kernel: torch.Tensor, bn: nn.BatchNorm2d
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold an eval-mode BN into a bias-free conv kernel.

    Returns (W * t, beta - mu * t) with t = gamma / sqrt(var + eps) per output channel.
    """
    std = (bn.running_var + bn.eps).sqrt()
    t = bn.weight / std
    return kernel * t.reshape(-1, 1, 1, 1), bn.bias - bn.running_mean * t


class MobileOneBlock(nn.Module):
    """One MobileOne block: sum of ``num_branches`` kxk conv+BN branches, a 1x1 conv+BN scale
    branch (kernel_size > 1) and a BN skip (in == out and stride 1), then ReLU.

    Args mirror ``nn.Conv2d`` (padding is kernel_size // 2, ``groups`` divides both widths).
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        num_branches: int = 1,
    ) -> None:
        super().__init__()
        self.in_ch, self.out_ch = in_ch, out_ch
        self.kernel_size, self.stride, self.groups = kernel_size, stride, groups
        self.conv_kxk = nn.ModuleList(
            conv_bn(in_ch, out_ch, kernel_size, stride, groups) for _ in range(num_branches)
        )
        self.conv_scale = conv_bn(in_ch, out_ch, 1, stride, groups) if kernel_size > 1 else None
        self.identity = nn.BatchNorm2d(in_ch) if in_ch == out_ch and stride == 1 else None
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv_kxk[0](x)
        for branch in self.conv_kxk[1:]:
            out = out + branch(x)
        if self.conv_scale is not None:
            out = out + self.conv_scale(x)
        if self.identity is not None:
            out = out + self.identity(x)
        return self.act(out)

    def _identity_kernel(self, like: torch.Tensor) -> torch.Tensor:
        """A grouped kxk kernel whose conv is the identity: 1 at the centre of channel i's own
        input (index i mod in_ch/groups within its group)."""
        per_group = self.in_ch // self.groups
        k = self.kernel_size
        kernel = torch.zeros(self.in_ch, per_group, k, k, dtype=like.dtype, device=like.device)
        idx = torch.arange(self.in_ch, device=like.device)
        kernel[idx, idx % per_group, k // 2, k // 2] = 1.0
        return kernel

    @torch.no_grad()
    def fused_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The single (kernel, bias) equal to the branches in eval mode (Vasu et al. 2023, §3)."""
        ref = self.conv_kxk[0][0].weight
        kernel = torch.zeros_like(ref)
        bias = torch.zeros(self.out_ch, dtype=ref.dtype, device=ref.device)
        for branch in self.conv_kxk:
            w, b = fuse_conv_bn_weights(branch[0].weight, branch[1])
            kernel, bias = kernel + w, bias + b
        if self.conv_scale is not None:
            w, b = fuse_conv_bn_weights(self.conv_scale[0].weight, self.conv_scale[1])
            pad = self.kernel_size // 2
            kernel = kernel + nn.functional.pad(w, (pad, pad, pad, pad))
            bias = bias + b
        if self.identity is not None:
            w, b = fuse_conv_bn_weights(self._identity_kernel(ref), self.identity)
            kernel, bias = kernel + w, bias + b
        return kernel, bias

    def reparameterize(self) -> nn.Module:
        """A NEW eval-mode ``nn.Sequential(Conv2d(bias=True), ReLU)`` equal to this block in eval
        mode (BN running statistics). ``self`` is not modified."""
        kernel, bias = self.fused_kernel_bias()
        ref = self.conv_kxk[0][0]
        conv = nn.Conv2d(
            self.in_ch,
            self.out_ch,
            self.kernel_size,
            self.stride,
            self.kernel_size // 2,
            groups=self.groups,
            bias=True,
            device=ref.weight.device,
            dtype=ref.weight.dtype,
        )
        with torch.no_grad():
            conv.weight.copy_(kernel)
            conv.bias.copy_(bias)
        return nn.Sequential(conv, nn.ReLU(inplace=True)).eval()


@register_model("mobileone_s0")
class MobileOneS0(SmallImageClassifier):
    """MobileOne-S0, train-time (multi-branch) form; see the module docstring."""

    family = "mobileone_s0"

    def __init__(
        self,
        *,
        num_classes: int,
        image_size: int = 32,
        in_chans: int = 3,
        width: float = 1.0,
        num_branches: int = S0_BRANCHES,
    ) -> None:
        super().__init__(
            num_classes=num_classes, image_size=image_size, in_chans=in_chans, width=width
        )
        if isinstance(num_branches, bool) or not isinstance(num_branches, int) or num_branches < 1:
            raise ValueError(f"num_branches must be an int >= 1 (S0 uses 4), got {num_branches!r}")
        self.config["num_branches"] = num_branches
        self.strides = (1, *downsample_strides(image_size, 3, min_final=4))
        stem = round_channels(S0_STEM * self.width, divisor=1, minimum=1)
        layers: list[nn.Module] = [MobileOneBlock(in_chans, stem, 3, 1, num_branches=1)]
        in_ch = stem
        for (channels, n_blocks), stride in zip(S0_STAGES, self.strides):
            out_ch = round_channels(channels * self.width, divisor=1, minimum=1)
            blocks: list[nn.Module] = []
            for i in range(n_blocks):
                s = stride if i == 0 else 1
                blocks.append(MobileOneBlock(in_ch, in_ch, 3, s, in_ch, num_branches))
                blocks.append(MobileOneBlock(in_ch, out_ch, 1, 1, 1, num_branches))
                in_ch = out_ch
            layers.append(nn.Sequential(*blocks))
        self.features = nn.Sequential(*layers)
        self.classifier = classifier_head(in_ch, num_classes)
