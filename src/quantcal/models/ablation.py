"""A controlled ablation family: one ResNet-20-like skeleton, one architectural property at a time.

The study (Kuang & Wong, arXiv 2309.13866) finds that depthwise-separable nets lose more
calibration under quantization. Its four networks differ in many ways at once; these eight
models each change exactly ONE property of a common base, at a matched deploy-form budget, so
a study can attribute a calibration change to that property (:data:`ABLATION_VARIANTS`).

Base (``ablation_base``), ResNet-20 (He et al., CVPR 2016, §4.2, CIFAR form): a 3x3 conv-BN-act
stem with c channels; three stages of 3 blocks with c, 2c, 4c channels (c = 16 at width 1); the
first block of stages 2 and 3 has stride 2; a block is two 3x3 conv-BN units (the first followed
by the activation), plus a residual connection, then the activation; global average pool and a
Linear head. The residual connection uses the parameter-free "option A" shortcut (stride-2
subsampling ``x[:, :, ::2, ::2]`` and zero channels appended), so switching residuals off
changes no parameter. 32x32: 32 -> 16 -> 8 (final 8x8, as ResNet-20). Other sizes take the
stage-2/3 strides from :func:`~quantcal.models._common.downsample_strides` (``min_final=4``):
28 -> 14 -> 7, 16 -> 8 -> 4, 8: strides (1, 2), final 4x4. 100 classes, 32x32: 0.276 M
parameters train-time (0.270 M at 10 classes, ResNet-20's count), 40.6 M MACs.

Variants (each only its property; all else as in the base):

* ``ablation_separable`` (block: separable): every 3x3 conv of the blocks is a MobileNet-v1 unit,
  depthwise 3x3 + BN + act + pointwise 1x1 + BN (Howard et al. 2017), width re-matched. The
  stem stays a dense conv, as in MobileNet-v1 (a depthwise conv on 1-3 input channels is
  degenerate).
* ``ablation_no_residual`` (residual: off): the blocks without the residual additions.
* ``ablation_relu6`` / ``ablation_hardswish`` (activation): ReLU6 / hard-swish everywhere the
  base has a ReLU.
* ``ablation_se`` (se: on): squeeze-excitation (Hu et al., CVPR 2018) on each block's residual
  branch before the addition (SE-ResNet placement): global average pool, 1x1 conv C -> C // 16
  (at least 1 channel) with bias, ReLU, 1x1 conv back to C with bias, **sigmoid** (Hu et al.'s
  gate, not MobileNet-v3's hard-sigmoid), channel-wise product; width re-matched (it stays c:
  SE adds about 1 %, and c - 1 would be 12 % smaller).
* ``ablation_reparam`` (reparam: multi-branch): every 3x3 unit, the stem included, is trained
  as a RepVGG block (Ding et al., CVPR 2021): 3x3 conv-BN + 1x1 conv-BN + identity BN when the
  shape is kept, summed. It reuses :class:`~quantcal.models.mobileone.MobileOneBlock` (one 3x3
  branch, groups 1: exactly a RepVGG block) whose ``reparameterize()``
  :func:`~quantcal.models.deploy.to_deploy` calls, so the deploy form IS the base's structure.
  Its BN scales start at 1 like every BN of the base (RepVGG's init), not at 0 as in
  MobileOne's zero-init rule: only the branch structure differs.
* ``ablation_attention`` (attention: on): BoTNet's swap (Srinivas et al., CVPR 2021): the
  second 3x3 conv-BN unit of each of the last stage's three blocks becomes multi-head
  self-attention over the stage's H·W positions followed by BN
  (:class:`~quantcal.models._attention.ConvAttention`: a learned absolute position embedding
  added to the input, 1x1 convs to q, k, v of D channels in ``heads_for(4c)`` heads,
  softmax(QKᵀ/√d)·V, a 1x1 conv back to 4c channels into which the BN folds). Minderer et al.
  (NeurIPS 2021) found attention models better calibrated; this variant asks whether that
  survives quantization, with the products Q·Kᵀ and A·V quantized on both operands. The convs
  stay exactly the base's (c' = c); instead the attention width D is matched (below). 8x8
  positions at 32x32 (64 tokens), 7x7 at 28, 4x4 at 8-16.

Matched budget. The base has c = ``round(16 * width)`` (at least 1). Every variant but the attention
one keeps the base's stem (c channels: the stem is no part of any property, and a stem scaled with
c' would add MACs but few parameters: about 6 % of the base's MACs at width 0.25 on RGB) and
searches the integer c' in [c, 8c + 8] for its stages c', 2c', 4c' that minimises the larger of its
relative deploy-parameter and MAC deviations from the base at the same ``width``, ``image_size``,
``in_chans`` and ``num_classes`` (ties to the smaller c'; c' >= c because the option-A shortcut of
the first block, c -> c', cannot drop channels). The attention variant keeps c' = c (one channel
more changes every stage by 20-60 % of the parameters at small widths) and searches the attention
width D, in multiples of its heads up to 32c, by the same criterion: a unit then has 4c·N + 4·4c·D +
3D + 4c parameters and 4·4c·D·N + 2·N²·D MACs (N = H·W; Q·Kᵀ and A·V are N²·D each) against the 3x3
unit's 9·(4c)² + 4c and 9·(4c)²·N. Nothing is tabulated per width. Counts are of the deploy form
(:func:`~quantcal.models.deploy.to_deploy`: BN folded into conv biases, RepVGG branches merged; MACs
as :func:`~quantcal.models.stats.describe` counts them), computed in closed form by
:func:`ablation_budget` and checked against ``describe(to_deploy(model))`` by the tests. Variants
that change no parameter (no_residual, relu6, hardswish, reparam) get c' = c exactly. Widths 0.25 to
2, 8 to 32 pixels, 1 or 3 channels, 2 to 100 classes: every variant within 7.1 % (the attention
variant within 6.3 %); below (width 0.1) or with a head that dominates (1000 classes at small width)
no c' may come within :data:`BUDGET_TOLERANCE`, and the model warns. At 100 classes, 32x32, RGB
(deploy params, MACs; relative to the base):

==================== ===================================== ===================================
variant              width 1                               width 0.25
==================== ===================================== ===================================
ablation_base        c'=16  274,884  40,556,800            c'=4   18,684  2,618,944
ablation_separable   c'=46  282,596  39,898,848 (+2.8 %,   c'=10  20,012  2,671,776 (+7.1 %,
                     -1.6 %)                               +2.0 %)
ablation_se          c'=16  277,257  40,558,816 (+0.9 %,   c'=4   18,945  2,619,112 (+1.4 %,
                     +0.005 %)                             +0.006 %)
ablation_attention   D=116  266,712  42,031,360 (-3.0 %,   D=15   17,859  2,729,536 (-4.4 %,
                     +3.6 %)                               +4.2 %)
no_residual, relu6,  c'=16  274,884  40,556,800 (equal)    c'=4   18,684  2,618,944 (equal)
hardswish, reparam
==================== ===================================== ===================================
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from quantcal.models._attention import ConvAttention, attention_macs, heads_for
from quantcal.models._common import (
    SmallImageClassifier,
    SqueezeExcite,
    classifier_head,
    conv_bn,
    downsample_strides,
    round_channels,
)
from quantcal.models.mobileone import MobileOneBlock
from quantcal.models.registry import register_model

__all__ = [
    "ABLATION_BASE",
    "ABLATION_VARIANTS",
    "BASE_PROPERTIES",
    "AblationBlock",
    "AblationNet",
    "OptionAShortcut",
    "RepConvUnit",
    "SqueezeExcite",
    "ablation_budget",
    "ablation_channels",
]

BASE_CHANNELS = 16  # ResNet-20's first stage at width 1
BLOCKS_PER_STAGE = 3  # ResNet-20: n = 3
SE_REDUCTION = 16
#: Largest relative deploy params/MACs deviation from the base before a UserWarning.
BUDGET_TOLERANCE = 0.10

#: The name every variant is compared with.
ABLATION_BASE = "ablation_base"

#: Registry name -> (property, value) that the variant changes; the base maps to
#: ("base", "reference"). A study's report pairs each variant with :data:`ABLATION_BASE`.
ABLATION_VARIANTS: dict[str, tuple[str, str]] = {
    "ablation_base": ("base", "reference"),
    "ablation_separable": ("block", "separable"),
    "ablation_no_residual": ("residual", "off"),
    "ablation_relu6": ("activation", "relu6"),
    "ablation_hardswish": ("activation", "hardswish"),
    "ablation_se": ("se", "on"),
    "ablation_reparam": ("reparam", "multi-branch"),
    "ablation_attention": ("attention", "on"),
}

#: The base's value of every property a variant changes (for "relu -> relu6" labels).
BASE_PROPERTIES: dict[str, str] = {
    "block": "dense",
    "residual": "on",
    "activation": "relu",
    "se": "off",
    "reparam": "single-branch",
    "attention": "off",
}


@dataclass(frozen=True)
class _Spec:
    """The skeleton's switches: unit kind ("dense", "separable", "rep"), residual, act, SE,
    and self-attention in place of the last stage's second 3x3 units."""

    unit: str = "dense"
    residual: bool = True
    act: str = "relu"
    se: bool = False
    attention: bool = False


