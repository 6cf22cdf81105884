"""MobileNetV2 (Sandler et al., CVPR 2018, arXiv 1801.04381) and MobileNetV3-Small (Howard et
al., ICCV 2019, arXiv 1905.02244), in torchvision's layouts, CIFAR form.

MobileNetV2: 3x3 stem conv to 32 + BN + ReLU6; inverted residual blocks (t, c, n, s) =
(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
(6, 320, 1, 1), each ``1x1 expand to t*C_in + BN + ReLU6 (t > 1) -> 3x3 depthwise (stride s on
the first of n) + BN + ReLU6 -> 1x1 project + BN`` (linear bottleneck), plus the input when the
shape is kept; 1x1 conv to 1280 + BN + ReLU6; global average pool; Linear. torchvision's
Dropout(0.2) before the Linear is omitted (an identity at evaluation; no quantcal family has
dropout).

MobileNetV3-Small: 3x3 stem conv to 16 + BN + Hardswish; 11 bottlenecks (in, k, exp, out, SE,
act, s) = (16, 3, 16, 16, SE, RE, 2), (16, 3, 72, 24, -, RE, 2), (24, 3, 88, 24, -, RE, 1),
(24, 5, 96, 40, SE, HS, 2), (40, 5, 240, 40, SE, HS, 1) x 2, (40, 5, 120, 48, SE, HS, 1),
(48, 5, 144, 48, SE, HS, 1), (48, 5, 288, 96, SE, HS, 2), (96, 5, 576, 96, SE, HS, 1) x 2, each
``[1x1 expand + BN + act] -> kxk depthwise + BN + act -> [SE] -> 1x1 project + BN`` (+ input
when the shape is kept; no expand conv when exp == in); the SE squeezes to
``make_divisible(exp // 4, 8)`` (avg pool -> 1x1 conv with bias + ReLU -> 1x1 conv with bias +
Hardsigmoid -> multiply); 1x1 conv to 576 + BN + Hardswish; global average pool; Linear(576,
1024) + Hardswish + Linear(1024, classes); torchvision's Dropout(0.2) between the two omitted.

BatchNorm runs at PyTorch's defaults (eps 1e-5, momentum 0.1) as in every quantcal family
(torchvision's V3 uses eps 1e-3, momentum 0.01); parameter counts do not depend on it.

Sizes (computed with :func:`~quantcal.models.stats.describe`):

* with ``imagenet_strides=True`` and 1000 classes they equal torchvision's
  ``mobilenet_v2()`` (3,504,872 parameters; 300.8 M MACs at 224, torchvision's table: 0.30
  GFLOPS) and ``mobilenet_v3_small()`` (2,542,856; 56.5 M MACs at 224, table: 0.06), tensor
  for tensor;
* CIFAR form, 32x32, 100 classes: MobileNetV2 2,351,972 parameters and 88.1 M MACs (as
  github.com/chenyaofo/pytorch-cifar-models' cifar100_mobilenetv2_x1_0: 2.35 M, 88.1 M);
  MobileNetV3-Small 1,620,356 parameters, 17.6 M MACs.

Size adaptation: the ImageNet forms down-sample 5 times (stem and four blocks). The CIFAR form
(32x32, the reference) has stem stride 1 and the first down-sampling block (V2: the 24-channel
stage; V3: the first bottleneck) at stride 1, so the other three go 32 -> 16 -> 8 -> 4. For other
sizes those three use :func:`~quantcal.models._common.downsample_strides` (``min_final=4``):
28 -> 4x4, 16: strides (1, 2, 2), 8: (1, 1, 2).

Widths: every channel count c becomes ``make_divisible(c * width, 8)`` (torchvision's rule),
exactly torchvision's at width >= 1. Below width 1 a count under 8 is instead rounded to an even
number (at least 2), so width 0.1 gives tiny nets; this also applies to the V3 SE squeeze widths.
MobileNetV2's head (1280) follows torchvision (``1280 * max(1, width)``) at width >= 1 but is
scaled too below 1 (torchvision keeps 1280), so small widths give small nets; V3's classifier
hidden width (1024) is scaled at every width, as in torchvision.
"""

from __future__ import annotations

import torch
from torch import nn

