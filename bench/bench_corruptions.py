"""Speed of quantcal's common corruptions against imagecorruptions, on the same 32×32 images.

    .venv-corrupt/bin/python bench/bench_corruptions.py [--n 2000] [--repeats 3] [--severity 3]

(``make test-corruptions`` builds .venv-corrupt.) N CIFAR-like uint8 RGB images (a seeded random
8×8 pattern enlarged bilinearly to 32×32 plus a little noise) go through each of the 15
corruptions at one severity: ``corrupt(images, name, severity)`` (one batched call, CPU,
batches of 256) against imagecorruptions' ``corrupt(image, corruption_name=..., severity=...)``
image by image, as its users call it. Contenders are interleaved and repeated on one thread;
medians are printed as images per second with the ratio. The work is not identical:
imagecorruptions carries the ImageNet-C constants (larger blur kernels, three glass-blur passes
of up to 2 pixels at severity 3) while quantcal carries the CIFAR ones, and imagecorruptions'
frost reads and resizes a full-size photograph per image. imagecorruptions 1.1.2 predates
NumPy 2 and scikit-image 0.19; the two compatibility shims of tests/test_corruptions.py are
applied here too.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from _race import race
from quantcal.training.corruptions import CORRUPTIONS, corrupt


def _images(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 8, 8, generator=g)
    x = torch.nn.functional.interpolate(low, size=(32, 32), mode="bilinear", align_corners=False)
    x = x + 0.05 * torch.rand(n, 3, 32, 32, generator=g)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def _imagecorruptions():
    try:
        import imagecorruptions
        import imagecorruptions.corruptions as icc
    except ImportError:
        return None
    if not hasattr(np, "float_"):
        np.float_ = np.float64
    gaussian = icc.gaussian

    def gaussian_compat(*args, multichannel=None, **kwargs):
        if multichannel:
            kwargs["channel_axis"] = -1
        return gaussian(*args, **kwargs)

    icc.gaussian = gaussian_compat
    return imagecorruptions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--severity", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ic = _imagecorruptions()
    x = _images(args.n)
    hwc = [img.permute(1, 2, 0).numpy().copy() for img in x]
    print(
        f"{args.n} images 32x32 RGB, severity {args.severity}, {args.threads} thread(s), "
        f"median of {args.repeats} (images per second)"
    )
    if ic is None:
        print("imagecorruptions is not installed: quantcal alone (make test-corruptions)")
    print(f"{'corruption':<18} {'quantcal':>10} {'imagecorr.':>11} {'ratio':>7}")
    for name in CORRUPTIONS:
        contenders = {"quantcal": lambda name=name: corrupt(x, name, args.severity)}
        if ic is not None:

            def peer(name: str = name) -> list:
                np.random.seed(0)
                return [ic.corrupt(im, corruption_name=name, severity=args.severity) for im in hwc]

            contenders["imagecorruptions"] = peer
        res = race(contenders, args.repeats)
        ours = args.n / res["quantcal"][0]
        line = f"{name:<18} {ours:>10,.0f}"
        if ic is not None:
            theirs = args.n / res["imagecorruptions"][0]
            line += f" {theirs:>11,.0f} {ours / theirs:>6.1f}x"
        print(line, flush=True)


if __name__ == "__main__":
    main()