_SPECS: dict[str, _Spec] = {
    "ablation_base": _Spec(),
    "ablation_separable": _Spec(unit="separable"),
    "ablation_no_residual": _Spec(residual=False),
    "ablation_relu6": _Spec(act="relu6"),
    "ablation_hardswish": _Spec(act="hardswish"),
    "ablation_se": _Spec(se=True),
    "ablation_reparam": _Spec(unit="rep"),
    "ablation_attention": _Spec(attention=True),
}


def _spec(name: str) -> _Spec:
    key = str(name).lower()
    if key not in _SPECS:
        raise ValueError(f"unknown ablation variant {name!r}; one of {', '.join(sorted(_SPECS))}")
    return _SPECS[key]


def _make_act(kind: str) -> nn.Module:
    if kind == "relu":
        return nn.ReLU(inplace=True)
    if kind == "relu6":
        return nn.ReLU6(inplace=True)
    return nn.Hardswish()


def _stage_strides(image_size: int) -> tuple[int, int, int]:
    return (1, *downsample_strides(image_size, 2, min_final=4))


def _se_channels(channels: int) -> int:
    return max(1, channels // SE_REDUCTION)


# ----------------------------------------------------------------------------- budget
def _budget(
    spec: _Spec,
    stem: int,
    c: int,
    *,
    image_size: int,
    in_chans: int,
    num_classes: int,
    inner: int = 0,
) -> tuple[int, int]:
    """(deploy params, MACs of one image) of the skeleton with ``stem`` stem channels and stages
    of ``c``, 2c, 4c channels, in closed form (the deploy form: every BN folded into a conv bias,
    RepVGG branches merged); ``inner`` is the attention units' D (q, k, v width)."""
    side = image_size
    params = 9 * in_chans * stem + stem  # dense stem, biased after folding
    macs = 9 * in_chans * stem * side * side
    in_ch = stem
    strides = _stage_strides(image_size)
    for stage, stride in enumerate(strides):
        out_ch = c * 2**stage
        for i in range(BLOCKS_PER_STAGE):
            s = stride if i == 0 else 1
            side = math.ceil(side / s)
            for unit, cin in enumerate((in_ch, out_ch)):  # the block's two 3x3 units
                if spec.attention and stage == len(strides) - 1 and unit == 1:
                    n = side * side  # position embedding, qkv, proj (+ folded BN bias)
                    params += cin * n + 3 * cin * inner + 3 * inner + inner * cin + cin
                    macs += 4 * cin * inner * n + attention_macs(n, inner)
                elif spec.unit == "separable":
                    params += 9 * cin + cin + cin * out_ch + out_ch
                    macs += (9 * cin + cin * out_ch) * side * side
                else:
                    params += 9 * cin * out_ch + out_ch
                    macs += 9 * cin * out_ch * side * side
            if spec.se:
                sq = _se_channels(out_ch)
                params += 2 * out_ch * sq + sq + out_ch
                macs += 2 * out_ch * sq
            in_ch = out_ch
    params += in_ch * num_classes + num_classes
    macs += in_ch * num_classes
    return params, macs


def _base_channels(width: float) -> int:
    return round_channels(BASE_CHANNELS * width, divisor=1, minimum=1)


def _match(
    spec: _Spec, *, width: float, image_size: int, num_classes: int, in_chans: int
) -> tuple[int, int, tuple[float, float]]:
    """(c', D, (relative params deviation, relative MACs deviation)) of the matching rule; D
    is the attention units' inner width (0 without attention, where c' is searched; with
    attention c' = c and D is searched in multiples of the heads)."""
    c = _base_channels(width)
    kw = {"image_size": image_size, "in_chans": in_chans, "num_classes": num_classes}
    target_params, target_macs = _budget(_SPECS[ABLATION_BASE], c, c, **kw)

    def deviation(k: int, inner: int = 0) -> tuple[float, float]:
        p, m = _budget(spec, c, k, inner=inner, **kw)
        return p / target_params - 1, m / target_macs - 1

    if spec.attention:
        heads = heads_for(4 * c)
        candidates = [(c, d) for d in range(heads, 32 * c + 1, heads)]
    else:
        candidates = [(k, 0) for k in range(c, 8 * c + 9)]
    best, best_dev = candidates[0], deviation(*candidates[0])
    for k, d in candidates:
        dev = deviation(k, d)
        if max(map(abs, dev)) < max(map(abs, best_dev)):
            best, best_dev = (k, d), dev
        if min(dev) > 0:  # params and MACs grow along the candidates: the rest is further off
            break
    return best[0], best[1], best_dev


def ablation_channels(
    name: str, *, width: float, image_size: int, num_classes: int, in_chans: int = 3
) -> int:
    """The first-stage channels c' of variant ``name`` (stages c', 2c', 4c'; the stem keeps the
    base's c), matched to the base at the same arguments by the rule in the module docstring."""
    kw = {"image_size": image_size, "num_classes": num_classes, "in_chans": in_chans}
    return _match(_spec(name), width=width, **kw)[0]


def ablation_attention_channels(
    name: str, *, width: float, image_size: int, num_classes: int, in_chans: int = 3
) -> int:
    """The attention units' inner width D of variant ``name`` (0 for variants without
    attention), matched by the rule in the module docstring."""
    kw = {"image_size": image_size, "num_classes": num_classes, "in_chans": in_chans}
    return _match(_spec(name), width=width, **kw)[1]


def ablation_budget(
    name: str, *, width: float, image_size: int, num_classes: int, in_chans: int = 3
) -> tuple[int, int]:
    """(deploy-form parameters, MACs of one image) of ``create_model(name, ...)``, in closed form
    (equal to ``describe(to_deploy(model))``'s ``params`` and ``macs``)."""
    kw = {"image_size": image_size, "in_chans": in_chans, "num_classes": num_classes}
    c, inner, _ = _match(_spec(name), width=width, **kw)
    return _budget(_spec(name), _base_channels(width), c, inner=inner, **kw)


# ----------------------------------------------------------------------------- modules
class OptionAShortcut(nn.Module):
    """He et al.'s parameter-free shortcut "A": subsample by ``stride`` (``x[..., ::s, ::s]``,
    the pixels a stride-s 3x3/pad-1 conv is centred on) and append zero channels up to
    ``out_ch``. Identity when the shape is kept. fx-traceable (static slices and pad)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        if out_ch < in_ch:
            raise ValueError(f"option-A shortcut cannot drop channels ({in_ch} -> {out_ch})")
        self.stride = stride
        self.extra = out_ch - in_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.extra:
            x = F.pad(x, (0, 0, 0, 0, 0, self.extra))
        return x


class RepConvUnit(MobileOneBlock):
    """A RepVGG 3x3 unit: :class:`MobileOneBlock` with one 3x3 branch, groups 1 (3x3 conv-BN +
    1x1 conv-BN + identity BN when in == out and stride 1), then ``act`` (``None``: none, for
    the unit before a residual addition). :meth:`reparameterize` gives ``Sequential(Conv2d)``
    or ``Sequential(Conv2d, act)``, the base's deploy structure.

    :attr:`zero_init_branches` is False: the branch BN scales stay at 1 after the generic init
    (RepVGG's initialisation, and the base's), instead of MobileOne's zero-init rule.
    Train mode runs the branches one by one (``fuse_train=False``): for a dense 3x3 unit the
    fused-moments path computes every branch's output anyway, and a training step of the whole
    net took 0.51 s instead of 0.23 s (CPU, one thread, width 0.5, 32x32, batch 64).
    """

    zero_init_branches = False

    def __init__(self, in_ch: int, out_ch: int, stride: int, act: nn.Module | None) -> None:
        super().__init__(in_ch, out_ch, 3, stride, groups=1, num_branches=1, fuse_train=False)
        self.has_act = act is not None
        self.act = act if act is not None else nn.Identity()

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """No block-specific init (see the class docstring) unless ``zero_init_branches``."""
        if self.zero_init_branches:
            super().init_weights()

    def reparameterize(self) -> nn.Module:
        """A NEW eval-mode ``Sequential(Conv2d(bias=True)[, act])`` equal to this unit in eval
        mode; ``self`` is not modified."""
        conv = super().reparameterize()[0]
        layers = [conv, copy.deepcopy(self.act)] if self.has_act else [conv]
        return nn.Sequential(*layers).eval()


def _unit(spec: _Spec, in_ch: int, out_ch: int, stride: int, act: bool) -> nn.Module:
    """One 3x3 unit of the skeleton, ``in_ch -> out_ch``, followed by the activation if ``act``."""
    if spec.unit == "rep":
        return RepConvUnit(in_ch, out_ch, stride, _make_act(spec.act) if act else None)
    if spec.unit == "separable":
        layers = [
            *conv_bn(in_ch, in_ch, 3, stride, groups=in_ch),
            _make_act(spec.act),
            *conv_bn(in_ch, out_ch, 1),
        ]
    else:
        layers = list(conv_bn(in_ch, out_ch, 3, stride))
    if act:
        layers.append(_make_act(spec.act))
    return nn.Sequential(*layers)


def _attention_unit(channels: int, inner: int, size: tuple[int, int]) -> nn.Module:
    """BoTNet's replacement of a 3x3 conv-BN unit: MHSA over the H·W positions with q, k, v of
    ``inner`` channels in ``heads_for(channels)`` heads, then BN."""
    attention = ConvAttention(channels, heads_for(channels), size, inner=inner)
    return nn.Sequential(attention, nn.BatchNorm2d(channels))


class AblationBlock(nn.Module):
    """act(unit2(unit1(x)) [-> SE] [+ shortcut(x)]): a ResNet basic block with the switches of
    ``spec`` (unit kind, residual, activation, SE). With ``attention_size`` (H, W) the second
    unit is self-attention over that map (:func:`_attention_unit`) instead of a 3x3 conv."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        stride: int,
        spec: _Spec,
        attention_size: tuple[int, int] | None = None,
        attention_channels: int = 0,
    ) -> None:
        super().__init__()
        self.unit1 = _unit(spec, in_ch, out_ch, stride, act=True)
        if attention_size is not None:
            self.unit2 = _attention_unit(out_ch, attention_channels, attention_size)
        else:
            self.unit2 = _unit(spec, out_ch, out_ch, 1, act=False)
        self.se = (
            SqueezeExcite(out_ch, _se_channels(out_ch), nn.ReLU, nn.Sigmoid) if spec.se else None
        )
        self.shortcut = OptionAShortcut(in_ch, out_ch, stride) if spec.residual else None
        self.act = _make_act(spec.act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.unit2(self.unit1(x))
        if self.se is not None:
            out = self.se(out)
        if self.shortcut is not None:
            out = out + self.shortcut(x)
        return self.act(out)


class AblationNet(SmallImageClassifier):
    """The skeleton of the module docstring; the subclass's ``family`` picks the variant.

    Attributes: ``variant`` (property, value) from :data:`ABLATION_VARIANTS`,
    ``stem_channels`` (the base's c), ``base_channels`` (c') and ``stage_channels``
    (c', 2c', 4c'), ``strides`` (of the three stages),
    ``budget_deviation`` (relative deploy params and MACs against the base; a ``UserWarning``
    when either exceeds :data:`BUDGET_TOLERANCE`).
    """

    family = ABLATION_BASE

    def __init__(
        self, *, num_classes: int, image_size: int = 32, in_chans: int = 3, width: float = 1.0
    ) -> None:
        super().__init__(
            num_classes=num_classes, image_size=image_size, in_chans=in_chans, width=width
        )
        spec = _spec(self.family)
        self.variant = ABLATION_VARIANTS[self.family]
        c, inner, deviation = _match(
            spec,
            width=self.width,
            image_size=image_size,
            num_classes=num_classes,
            in_chans=in_chans,
        )
        self.budget_deviation = deviation
        if max(map(abs, deviation)) > BUDGET_TOLERANCE:
            warnings.warn(
                f"{self.family} at width {self.width:g}, {image_size}x{image_size}, "
                f"{num_classes} classes: no base width matches {ABLATION_BASE}'s deploy budget "
                f"within {BUDGET_TOLERANCE:.0%} (closest c' = {c}: params "
                f"{deviation[0]:+.1%}, MACs {deviation[1]:+.1%}); compare with care or use a "
                "larger width (the match holds from width 0.25 up at 8-32 pixels).",
                UserWarning,
                stacklevel=3,
            )
        self.stem_channels = _base_channels(self.width)
        self.base_channels = c
        self.attention_channels = inner
        self.stage_channels = (c, 2 * c, 4 * c)
        self.strides = _stage_strides(image_size)
        stem_ch = self.stem_channels
        if spec.unit == "rep":
            stem: nn.Module = RepConvUnit(in_chans, stem_ch, 1, _make_act(spec.act))
        else:
            stem = nn.Sequential(*conv_bn(in_chans, stem_ch, 3), _make_act(spec.act))
        layers: list[nn.Module] = [stem]
        in_ch = stem_ch
        side = image_size
        for stage, (out_ch, stride) in enumerate(zip(self.stage_channels, self.strides)):
            side = math.ceil(side / stride)
            last = stage == len(self.strides) - 1
            size = (side, side) if spec.attention and last else None
            blocks = [
                AblationBlock(
                    in_ch if i == 0 else out_ch, out_ch, stride if i == 0 else 1, spec, size, inner
                )
                for i in range(BLOCKS_PER_STAGE)
            ]
            layers.append(nn.Sequential(*blocks))
            in_ch = out_ch
        self.features = nn.Sequential(*layers)
        self.classifier = classifier_head(in_ch, num_classes)


@register_model("ablation_base")
class AblationBase(AblationNet):
    """ResNet-20-like base of the ablation family (module docstring)."""

    family = "ablation_base"


@register_model("ablation_separable")
class AblationSeparable(AblationNet):
    """Base with depthwise-separable 3x3 units (MobileNet-v1 style), width re-matched."""

    family = "ablation_separable"


@register_model("ablation_no_residual")
class AblationNoResidual(AblationNet):
    """Base without the residual additions (same parameters)."""

    family = "ablation_no_residual"


@register_model("ablation_relu6")
class AblationReLU6(AblationNet):
    """Base with ReLU6 everywhere."""

    family = "ablation_relu6"


@register_model("ablation_hardswish")
class AblationHardswish(AblationNet):
    """Base with hard-swish everywhere."""

    family = "ablation_hardswish"


@register_model("ablation_se")
class AblationSE(AblationNet):
    """Base with squeeze-excitation on every block's residual branch, width re-matched."""

    family = "ablation_se"


@register_model("ablation_reparam")
class AblationReparam(AblationNet):
    """Base trained with RepVGG multi-branch 3x3 units; deploys to the base's structure."""

    family = "ablation_reparam"


@register_model("ablation_attention")
class AblationAttention(AblationNet):
    """Base with multi-head self-attention in place of the last stage's second 3x3 units
    (BoTNet's swap), width re-matched."""

    family = "ablation_attention"
