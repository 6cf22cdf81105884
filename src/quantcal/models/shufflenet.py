"""ShuffleNetV2 (Ma et al., ECCV 2018) and AugShuffleNet (Ye, arXiv 2203.06589), CIFAR form.

CIFAR form (REFERENCE.md §2): 3x3 stride-1 stem 3->24 + BN + ReLU with no max-pool; three
stages, each a two-branch down-sampling unit followed by 3 / 7 / 3 basic units (32 -> 16 -> 8 ->
4); 1x1 conv head + BN + ReLU; global average pool; Linear.

Size adaptation: the three stages down-sample with the strides of
:func:`~quantcal.models._common.downsample_strides` (``min_final=4``): as many stride-2 stages
as keep the final map at least 4x4 (the 32x32 reference form), the earliest ones turned into
stride 1. 32 and 28 keep (2, 2, 2) (final 4x4), 16 -> (1, 2, 2), 8 -> (1, 1, 2) (final 4x4).
A stride-1 "down unit" keeps its two-branch, channel-changing structure.

Widths: the published multipliers use the published widths (stage channels / head):
0.5 -> 48/96/192/1024, 1.0 -> 116/232/464/1024, 1.5 -> 176/352/704/1024, 2.0 -> 244/488/976/2048
(AugShuffleNet: 1.0 -> 120/240/480). Any other ``width`` scales the 1.0 stage widths and rounds
each to the nearest even number (at least 4); the head stays 1024 (2048 for width >= 2). Pass
``head_channels`` to override the head width (e.g. a small head for tiny test models).
"""

from __future__ import annotations

import torch
from torch import nn

from quantcal.models._common import (
    SmallImageClassifier,
    channel_shuffle,
    classifier_head,
    conv_bn,
    downsample_strides,
    round_channels,
)
from quantcal.models.registry import register_model

STEM_CHANNELS = 24
STAGE_REPEATS = (3, 7, 3)  # basic units after each stage's down unit

SHUFFLENETV2_WIDTHS: dict[float, tuple[int, int, int, int]] = {
    0.5: (48, 96, 192, 1024),
    1.0: (116, 232, 464, 1024),
    1.5: (176, 352, 704, 1024),
    2.0: (244, 488, 976, 2048),
}
AUGSHUFFLENET_WIDTHS: dict[float, tuple[int, int, int, int]] = {
    0.5: (48, 96, 192, 1024),
    1.0: (120, 240, 480, 1024),
    1.5: (176, 352, 704, 1024),
    2.0: (244, 488, 976, 2048),
}


def stage_widths(
    width: float, table: dict[float, tuple[int, int, int, int]], head_channels: int | None = None
) -> tuple[int, int, int, int]:
    """(stage1, stage2, stage3, head) channels for ``width`` (see the module docstring)."""
    if width in table:
        c1, c2, c3, head = table[width]
    else:
        c1, c2, c3 = (round_channels(c * width, divisor=2, minimum=4) for c in table[1.0][:3])
        head = 2048 if width >= 2.0 else 1024
    if head_channels is not None:
        bad = isinstance(head_channels, bool) or not isinstance(head_channels, int)
        if bad or head_channels < 1:
            raise ValueError(f"head_channels must be a positive int or None, got {head_channels!r}")
        head = head_channels
    return c1, c2, c3, head


