"""Ghost-VGG-16 (Han et al., "GhostNet: More Features from Cheap Operations", CVPR 2020).

VGG-16 in its CIFAR form (64, 64, M, 128, 128, M, 256 x3, M, 512 x3, M, 512 x3, M; M = 2x2
max-pool) with every 3x3 conv replaced by a Ghost module with s = 2, d = 3: a 3x3 primary conv
to C/2 maps + BN + ReLU, a cheap 3x3 depthwise conv on those maps to the other C/2 + BN + ReLU,
concatenated. Then global average pool and one Linear 512*width -> classes.
100 classes, 32x32, 1.0x: 7.43 M parameters, 158 M MACs (REFERENCE.md §2).

Size adaptation (pools only; the convs keep their shape):
- every max-pool is 2x2/stride 2 with ``ceil_mode=True``, so a side n becomes ceil(n / 2) and
  odd sides lose no border pixels: 28 -> 14 -> 7 -> 4 -> 2 -> 1, the exact analogue of
  32 -> 16 -> 8 -> 4 -> 2 -> 1 (identical to floor mode on even sides);
- pools 1-4 are dropped when they would take the map below 2x2 (a 1x1 map leaves a 3x3 conv
  nothing but its centre tap); the fifth pool, which in the reference form turns the last 2x2
  map into 1x1, is kept whenever the map is at least 2x2. So 8 -> 4 -> 2 -> 2 -> 2 -> 1 (pools
  3, 4 dropped) and the last three conv stages run at 2x2, never at 1x1;
- a global average pool before the Linear makes any final map size valid (identity at 1x1).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from quantcal.models._common import SmallImageClassifier, classifier_head, round_channels
from quantcal.models.registry import register_model

VGG16_CFG: tuple[int | str, ...] = (
    64,
    64,
    "M",
    128,
    128,
    "M",
    256,
    256,
    256,
    "M",
    512,
    512,
    512,
    "M",
    512,
    512,
    512,
    "M",
)


def vgg_pool_plan(image_size: int, cfg: tuple[int | str, ...] = VGG16_CFG) -> tuple[bool, ...]:
    """Which of the cfg's max-pools are kept at ``image_size`` (see the module docstring)."""
    n_pools = sum(1 for v in cfg if v == "M")
    side, plan = image_size, []
    for i in range(n_pools):
        is_last = i == n_pools - 1
        keep = side >= 2 if is_last else math.ceil(side / 2) >= 2
        plan.append(keep)
        if keep:
            side = math.ceil(side / 2)
    return tuple(plan)


class GhostModule(nn.Module):
    """Ghost module, ratio s = 2, cheap-op kernel d = 3 (Han et al. 2020, Eq. 3-4).

    primary: 3x3 conv in -> out/2 + BN + ReLU; cheap: 3x3 depthwise conv out/2 -> out/2 + BN +
    ReLU; output cat(primary, cheap) with ``out_ch`` channels (``out_ch`` must be even).
    """

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 3, dw_size: int = 3) -> None:
        super().__init__()
        if out_ch % 2:
            raise ValueError(f"GhostModule needs an even out_ch (s = 2), got {out_ch}")
        init_ch = out_ch // 2
        self.primary = nn.Sequential(
            nn.Conv2d(in_ch, init_ch, kernel_size, 1, kernel_size // 2, bias=False),
            nn.BatchNorm2d(init_ch),
            nn.ReLU(inplace=True),
        )
        self.cheap = nn.Sequential(
            nn.Conv2d(init_ch, init_ch, dw_size, 1, dw_size // 2, groups=init_ch, bias=False),
            nn.BatchNorm2d(init_ch),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.primary(x)
        return torch.cat((y, self.cheap(y)), dim=1)


@register_model("ghostnet_vgg16")
class GhostVGG16(SmallImageClassifier):
    """Ghost-VGG-16; channels scale by ``width`` rounded to even numbers (at least 2)."""

    family = "ghostnet_vgg16"

    def __init__(
        self, *, num_classes: int, image_size: int = 32, in_chans: int = 3, width: float = 1.0
    ) -> None:
        super().__init__(
            num_classes=num_classes, image_size=image_size, in_chans=in_chans, width=width
        )
        self.pool_plan = vgg_pool_plan(image_size)
        pools = iter(self.pool_plan)
        layers: list[nn.Module] = []
        in_ch = in_chans
        for v in VGG16_CFG:
            if v == "M":
                if next(pools):
                    layers.append(nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True))
            else:
                out_ch = round_channels(int(v) * self.width, divisor=2, minimum=2)
                layers.append(GhostModule(in_ch, out_ch))
                in_ch = out_ch
        self.features = nn.Sequential(*layers)
        self.classifier = classifier_head(in_ch, num_classes)
