"""Pieces shared by the model families: argument checks, size adaptation, conv-BN blocks, init.

Every family builds on :class:`SmallImageClassifier`, which stores the attributes a checkpoint
needs to rebuild the network (``num_classes``, ``image_size``, ``in_chans``, ``width``,
``config``) and checks the input's channel count inside a ``torch.fx``-traceable forward.
Only standard layers are used (``nn.Conv2d``, ``nn.BatchNorm2d``, ``nn.ReLU``, ``nn.Linear``,
``nn.MaxPool2d``, ``nn.AdaptiveAvgPool2d``) so the generic quantizer and deploy passes apply.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx
from torch import nn

#: The smallest input side every family accepts. The size-adapted forms keep the reference
#: 32x32 form's final feature map (4x4 for ShuffleNetV2/AugShuffleNet/MobileOne, 2x2 before the
#: last pool for Ghost-VGG) wherever the input allows; below 4x4 no stride pattern can, and a
#: 3x3 kernel sees mostly padding.
MIN_IMAGE_SIZE = 4


def _check_int(name: str, value: Any, minimum: int, hint: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        kind = type(value).__name__
        raise TypeError(f"{name} must be an int >= {minimum}, got {value!r} ({kind})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}. {hint}")
    return value


def validate_common(
    *,
    num_classes: int,
    image_size: int,
    in_chans: int,
    width: float,
    min_image_size: int,
    family: str,
) -> None:
    """Check the arguments every family shares; raise ValueError/TypeError naming the culprit."""
    _check_int("num_classes", num_classes, 1, "Pass the number of labels, e.g. num_classes=100.")
    _check_int("in_chans", in_chans, 1, "Pass 3 for RGB images or 1 for grey-scale.")
    _check_int(
        "image_size",
        image_size,
        min_image_size,
        f"{family} needs inputs of at least {min_image_size}x{min_image_size}; "
        "upsample or pad smaller images.",
    )
    if isinstance(width, bool) or not isinstance(width, (int, float)):
        raise TypeError(f"width must be a positive number, got {width!r}")
    if not math.isfinite(width) or width <= 0:
        raise ValueError(f"width must be a finite number > 0 (1.0 is the paper size), got {width}")


def round_channels(channels: float, *, divisor: int = 2, minimum: int = 2) -> int:
    """``channels`` rounded to the nearest multiple of ``divisor``, at least ``minimum``.

    Python's ``round`` sends ties of ``channels / divisor`` to the even integer (29 -> 28).
    """
    return max(minimum, round(channels / divisor) * divisor)


def downsample_strides(image_size: int, n_stages: int, min_final: int = 4) -> tuple[int, ...]:
    """Strides (1 or 2) of ``n_stages`` down-sampling stages for a square input of ``image_size``.

    A stride-2 3x3/pad-1 (or 1x1) conv maps a side n to ceil(n / 2). The number of stride-2
    stages is the largest k <= n_stages with ceil(image_size / 2**k) >= min_final; the *earliest*
    n_stages - k stages get stride 1. So 32 -> (2, 2, 2) (final 4x4, the CIFAR form),
    28 -> (2, 2, 2) (final 4x4), 16 -> (1, 2, 2), 8 -> (1, 1, 2), 4 -> (1, 1, 1).
    """
    k = 0
    while k < n_stages and math.ceil(image_size / 2 ** (k + 1)) >= min_final:
        k += 1
    return (1,) * (n_stages - k) + (2,) * k


def stride_plan(
    image_size: int, imagenet: tuple[int, ...], small_down: tuple[int, ...], imagenet_strides: bool
) -> tuple[int, ...]:
    """``(stem stride, *stage strides)`` of a family adapted from ImageNet: with
    ``imagenet_strides`` the published layout (stem 2, stage strides ``imagenet``); otherwise
    the small-image form, stem 1 and only the stages indexed by ``small_down`` down-sampling,
    as many of them as :func:`downsample_strides` allows for ``image_size``."""
    if imagenet_strides:
        return (2, *imagenet)
    down = iter(downsample_strides(image_size, len(small_down), min_final=4))
    return (1, *(next(down) if i in small_down else 1 for i in range(len(imagenet))))


@torch.fx.wrap
def check_input(x: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Return ``x`` unchanged if it is a (B, in_chans, H, W) tensor, else raise ValueError.

    Wrapped for ``torch.fx`` so it stays one opaque call in a traced graph (and keeps checking).
    """
    if x.dim() != 4 or x.shape[1] != in_chans:
        raise ValueError(
            f"expected {in_chans}-channel input of shape (B, C, H, W), got {tuple(x.shape)}; "
            "convert the images (grey-scale vs RGB) or build the model with a matching in_chans"
        )
    return x


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """ShuffleNet channel shuffle (Zhang et al. 2018): (B, g*c, H, W) -> interleave the g groups.

    Uses only shape-free reshapes (fx-traceable) and returns a contiguous tensor, so fake-quant
    ops downstream never see a strided view (REFERENCE.md §5, pytorch #75009).
    """
    return x.unflatten(1, (groups, -1)).transpose(1, 2).flatten(1, 2).contiguous()