class DownUnit(nn.Module):
    """ShuffleNetV2 down-sampling unit: both branches see the whole input, concat, shuffle.

    left: 3x3 dw (stride s) + BN -> 1x1 + BN + ReLU; right: 1x1 + BN + ReLU -> 3x3 dw (stride s)
    + BN -> 1x1 + BN + ReLU. Output channels ``out_ch`` (each branch ``out_ch // 2``).
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        half = out_ch // 2
        self.branch1 = nn.Sequential(
            conv_bn(in_ch, in_ch, 3, stride, groups=in_ch),
            conv_bn(in_ch, half, 1, act=True),
        )
        self.branch2 = nn.Sequential(
            conv_bn(in_ch, half, 1, act=True),
            conv_bn(half, half, 3, stride, groups=half),
            conv_bn(half, half, 1, act=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channel_shuffle(torch.cat((self.branch1(x), self.branch2(x)), dim=1), 2)


class BasicUnit(nn.Module):
    """ShuffleNetV2 stride-1 unit: split in half; one half passes, the other goes
    1x1 + BN + ReLU -> 3x3 dw + BN -> 1x1 + BN + ReLU; concat; shuffle with 2 groups."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        half = channels // 2
        self.branch2 = nn.Sequential(
            conv_bn(half, half, 1, act=True),
            conv_bn(half, half, 3, groups=half),
            conv_bn(half, half, 1, act=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=1)
        out = torch.cat((x1, self.branch2(x2.contiguous())), dim=1)
        return channel_shuffle(out, 2)


class AugShuffleUnit(nn.Module):
    """AugShuffleNet stride-1 unit with crossover (Ye, arXiv 2203.06589, ratio r = 0.375).

    Split C into u = C - c untouched channels and c = round_even(r*C) convolved ones. The c go
    1x1 + BN (no ReLU) -> 3x3 dw + BN -> y. Crossover: halves y = (y1, y2), untouched = (k1, k2);
    ``pass = cat(y1, k1)`` (C/2) goes straight through, ``mixed = cat(k2, y2)`` (C/2) goes
    1x1 + BN + ReLU. Output cat(pass, mixed), shuffled with 2 groups; width stays C.
    """

    def __init__(self, channels: int, ratio: float = 0.375) -> None:
        super().__init__()
        conv_ch = round_channels(ratio * channels, divisor=2, minimum=2)
        if conv_ch >= channels:
            raise ValueError(
                f"AugShuffleNet crossover needs fewer convolved channels than {channels}; "
                f"ratio={ratio} gives {conv_ch}. Use a ratio in (0, 0.5] or a larger width."
            )
        self.conv_ch = conv_ch
        self.keep_ch = channels - conv_ch
        self.branch = nn.Sequential(
            conv_bn(conv_ch, conv_ch, 1),
            conv_bn(conv_ch, conv_ch, 3, groups=conv_ch),
        )
        self.fuse = conv_bn(channels // 2, channels // 2, 1, act=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep, conv = x.split((self.keep_ch, self.conv_ch), dim=1)
        y1, y2 = self.branch(conv.contiguous()).chunk(2, dim=1)
        k1, k2 = keep.chunk(2, dim=1)
        passed = torch.cat((y1, k1), dim=1)
        mixed = self.fuse(torch.cat((k2, y2), dim=1))
        return channel_shuffle(torch.cat((passed, mixed), dim=1), 2)


class _ShuffleFamily(SmallImageClassifier):
    """Stem -> 3 stages -> 1x1 head; the subclass picks widths and which units use crossover."""

    widths_table: dict[float, tuple[int, int, int, int]] = SHUFFLENETV2_WIDTHS
    crossover_stages: tuple[bool, bool, bool] = (False, False, False)

    def __init__(
        self,
        *,
        num_classes: int,
        image_size: int = 32,
        in_chans: int = 3,
        width: float = 1.0,
        head_channels: int | None = None,
        ratio: float = 0.375,
    ) -> None:
        super().__init__(
            num_classes=num_classes, image_size=image_size, in_chans=in_chans, width=width
        )
        bad = isinstance(ratio, bool) or not isinstance(ratio, (int, float))
        if bad or not 0 < ratio <= 0.5:
            raise ValueError(
                f"ratio must be a number in (0, 0.5] (the paper uses 0.375), got {ratio!r}"
            )
        *stage_ch, head = stage_widths(self.width, self.widths_table, head_channels)
        self.stage_channels = tuple(stage_ch)
        self.strides = downsample_strides(image_size, 3, min_final=4)
        self.config["head_channels"] = head_channels
        if any(self.crossover_stages):
            self.config["ratio"] = ratio

        layers: list[nn.Module] = [conv_bn(in_chans, STEM_CHANNELS, 3, act=True)]
        in_ch = STEM_CHANNELS
        for out_ch, repeats, stride, crossover in zip(
            stage_ch, STAGE_REPEATS, self.strides, self.crossover_stages
        ):
            units: list[nn.Module] = [DownUnit(in_ch, out_ch, stride)]
            for _ in range(repeats):
                units.append(AugShuffleUnit(out_ch, ratio) if crossover else BasicUnit(out_ch))
            layers.append(nn.Sequential(*units))
            in_ch = out_ch
        layers.append(conv_bn(in_ch, head, 1, act=True))
        self.features = nn.Sequential(*layers)
        self.classifier = classifier_head(head, num_classes)


@register_model("shufflenetv2")
class ShuffleNetV2(_ShuffleFamily):
    """ShuffleNetV2 (Ma et al., ECCV 2018) in the CIFAR form; see the module docstring.

    1.0x, 100 classes, 32x32: 1.36 M parameters, 45.1 M MACs (REFERENCE.md §2).
    """

    family = "shufflenetv2"
    widths_table = SHUFFLENETV2_WIDTHS
    crossover_stages = (False, False, False)

    def __init__(
        self,
        *,
        num_classes: int,
        image_size: int = 32,
        in_chans: int = 3,
        width: float = 1.0,
        head_channels: int | None = None,
    ) -> None:
        super().__init__(
            num_classes=num_classes,
            image_size=image_size,
            in_chans=in_chans,
            width=width,
            head_channels=head_channels,
        )


@register_model("augshufflenet")
class AugShuffleNet(_ShuffleFamily):
    """AugShuffleNet (Ye, arXiv 2203.06589): ShuffleNetV2 whose stride-1 units in the last two
    stages are crossover units (:class:`AugShuffleUnit`, ``ratio`` r = 0.375); 1.0x = 120/240/480.

    1.0x, 100 classes, 32x32: 1.30 M parameters, 43.6 M MACs (REFERENCE.md §2). The 2.0x widths
    are 244/488/976 like ShuffleNetV2 (the author's code lists 224, which looks like a typo).
    """

    family = "augshufflenet"
    widths_table = AUGSHUFFLENET_WIDTHS
    crossover_stages = (False, True, True)

    def __init__(
        self,
        *,
        num_classes: int,
        image_size: int = 32,
        in_chans: int = 3,
        width: float = 1.0,
        head_channels: int | None = None,
        ratio: float = 0.375,
    ) -> None:
        super().__init__(
            num_classes=num_classes,
            image_size=image_size,
            in_chans=in_chans,
            width=width,
            head_channels=head_channels,
            ratio=ratio,
        )