from quantcal.models._common import (
    SmallImageClassifier,
    SqueezeExcite,
    conv_bn,
    round_channels,
    stride_plan,
)
from quantcal.models.registry import register_model


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """TF-slim / torchvision ``_make_divisible``: ``value`` rounded to the nearest multiple of
    ``divisor`` (at least ``min_value``, default ``divisor``), plus one ``divisor`` when that
    rounded down by more than 10 %."""
    if min_value is None:
        min_value = divisor
    new = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if new < 0.9 * value:
        new += divisor
    return new


def divisible_channels(value: float, *, small: bool = False) -> int:
    """``make_divisible(value, 8)``; with ``small`` (width < 1) a value under 8 is rounded to
    the nearest even number instead (at least 2): the tiny-width rule (module docstring)."""
    if small and value < 8:
        return round_channels(value, divisor=2, minimum=2)
    return make_divisible(value, 8)


def check_flag(name: str, value: object) -> bool:
    """``value`` if it is a bool, else TypeError naming ``name``."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


class InvertedResidual(nn.Module):
    """MobileNetV2 block: [1x1 expand + BN + act] -> 3x3 dw (stride) + BN + act -> 1x1
    project + BN, plus the input when stride 1 and the width is kept; ``act`` ReLU6
    (MobileNetV2's) or SiLU (MobileViT's MV2 block)."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        stride: int,
        expand_ratio: int,
        act: type[nn.Module] = nn.ReLU6,
    ) -> None:
        super().__init__()
        hidden = in_ch * expand_ratio
        self.use_residual = stride == 1 and in_ch == out_ch
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(conv_bn(in_ch, hidden, 1, act=act))
        layers.append(conv_bn(hidden, hidden, 3, stride, hidden, act=act))
        layers.append(conv_bn(hidden, out_ch, 1))
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        if self.use_residual:
            out = out + x
        return out


class Bottleneck(nn.Module):
    """MobileNetV3 bottleneck: [1x1 expand + BN + act] -> kxk dw (stride) + BN + act -> [SE]
    -> 1x1 project + BN, plus the input when stride 1 and the width is kept."""

    def __init__(
        self,
        in_ch: int,
        kernel_size: int,
        expanded: int,
        out_ch: int,
        se_squeeze: int | None,
        act: type[nn.Module],
        stride: int,
    ) -> None:
        super().__init__()
        self.use_residual = stride == 1 and in_ch == out_ch
        layers: list[nn.Module] = []
        if expanded != in_ch:
            layers.append(conv_bn(in_ch, expanded, 1, act=act))
        layers.append(conv_bn(expanded, expanded, kernel_size, stride, expanded, act=act))
        if se_squeeze is not None:
            layers.append(SqueezeExcite(expanded, se_squeeze, nn.ReLU, nn.Hardsigmoid))
        layers.append(conv_bn(expanded, out_ch, 1))
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        if self.use_residual:
            out = out + x
        return out


V2_STEM = 32
V2_HEAD = 1280
#: (expand ratio t, channels c, blocks n, ImageNet stride s) of MobileNetV2 (Table 2).
V2_SETTING: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
#: stages that keep stride 2 in the CIFAR form (the stem and stage 1 run at stride 1)
V2_CIFAR_DOWN = (2, 3, 5)


