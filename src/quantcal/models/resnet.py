"""ResNet-20 (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016,
arXiv 1512.03385, §4.2): the CIFAR-10 ResNet with n = 3.

A 3x3 conv to 16 channels + BN + ReLU, then three stages of n = 3 basic blocks with 16, 32 and
64 channels (strides 1, 2, 2: 32 -> 32 -> 16 -> 8), global average pool, Linear. A basic block is
``ReLU(BN(conv3x3(ReLU(BN(conv3x3_s(x))))) + shortcut(x))``. The shortcut is the paper's
option A ("we use identity shortcuts in all cases", §4.2): the identity, and where the shape
changes a parameter-free one, ``x[:, :, ::s, ::s]`` zero-padded with the extra channels
(:class:`PadShortcut`; 2 x 16 and 2 x 32 channels at the two stage changes).

Sizes at 32x32 (computed; the paper's Table 6 gives 0.27 M): 269,722 parameters with 10
classes, 275,572 with 100, and 40.55 M MACs. (The often-quoted 272,474 / 40.8 M are those of
option B, whose two 1x1 projection convs + BN add 2,752 parameters and 0.26 M MACs.)

Size adaptation: the reference form ends in an 8x8 map (the paper's 32 -> 16 -> 8). Stages 2 and
3 use :func:`~quantcal.models._common.downsample_strides` (``min_final=4``): both stride 2 while
the final map stays at least 4x4 (32 -> 8x8, 28 -> 7x7, 16 -> 4x4), the earlier one turned into
stride 1 below that (8: strides (1, 2), final 4x4). ``width`` scales every channel count (stem
included), rounded to the nearest integer (at least 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quantcal.models._common import (
    SmallImageClassifier,
    classifier_head,
    conv_bn,
    downsample_strides,
    round_channels,
)
from quantcal.models.registry import register_model

RESNET20_STEM = 16
#: (channels, blocks) of the three stages; 6n + 2 = 20 layers with n = 3.
RESNET20_STAGES: tuple[tuple[int, int], ...] = ((16, 3), (32, 3), (64, 3))


class PadShortcut(nn.Module):
    """Option-A shortcut (He et al. 2016, §3.3): subsample by ``stride`` and zero-pad the
    channels from ``in_ch`` to ``out_ch`` (half the new channels before, half after; parameter
    free). ``x[..., ::2, ::2]`` keeps ceil(n / 2) of n pixels, as the block's stride-2 3x3 conv
    with padding 1 does."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        if out_ch < in_ch:
            raise ValueError(f"an option-A shortcut cannot drop channels ({in_ch} -> {out_ch})")
        self.stride = stride
        self.pad_before = (out_ch - in_ch) // 2
        self.pad_after = out_ch - in_ch - self.pad_before

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_before, self.pad_after))


class BasicBlock(nn.Module):
    """ResNet basic block: conv3x3(stride) + BN + ReLU -> conv3x3 + BN, plus the identity (or an
    option-A :class:`PadShortcut` when the shape changes), then ReLU."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv_bn(in_ch, out_ch, 3, stride, act=True)
        self.conv2 = conv_bn(out_ch, out_ch, 3)
        self.shortcut: nn.Module = (
            PadShortcut(in_ch, out_ch, stride) if stride != 1 or in_ch != out_ch else nn.Identity()
        )
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv2(self.conv1(x)) + self.shortcut(x))


@register_model("resnet20")
class ResNet20(SmallImageClassifier):
    """ResNet-20 for CIFAR (He et al. 2016, §4.2), option-A shortcuts; see the module docstring.

    10 classes, 32x32: 269,722 parameters (paper: 0.27 M), 40.55 M MACs.
    """

    family = "resnet20"

    def __init__(
        self, *, num_classes: int, image_size: int = 32, in_chans: int = 3, width: float = 1.0
    ) -> None:
        super().__init__(
            num_classes=num_classes, image_size=image_size, in_chans=in_chans, width=width
        )
        self.strides = (1, *downsample_strides(image_size, 2, min_final=4))
        stem = round_channels(RESNET20_STEM * self.width, divisor=1, minimum=1)
        layers: list[nn.Module] = [conv_bn(in_chans, stem, 3, act=True)]
        in_ch = stem
        for (channels, n_blocks), stride in zip(RESNET20_STAGES, self.strides):
            out_ch = round_channels(channels * self.width, divisor=1, minimum=1)
            blocks: list[nn.Module] = []
            for i in range(n_blocks):
                blocks.append(BasicBlock(in_ch, out_ch, stride if i == 0 else 1))
                in_ch = out_ch
            layers.append(nn.Sequential(*blocks))
        self.features = nn.Sequential(*layers)
        self.classifier = classifier_head(in_ch, num_classes)
