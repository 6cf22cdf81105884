"""MobileOne-S0 train-time speed: batched branches (quantcal) vs k separate conv+BN branches.

    .venv/bin/python bench/bench_mobileone.py [--quick] [--threads 1 2] [--steps 15]

The peer is the straightforward multi-branch block (timm ``byobnet.MobileOneBlock`` style, and
quantcal's own block before the change): a ``ModuleList`` of k conv+BN branches summed one by
one, plus the 1x1 scale branch and the BN skip. quantcal's :class:`MobileOneBlock` runs the k
branches as ONE conv with k * C outputs and ONE BatchNorm over them, then sums over the branch
axis. Both nets are built in this process from the same initial weights (the peer's branches are
slices of quantcal's batched conv), checked to give the same train-mode logits, then timed on
whole SGD steps (forward, cross-entropy, backward, step), interleaved, and the median images/s
and the ratio are printed per thread count and input size.

Cases: width 0.25 on 8x8 grey-scale (scikit-learn digits, the demo) and width 0.25 on 32x32 RGB
(CIFAR), batch 64, 10 / 100 classes.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import types

import torch
import torch.nn.functional as F
from torch import nn

from quantcal import models
from quantcal.models.mobileone import MobileOneBlock


def separate_branch_forward(self: MobileOneBlock, x: torch.Tensor) -> torch.Tensor:
    """The peer: the straightforward MobileOne forward (timm ``byobnet.MobileOneBlock`` style,
    quantcal's block before this change): every conv+BN branch run on its own and summed."""
    out = self.conv_kxk[0](x)
    for branch in self.conv_kxk[1:]:
        out = out + branch(x)
    if self.conv_scale is not None:
        out = out + self.conv_scale(x)
    if self.identity is not None:
        out = out + self.identity(x)
    return self.act(out)


def separate_branch_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose MobileOne blocks run the separate-branch forward."""
    peer = copy.deepcopy(model)
    for m in peer.modules():
        if isinstance(m, MobileOneBlock):
            m.forward = types.MethodType(separate_branch_forward, m)
    return peer


def train_step_seconds(
    model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor
) -> float:
    t0 = time.perf_counter()
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return time.perf_counter() - t0


def bench_case(size: int, chans: int, classes: int, width: float, batch: int, steps: int) -> None:
    ours = models.create_model(
        "mobileone_s0", num_classes=classes, image_size=size, in_chans=chans, width=width, seed=0
    )
    peer = separate_branch_copy(ours)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, chans, size, size, generator=gen)
    y = torch.randint(0, classes, (batch,), generator=gen)
    with torch.no_grad():  # same function (train mode: batch statistics)
        a, b = copy.deepcopy(ours)(x), copy.deepcopy(peer)(x)
    err = (a - b).abs().max().item() / a.abs().max().item()
    nets = {"separate": peer, "fused": ours}
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for k, m in nets.items()}
    times: dict[str, list[float]] = {k: [] for k in nets}
    for k in nets:  # warm-up
        for _ in range(3):
            train_step_seconds(nets[k], opts[k], x, y)
    for _ in range(steps):  # interleaved so load changes hit both
        for k in nets:
            times[k].append(train_step_seconds(nets[k], opts[k], x, y))
    med = {k: statistics.median(v) for k, v in times.items()}
    ips = {k: batch / v for k, v in med.items()}
    print(
        f"{size:>2}x{size:<2} c={chans} w={width} threads={torch.get_num_threads()} "
        f"batch={batch}: separate {ips['separate']:7.0f} img/s ({med['separate'] * 1e3:6.1f} ms)"
        f" | fused {ips['fused']:7.0f} img/s ({med['fused'] * 1e3:6.1f} ms)"
        f" | speed-up x{med['separate'] / med['fused']:.2f}  (logit rel. diff {err:.1e})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="5 steps, 8x8 only")
    args = parser.parse_args()
    cases = [(8, 1, 10, 0.25)] if args.quick else [(8, 1, 10, 0.25), (32, 3, 100, 0.25)]
    steps = 5 if args.quick else args.steps
    for threads in args.threads:
        torch.set_num_threads(threads)
        for size, chans, classes, width in cases:
            bench_case(size, chans, classes, width, args.batch, steps)


if __name__ == "__main__":
    main()
