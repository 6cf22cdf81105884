"""RepVGG-A0 (Ding et al., "RepVGG: Making VGG-style ConvNets Great Again", CVPR 2021,
arXiv 2101.03697), CIFAR form.

A plain stack of RepVGG blocks: a stem block and four stages of 2, 4, 14 and 1 blocks with
widths ``min(64, 64a)`` = 48 (stem), 64a = 48, 128a = 96, 256a = 192 and 512b = 1280 (A0:
a = 0.75, b = 2.5; paper §3.4, Table 2); global average pool; Linear. A block is
``ReLU(BN(conv3x3(x)) + BN(conv1x1(x)) [+ BN(x)])``, the identity branch only where the shape
is kept; its deploy form is one 3x3 conv with bias + ReLU (§3.3). The block is
:class:`~quantcal.models.mobileone.MobileOneBlock` with one 3x3 branch and ``groups=1``, which is
exactly this (its scale branch is RepVGG's 1x1 branch, its BN skip the identity branch), and its
``reparameterize()`` gives the deploy form (``to_deploy`` applies it). Train mode runs the
branches one by one (``fuse_train=False``): for a dense 3x3 conv the fused form has no shortcut
for the branch statistics and computes them with a conv of 3x the outputs, so a training step
takes about 3x longer (width 0.25, batch 32, 8x8 and 32x32, one CPU thread: 78 vs 251 ms and
140 vs 406 ms). Eval mode runs the one fused conv. As for MobileOne, blocks with an
identity branch start with their conv branches' BN scales at 0 (``MobileOneBlock.init_weights``,
the zero-init-residual rule), which the original code does not do.

Sizes (computed with :func:`~quantcal.models.stats.describe`): with ``imagenet_strides=True``
and 1000 classes, 9,108,968 parameters train-time, exactly timm's ``repvgg_a0`` (paper Table 2:
9.11 M), 8,309,384 deployed (8.30 M) and 1.36 G MACs at 224 deployed (paper: 1.4 B FLOPs; the
eval-mode block runs its fused conv, so the train-time form costs the same). CIFAR form, 32x32,
100 classes: 7,956,164 parameters train-time (96 more than 7,956,068 = the ImageNet count with a
100-class head: stage 1's first block keeps its shape at stride 1 and so has an identity BN),
7,156,484 deployed, 440.3 M MACs.

Size adaptation: the ImageNet form down-samples in the stem and in all four stages. The CIFAR
form (32x32, the reference) has stem stride 1 and stage 1 stride 1, so stages 2-4 go 32 -> 16 ->
8 -> 4 (as MobileOne-S0). For other sizes stages 2-4 use
:func:`~quantcal.models._common.downsample_strides` (``min_final=4``): 28 -> 4x4, 16: strides
(1, 2, 2), 8: (1, 1, 2). ``width`` scales all channel counts (stem included), rounded to the
nearest integer (at least 1).
"""

from __future__ import annotations

from torch import nn

from quantcal.models._common import (
    SmallImageClassifier,
    classifier_head,
    round_channels,
    stride_plan,
)
from quantcal.models.mobilenet import check_flag
from quantcal.models.mobileone import MobileOneBlock
from quantcal.models.registry import register_model

A0_STEM = 48
#: (channels, blocks) of the four stages of RepVGG-A0.
A0_STAGES: tuple[tuple[int, int], ...] = ((48, 2), (96, 4), (192, 14), (1280, 1))


def repvgg_block(in_ch: int, out_ch: int, stride: int) -> MobileOneBlock:
    """One RepVGG block: 3x3 conv-BN + 1x1 conv-BN [+ BN identity], summed, ReLU."""
    return MobileOneBlock(in_ch, out_ch, 3, stride, 1, num_branches=1, fuse_train=False)


@register_model("repvgg_a0")
class RepVGGA0(SmallImageClassifier):
    """RepVGG-A0 (Ding et al. 2021), train-time (multi-branch) form; see the module docstring.

    100 classes, 32x32: 7,956,164 parameters train-time, 7,156,484 deployed, 440.3 M MACs.
    ``imagenet_strides=True`` gives the ImageNet strides (stem and every stage at stride 2).
    """

    family = "repvgg_a0"

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
        self.strides = stride_plan(image_size, (2, 2, 2, 2), (1, 2, 3), imagenet_strides)
        stem_stride, strides = self.strides[0], self.strides[1:]
        stem = round_channels(A0_STEM * self.width, divisor=1, minimum=1)
        layers: list[nn.Module] = [repvgg_block(in_chans, stem, stem_stride)]
        in_ch = stem
        for (channels, n_blocks), stride in zip(A0_STAGES, strides):
            out_ch = round_channels(channels * self.width, divisor=1, minimum=1)
            blocks: list[nn.Module] = []
            for i in range(n_blocks):
                blocks.append(repvgg_block(in_ch, out_ch, stride if i == 0 else 1))
                in_ch = out_ch
            layers.append(nn.Sequential(*blocks))
        self.features = nn.Sequential(*layers)
        self.classifier = classifier_head(in_ch, num_classes)
