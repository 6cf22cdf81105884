"""EfficientNet-B0 (Tan & Le, "EfficientNet: Rethinking Model Scaling for Convolutional Neural
Networks", ICML 2019, arXiv 1905.11946), in torchvision's layout, CIFAR form.

3x3 stem conv to 32 + BN + SiLU; seven stages of MBConv blocks (expand ratio, kernel,
ImageNet stride, in, out, blocks) = (1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2),
(6, 5, 2, 24, 40, 2), (6, 3, 2, 40, 80, 3), (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4),
(6, 3, 1, 192, 320, 1) (paper Table 1); an MBConv block is ``[1x1 expand to
make_divisible(ratio * in, 8) + BN + SiLU] -> kxk depthwise (stride on the stage's first block) +
BN + SiLU -> SE -> 1x1 project + BN``, plus the input when the shape is kept. The SE squeezes to
``max(1, in // 4)`` channels of the block's *input* (avg pool -> 1x1 conv with bias + SiLU ->
1x1 conv with bias + Sigmoid -> multiply). Head: 1x1 conv to 1280 (4 x 320) + BN + SiLU; global
average pool; Linear. Stochastic depth (0.2 in torchvision) and the Dropout(0.2) before the
Linear are omitted: both are identities at evaluation, and no quantcal family has them.
BatchNorm at PyTorch's defaults, as in every quantcal family.

Sizes (computed with :func:`~quantcal.models.stats.describe`): with ``imagenet_strides=True``
and 1000 classes, 5,288,548 parameters, exactly torchvision's ``efficientnet_b0()``, and
385.8 M MACs at 224 (torchvision's table: 0.39 GFLOPS; the paper: 0.39 B FLOPs), tensor for
tensor. CIFAR form, 32x32, 100 classes: 4,135,648 parameters, 116.3 M MACs.

Size adaptation: the ImageNet form down-samples 5 times (stem and stages 2, 3, 4, 6). The CIFAR
form (32x32, the reference) has stem stride 1 and the 24-channel stage (stage 2) at stride 1, so
stages 3, 4 and 6 go 32 -> 16 -> 8 -> 4. For other sizes those three use
:func:`~quantcal.models._common.downsample_strides` (``min_final=4``): 28 -> 4x4, 16: strides
(1, 2, 2), 8: (1, 1, 2).

Widths: every channel count c becomes ``make_divisible(c * width, 8)`` (torchvision's
``adjust_channels``; B0 has depth multiplier 1), exactly torchvision's at width >= 1; below width
1 a count under 8 is rounded to an even number (at least 2) instead, so width 0.1 gives a tiny
net (:func:`~quantcal.models.mobilenet.divisible_channels`). The head is 4 x the last stage's
width, as in torchvision.
"""

from __future__ import annotations

import torch
from torch import nn

from quantcal.models._common import (
    SmallImageClassifier,
    SqueezeExcite,
    conv_bn,
    stride_plan,
)
from quantcal.models.mobilenet import check_flag, divisible_channels
from quantcal.models.registry import register_model

B0_STEM = 32
#: (expand ratio, kernel, ImageNet stride, in, out, blocks) of EfficientNet-B0 (Table 1).
B0_STAGES: tuple[tuple[int, int, int, int, int, int], ...] = (
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
)
#: stages that keep stride 2 in the CIFAR form (the stem and stage 1, of 24 channels, run at 1)
B0_CIFAR_DOWN = (2, 3, 5)


class MBConv(nn.Module):
    """EfficientNet's MBConv block (module docstring): [expand] -> depthwise -> SE -> project,
    plus the input when stride 1 and the width is kept."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel_size: int,
        stride: int,
        expand_ratio: int,
        *,
        small: bool = False,
    ) -> None:
        super().__init__()
        self.use_residual = stride == 1 and in_ch == out_ch
        expanded = divisible_channels(in_ch * expand_ratio, small=small)
        layers: list[nn.Module] = []
        if expanded != in_ch:
            layers.append(conv_bn(in_ch, expanded, 1, act=nn.SiLU))
        layers.append(conv_bn(expanded, expanded, kernel_size, stride, expanded, act=nn.SiLU))
        layers.append(SqueezeExcite(expanded, max(1, in_ch // 4), nn.SiLU, nn.Sigmoid))
        layers.append(conv_bn(expanded, out_ch, 1))
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        if self.use_residual:
            out = out + x
        return out


@register_model("efficientnet_b0")
class EfficientNetB0(SmallImageClassifier):
    """EfficientNet-B0 (Tan & Le 2019), CIFAR form; see the module docstring.

    100 classes, 32x32: 4,135,648 parameters, 116.3 M MACs. ``imagenet_strides=True`` gives
    torchvision's ``efficientnet_b0`` layout (stem and stages 2, 3, 4, 6 at stride 2).
    """

    family = "efficientnet_b0"

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
        imagenet = tuple(s for _, _, s, _, _, _ in B0_STAGES)
        self.strides = stride_plan(image_size, imagenet, B0_CIFAR_DOWN, imagenet_strides)
        stem_stride, strides = self.strides[0], self.strides[1:]
        in_ch = divisible_channels(B0_STEM * self.width, small=small)
        layers: list[nn.Module] = [conv_bn(in_chans, in_ch, 3, stem_stride, act=nn.SiLU)]
        for (ratio, k, _, _, out, n), stride in zip(B0_STAGES, strides):
            out_ch = divisible_channels(out * self.width, small=small)
            blocks: list[nn.Module] = []
            for i in range(n):
                blocks.append(MBConv(in_ch, out_ch, k, stride if i == 0 else 1, ratio, small=small))
                in_ch = out_ch
            layers.append(nn.Sequential(*blocks))
        head = 4 * in_ch
        layers.append(conv_bn(in_ch, head, 1, act=nn.SiLU))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(head, num_classes)
        )