@register_model("mobilenetv2")
class MobileNetV2(SmallImageClassifier):
    """MobileNetV2 1.0 (Sandler et al. 2018), CIFAR form; see the module docstring.

    100 classes, 32x32: 2,351,972 parameters, 88.1 M MACs. ``imagenet_strides=True`` gives the
    ImageNet strides (stem 2, stages as published): torchvision's ``mobilenet_v2`` layout.
    """

    family = "mobilenetv2"

    def __init__(
        self,
        *,
        num_classes: int,
        image_size: int = 32,
        in_chans: int = 3,
        width: float = 1.0,
        imagenet_strides: bool = False,
    ) -> None:
        super().__init__(
            num_classes=num_classes, image_size=image_size, in_chans=in_chans, width=width
        )
        self.config["imagenet_strides"] = check_flag("imagenet_strides", imagenet_strides)
        small = self.width < 1
        imagenet = tuple(s for _, _, _, s in V2_SETTING)
        self.strides = stride_plan(image_size, imagenet, V2_CIFAR_DOWN, imagenet_strides)
        stem_stride, strides = self.strides[0], self.strides[1:]
        in_ch = divisible_channels(V2_STEM * self.width, small=small)
        layers: list[nn.Module] = [conv_bn(in_chans, in_ch, 3, stem_stride, act=nn.ReLU6)]
        for (t, c, n, _), stride in zip(V2_SETTING, strides):
            out_ch = divisible_channels(c * self.width, small=small)
            for i in range(n):
                layers.append(InvertedResidual(in_ch, out_ch, stride if i == 0 else 1, t))
                in_ch = out_ch
        head = divisible_channels(V2_HEAD * self.width, small=small)
        layers.append(conv_bn(in_ch, head, 1, act=nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(head, num_classes)
        )


#: MobileNetV3-Small bottlenecks (in, kernel, expanded, out, SE, Hardswish, ImageNet stride),
#: torchvision's ``_mobilenet_v3_conf("mobilenet_v3_small")`` (paper Table 2).
V3_SMALL_SETTING: tuple[tuple[int, int, int, int, bool, bool, int], ...] = (
    (16, 3, 16, 16, True, False, 2),
    (16, 3, 72, 24, False, False, 2),
    (24, 3, 88, 24, False, False, 1),
    (24, 5, 96, 40, True, True, 2),
    (40, 5, 240, 40, True, True, 1),
    (40, 5, 240, 40, True, True, 1),
    (40, 5, 120, 48, True, True, 1),
    (48, 5, 144, 48, True, True, 1),
    (48, 5, 288, 96, True, True, 2),
    (96, 5, 576, 96, True, True, 1),
    (96, 5, 576, 96, True, True, 1),
)
V3_SMALL_HIDDEN = 1024
#: bottlenecks that keep stride 2 in the CIFAR form (the stem and bottleneck 0 run at stride 1)
V3_CIFAR_DOWN = (1, 3, 8)


@register_model("mobilenetv3_small")
class MobileNetV3Small(SmallImageClassifier):
    """MobileNetV3-Small 1.0 (Howard et al. 2019), CIFAR form; see the module docstring.

    100 classes, 32x32: 1,620,356 parameters, 17.6 M MACs. ``imagenet_strides=True`` gives
    torchvision's ``mobilenet_v3_small`` layout (stem and bottlenecks 0, 1, 3, 8 at stride 2).
    """

    family = "mobilenetv3_small"

    def __init__(
        self,
        *,
        num_classes: int,
        image_size: int = 32,
        in_chans: int = 3,
        width: float = 1.0,
        imagenet_strides: bool = False,
    ) -> None:
        super().__init__(
            num_classes=num_classes, image_size=image_size, in_chans=in_chans, width=width
        )
        self.config["imagenet_strides"] = check_flag("imagenet_strides", imagenet_strides)
        small = self.width < 1

        def ch(c: float) -> int:
            return divisible_channels(c * self.width, small=small)

        imagenet = tuple(cfg[-1] for cfg in V3_SMALL_SETTING)
        self.strides = stride_plan(image_size, imagenet, V3_CIFAR_DOWN, imagenet_strides)
        stem_stride, strides = self.strides[0], self.strides[1:]
        stem = ch(V3_SMALL_SETTING[0][0])
        layers: list[nn.Module] = [conv_bn(in_chans, stem, 3, stem_stride, act=nn.Hardswish)]
        for (cin, k, exp, cout, se, hs, _), stride in zip(V3_SMALL_SETTING, strides):
            expanded = ch(exp)
            squeeze = divisible_channels(expanded // 4, small=small) if se else None
            act = nn.Hardswish if hs else nn.ReLU
            layers.append(Bottleneck(ch(cin), k, expanded, ch(cout), squeeze, act, stride))
        last_in = ch(V3_SMALL_SETTING[-1][3])
        last = 6 * last_in
        layers.append(conv_bn(last_in, last, 1, act=nn.Hardswish))
        hidden = ch(V3_SMALL_HIDDEN)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(1),
            nn.Linear(last, hidden),
            nn.Hardswish(inplace=True),
            nn.Linear(hidden, num_classes),
        )
