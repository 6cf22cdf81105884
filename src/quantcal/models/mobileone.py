"""MobileOne-S0 (Vasu et al., "MobileOne: An Improved One millisecond Mobile Backbone", CVPR 2023).

Train-time form, in the style of timm's ``byobnet.MobileOneBlock``: each block sums k conv+BN
branches, a 1x1 conv+BN "scale" branch (only when the kernel is larger than 1) and a BN-only
skip (only when the shape is kept), then ReLU. :meth:`MobileOneBlock.reparameterize` returns the
equivalent single conv (the deploy form).

How it runs (same function, same parameters, buffers and initialisation as the straightforward
form, which stays available as :meth:`MobileOneBlock.forward_branches`): every branch is linear
in the input and a BatchNorm is an affine map per channel, so the block is always ONE conv,
ReLU(conv(x, sum_r s_r W_r) + sum_r (beta_r - mu_r s_r)), s_r = gamma_r / sqrt(var_r + eps),
with r over the branches (the 1x1 kernel zero-padded, the skip as an identity kernel). In eval
mode mu, var are the running statistics (the reparameterization, done on the fly). In train mode
they are each branch's batch statistics, and these follow from the input's moments without
running the branches: mean_r = W_r . E[u], var_r = W_r^T Cov(u) W_r for the input patch u
(:func:`branch_batch_moments`). Autograd differentiates through the moments, so gradients are
those of the multi-branch form, and the running statistics are updated as BatchNorm would.
On small maps this trains about 2x faster on a CPU than running k + 2 convs and BatchNorms per
block (bench/bench_mobileone.py); on larger maps depthwise blocks use ``forward_branches``
in train mode, which is faster there (``fuse_train``, chosen from the planned map size).

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

import functools

import torch
import torch.fx
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


#: Largest input map (H * W) for which depthwise branch statistics come from the pixel Gram
#: matrix (C x HW x HW); above it they come from the branch outputs themselves.
GRAM_MAX_PIXELS = 64


@torch.fx.wrap
def branch_batch_moments(
    x: torch.Tensor, kernels: torch.Tensor, stride: int, groups: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per output channel o of ``z = conv2d(x, kernels, stride, padding=k // 2, groups)``: the
    batch mean and the biased variance over the N = B * H_out * W_out positions, and N.

    These are the statistics a train-mode ``BatchNorm2d`` after that conv normalises with
    (Ioffe & Szegedy 2015). With u the (zero-padded) input patch an output position sees,
    mean_o = w_o . E[u] and var_o = w_o^T Cov(u) w_o, so z need not exist:

    * 1x1, stride 1: Cov(u) is the channel covariance of x (per group), one C x C product
      instead of a conv with as many outputs as there are branch channels;
    * depthwise on a map of at most :data:`GRAM_MAX_PIXELS` pixels: per channel the Gram
      matrix G = sum_b x_b x_b^T of its pixels (HW x HW), from which the k*k x k*k patch
      moments are gathered (positions outside the map index a zero row: the padding);
    * otherwise z is computed and reduced.

    At least float32 (autocast off); ``ValueError`` when N < 2 (BatchNorm's train-mode rule).
    Wrapped for ``torch.fx``: one opaque call in a traced graph.
    """
    rows, per_group, kh, kw = kernels.shape
    with torch.autocast(x.device.type, enabled=False):
        dtype = torch.promote_types(x.dtype, torch.float32)  # float32 or float64
        x32, w = x.to(dtype), kernels.to(dtype)
        b, c, h, wd = x32.shape
        if kh == 1 and kw == 1 and stride == 1:
            n = b * h * wd
            _check_batch(n, rows)
            mean_x = x32.mean(dim=(0, 2, 3))
            xc = (x32 - mean_x.view(1, c, 1, 1)).view(b, c, h * wd)
            cov = torch.bmm(xc, xc.transpose(1, 2)).sum(0) / n  # (C, C)
            cg = c // groups
            blocks = cov.view(groups, cg, groups, cg).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
            wg = w.reshape(groups, rows // groups, cg)
            mean = torch.bmm(wg, mean_x.view(groups, cg, 1)).reshape(rows)
            var = (torch.bmm(wg, blocks) * wg).sum(-1).reshape(rows)
        elif per_group == 1 and groups == c and h * wd <= GRAM_MAX_PIXELS and kh == kw:
            idx = _patch_index(h, wd, kh, stride).to(x.device)  # (k*k, L), h*wd = padding
            n = b * idx.shape[1]
            _check_batch(n, rows)
            mean_u, cov_u = _depthwise_patch_moments(x32, idx, n)
            wg = w.reshape(c, rows // c, kh * kw)
            mean = torch.bmm(wg, mean_u.unsqueeze(2)).reshape(rows)
            var = (torch.bmm(wg, cov_u) * wg).sum(-1).reshape(rows)
        else:
            z = F.conv2d(x32, w, None, stride, (kh // 2, kw // 2), 1, groups)
            n = z.numel() // rows
            _check_batch(n, rows)
            var, mean = torch.var_mean(z, dim=(0, 2, 3), correction=0)
    return mean, var.clamp_min(0.0), n


def _depthwise_patch_moments(
    x: torch.Tensor, idx: torch.Tensor, n: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel, mean (C, T) and biased covariance (C, T, T) of the T = k*k zero-padded
    patch values u at the L output positions given by ``idx`` (T, L), over batch x positions.

    Centred for accuracy: with mu the channel mean, x' = x - mu and v the 0/1 mask of taps
    inside the map, u = u' + mu * v, so Cov(u) = Cov(u') + mu (Cov(u', v) + Cov(v, u'))
    + mu^2 Cov(v), where E[u'_s u'_t] is gathered from the Gram matrix sum_b x'_b x'_b^T of
    the pixels (with a zero row for the padding) and Cov(v) depends on the geometry only.
    """
    b, c, h, w = x.shape
    hw = h * w
    mu = x.mean(dim=(0, 2, 3))
    flat = (x - mu.view(1, c, 1, 1)).reshape(b, c, hw)
    sums = F.pad(flat.sum(0), (0, 1))[:, idx]  # (C, T, L): sum over the batch of u'
    valid = (idx != hw).to(x.dtype)  # (T, L): v
    mean_c = sums.sum(-1) / n  # E[u']
    mean_v = valid.mean(1)  # E[v]
    cross = torch.matmul(sums, valid.t()) / n - mean_c.unsqueeze(2) * mean_v  # Cov(u', v)
    cov_v = valid @ valid.t() / valid.shape[1] - mean_v.unsqueeze(1) * mean_v  # Cov(v)
    pix = flat.permute(1, 2, 0)  # (C, HW, B)
    gram = F.pad(torch.bmm(pix, pix.transpose(1, 2)), (0, 1, 0, 1)).flatten(1)
    pairs = (idx.unsqueeze(1) * (hw + 1) + idx.unsqueeze(0)).flatten()  # (T * T * L)
    t = idx.shape[0]
    second = gram[:, pairs].view(c, t, t, -1).sum(-1) / n  # E[u'_s u'_t]
    cov = second - mean_c.unsqueeze(2) * mean_c.unsqueeze(1)
    m = mu.view(c, 1, 1)
    cov = cov + m * (cross + cross.transpose(1, 2)) + m * m * cov_v
    return mean_c + mu.unsqueeze(1) * mean_v, cov


@functools.lru_cache(maxsize=64)
def _patch_index(h: int, w: int, k: int, stride: int) -> torch.Tensor:
    """(k*k, L) flat pixel index of tap t at output position l of a kxk, padding k//2 conv;
    taps in the padding get the index h*w (a zero row of the padded Gram matrix)."""
    pos = torch.arange(1, h * w + 1, dtype=torch.float64).view(1, 1, h, w)
    taps = F.unfold(pos, k, padding=k // 2, stride=stride)[0].round().long()  # 0 = padding
    return torch.where(taps == 0, h * w, taps - 1)


def _check_batch(n: int, channels: int) -> None:
    if n < 2:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size "
            f"[{n}, {channels}]: a train-mode MobileOne block normalises over batch x height x "
            "width; use a batch of at least 2 images or call model.eval()"
        )


@torch.fx.wrap
def update_running_stats(
    running_means: list[torch.Tensor],
    running_vars: list[torch.Tensor],
    counters: list[torch.Tensor],
    momenta: list[float | None],
    mean: torch.Tensor,
    var: torch.Tensor,
    n: int,
) -> None:
    """In place, exactly as a train-mode ``BatchNorm2d`` does for BN number r (column r of the
    (C, R) ``mean`` / biased ``var``): counter += 1, then
    ``running = (1 - f) * running + f * batch`` with f = momentum (or 1 / counter when momentum
    is None), the variance unbiased by n / (n - 1)."""
    with torch.no_grad():
        means = mean.detach().unbind(1)
        variances = (var.detach() * (n / (n - 1))).unbind(1)
        torch._foreach_add_(counters, 1)
        if all(m is not None for m in momenta) and len(set(momenta)) == 1:  # the usual case
            f = float(momenta[0])
            torch._foreach_lerp_(running_means, means, f)
            torch._foreach_lerp_(running_vars, variances, f)
            return
        for rm, rv, count, momentum, m, v in zip(
            running_means, running_vars, counters, momenta, means, variances
        ):
            f = 1.0 / float(count) if momentum is None else momentum
            rm.lerp_(m.to(rm.dtype), f)
            rv.lerp_(v.to(rv.dtype), f)


class MobileOneBlock(nn.Module):
    """One MobileOne block: sum of ``num_branches`` kxk conv+BN branches, a 1x1 conv+BN scale
    branch (kernel_size > 1) and a BN skip (in == out and stride 1), then ReLU.

    Args mirror ``nn.Conv2d`` (padding is kernel_size // 2, ``groups`` divides both widths).
    The modules (``conv_kxk[i] = Sequential(Conv2d, BatchNorm2d)``, ``conv_scale``,
    ``identity``) hold the parameters and statistics exactly as separate branches would, so
    ``init_weights`` He-initialises each branch with its own fan-out and checkpoints are the
    same. ``forward`` computes their sum as one fused conv (module docstring); with
    ``fuse_train=False`` the train-mode forward runs the branches one by one instead (same
    result; faster for depthwise blocks on maps larger than :data:`GRAM_MAX_PIXELS`).
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        num_branches: int = 1,
        *,
        fuse_train: bool = True,
    ) -> None:
        super().__init__()
        self.fuse_train = fuse_train
        self.in_ch, self.out_ch = in_ch, out_ch
        self.kernel_size, self.stride, self.groups = kernel_size, stride, groups
        self.conv_kxk = nn.ModuleList(
            conv_bn(in_ch, out_ch, kernel_size, stride, groups) for _ in range(num_branches)
        )
        self.conv_scale = conv_bn(in_ch, out_ch, 1, stride, groups) if kernel_size > 1 else None
        self.identity = nn.BatchNorm2d(in_ch) if in_ch == out_ch and stride == 1 else None
        self.act = nn.ReLU(inplace=True)
        if self.identity is not None:  # constant, not saved (state_dict as with plain branches)
            like = self.conv_kxk[0][0].weight
            self.register_buffer("identity_kernel", self._identity_kernel(like), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ReLU(sum of the branches), computed as ONE conv whose kernel and bias fold every
        branch's BatchNorm (see the module docstring): train mode with the batch statistics of
        each branch (updating the running statistics as BatchNorm does), eval mode with the
        running ones. With ``fuse_train=False`` train mode runs :meth:`forward_branches`."""
        if self.training and not self.fuse_train:
            return self.forward_branches(x)
        kernels = self.branch_kernels()  # (out, R, in/groups, k, k)
        bns = self.branch_norms()
        gamma = torch.stack([bn.weight for bn in bns], 1)
        beta = torch.stack([bn.bias for bn in bns], 1)
        if self.training:
            flat = kernels.flatten(0, 1)
            moments = branch_batch_moments(x, flat, self.stride, self.groups)
            mean = moments[0].view(self.out_ch, len(bns)).to(gamma.dtype)
            var = moments[1].view(self.out_ch, len(bns)).to(gamma.dtype)
            update_running_stats(
                [bn.running_mean for bn in bns],
                [bn.running_var for bn in bns],
                [bn.num_batches_tracked for bn in bns],
                [bn.momentum for bn in bns],
                mean,
                var,
                moments[2],
            )
        else:
            mean = torch.stack([bn.running_mean for bn in bns], 1)
            var = torch.stack([bn.running_var for bn in bns], 1)
        eps = torch.tensor([bn.eps for bn in bns], dtype=var.dtype, device=var.device)
        scale = gamma * torch.rsqrt(var + eps)  # (out, R)
        kernel = (kernels * scale.view(self.out_ch, len(bns), 1, 1, 1)).sum(1)
        bias = (beta - mean * scale).sum(1)
        pad = self.kernel_size // 2
        return self.act(
            F.conv2d(x, kernel.to(x.dtype), bias.to(x.dtype), self.stride, pad, 1, self.groups)
        )

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Block-specific initialisation, to run after the generic He init: in a block with a
        BN skip, the BN scales (gamma) of the conv and scale branches start at 0, so the block
        starts as ReLU(BN(x)) and the deep plain stack starts close to an identity chain (the
        zero-init-residual rule of Goyal et al. 2017, "Accurate, Large Minibatch SGD", 5.1).

        Why: with every gamma at 1 the k + 2 normalised branches of all 42 blocks multiply the
        gradient on the way back (about 700x from the classifier to the stem of S0 on 8x8
        digits), so early layers take huge relative steps and late ones tiny ones; on digits
        (10 epochs, lr 0.05) S0 at width 0.25 then reaches 70-87 % test accuracy instead of 97 %.
        ``_common.init_weights`` (run by ``create_model``) calls this hook after the generic init.
        """
        if self.identity is None:
            return
        for branch in self.conv_kxk:
            branch[1].weight.zero_()
        if self.conv_scale is not None:
            self.conv_scale[1].weight.zero_()

    def forward_branches(self, x: torch.Tensor) -> torch.Tensor:
        """The same function, straightforwardly: every conv+BN branch run as its own modules
        and the outputs summed (timm ``byobnet.MobileOneBlock``). The reference for tests."""
        out = self.conv_kxk[0](x)
        for branch in self.conv_kxk[1:]:
            out = out + branch(x)
        if self.conv_scale is not None:
            out = out + self.conv_scale(x)
        if self.identity is not None:
            out = out + self.identity(x)
        return self.act(out)

    def branch_norms(self) -> list[nn.BatchNorm2d]:
        """The BatchNorms of the R branches, in :meth:`branch_kernels` order."""
        bns = [branch[1] for branch in self.conv_kxk]
        if self.conv_scale is not None:
            bns.append(self.conv_scale[1])
        if self.identity is not None:
            bns.append(self.identity)
        return bns

    def branch_kernels(self) -> torch.Tensor:
        """(out_ch, R, in_ch/groups, k, k): every branch as a kxk kernel (the 1x1 scale kernel
        zero-padded, the skip as the identity kernel), R = branches + scale + skip."""
        kernels = [branch[0].weight for branch in self.conv_kxk]
        if self.conv_scale is not None:
            pad = self.kernel_size // 2
            kernels.append(F.pad(self.conv_scale[0].weight, (pad, pad, pad, pad)))
        if self.identity is not None:
            kernels.append(self.identity_kernel)
        return torch.stack(kernels, 1)

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
    """MobileOne-S0, train-time (multi-branch) form; see the module docstring.

    Training from scratch on small data wants every block's :meth:`MobileOneBlock.init_weights`
    applied after the generic He init (``for m in model.modules(): if isinstance(m,
    MobileOneBlock): m.init_weights()``): on digits at width 0.25 with the demo recipe it
    takes test accuracy from 70-87 % to about 97 %. ``create_model`` does not do it by itself
    until ``_common.init_weights`` calls per-module ``init_weights`` hooks.
    """

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
        side = image_size  # input side of the next block, for the train-time strategy
        small = side * side <= GRAM_MAX_PIXELS
        layers: list[nn.Module] = [
            MobileOneBlock(in_chans, stem, 3, 1, num_branches=1, fuse_train=small)
        ]
        in_ch = stem
        for (channels, n_blocks), stride in zip(S0_STAGES, self.strides):
            out_ch = round_channels(channels * self.width, divisor=1, minimum=1)
            blocks: list[nn.Module] = []
            for i in range(n_blocks):
                s = stride if i == 0 else 1
                small = side * side <= GRAM_MAX_PIXELS
                blocks.append(
                    MobileOneBlock(in_ch, in_ch, 3, s, in_ch, num_branches, fuse_train=small)
                )
                side = -(-side // s)
                blocks.append(MobileOneBlock(in_ch, out_ch, 1, 1, 1, num_branches))
                in_ch = out_ch
            layers.append(nn.Sequential(*blocks))
        self.features = nn.Sequential(*layers)
        self.classifier = classifier_head(in_ch, num_classes)