def conv_bn(
    in_ch: int,
    out_ch: int,
    kernel_size: int,
    stride: int = 1,
    groups: int = 1,
    *,
    act: bool | type[nn.Module] = False,
) -> nn.Sequential:
    """``Conv2d(bias=False, padding=k//2) -> BatchNorm2d [-> act(inplace=True)]`` as a plain
    Sequential; ``act`` True is ReLU, a module class (``nn.ReLU6``, ``nn.SiLU``, ...) is that."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_ch, out_ch, kernel_size, stride, kernel_size // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
    ]
    if act is True:
        act = nn.ReLU
    if act:
        layers.append(act(inplace=True))
    return nn.Sequential(*layers)


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation (Hu et al., CVPR 2018) as in torchvision's ``SqueezeExcitation``:
    ``x * gate(fc2(act(fc1(avgpool(x)))))`` with fc1, fc2 1x1 convs with bias
    (``channels -> squeeze -> channels``). The multiply is element-wise (no weights), so
    quantization leaves no conv/linear computation in fp32."""

    def __init__(
        self,
        channels: int,
        squeeze: int,
        act: type[nn.Module] = nn.ReLU,
        gate: type[nn.Module] = nn.Hardsigmoid,
    ) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.act = act(inplace=True)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.gate = gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.fc2(self.act(self.fc1(self.pool(x)))))


def init_weights(model: nn.Module, generator: torch.Generator | None = None) -> None:
    """He initialisation as in the study (Kuang & Wong 2023; He et al. ICCV 2015).

    Conv2d: Kaiming normal, fan_out, ReLU gain; bias 0. BatchNorm2d: weight 1, bias 0 (running
    stats reset). Linear: normal(0, 0.01), bias 0 (the torchvision/timm classifier convention).
    ``generator`` makes the result depend on the seed alone, not on the global RNG.
    LayerNorm: weight 1, bias 0. Afterwards every sub-module with an ``init_weights(generator)``
    hook runs it with the same generator (attention's position embeddings; MobileOne's skip blocks
    start their branch BN scales at 0, the zero-init-residual rule of Goyal et al. 2017: with
    all scales at 1 the summed branches blow up the gradient ~700x towards the stem and the
    net barely learns in a short run).
    """
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(
                    m.weight, mode="fan_out", nonlinearity="relu", generator=generator
                )
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                nn.init.ones_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01, generator=generator)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for m in model.modules():
            hook = getattr(m, "init_weights", None)
            if m is not model and callable(hook):
                hook(generator)


class SmallImageClassifier(nn.Module):
    """Base of every family: stores the rebuild attributes and checks the input channels.

    Subclasses build ``self.features`` (image -> feature map) and ``self.classifier`` (feature map
    -> logits); ``forward`` = check_input -> features -> classifier, traceable by torch.fx.
    """

    min_image_size: int = MIN_IMAGE_SIZE
    family: str = "model"

    def __init__(self, *, num_classes: int, image_size: int, in_chans: int, width: float) -> None:
        super().__init__()
        validate_common(
            num_classes=num_classes,
            image_size=image_size,
            in_chans=in_chans,
            width=width,
            min_image_size=self.min_image_size,
            family=self.family,
        )
        self.num_classes = num_classes
        self.image_size = image_size
        self.in_chans = in_chans
        self.width = float(width)
        self.config: dict[str, Any] = {
            "name": self.family,
            "num_classes": num_classes,
            "image_size": image_size,
            "in_chans": in_chans,
            "width": float(width),
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = check_input(x, self.in_chans)
        return self.classifier(self.features(x))


def classifier_head(in_features: int, num_classes: int) -> nn.Sequential:
    """Global average pool -> flatten -> Linear (works for any final map size)."""
    return nn.Sequential(
        nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(in_features, num_classes)
    )
