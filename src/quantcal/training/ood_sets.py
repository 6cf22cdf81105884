"""Built-in unknown-input sets that need no download, each named as what it is (issue #25,
item 4): made from a split's own images (their size, channels and pixel statistics), so they fit
any dataset and any image size.

- ``gaussian_noise``: i.i.d. Gaussian pixels with each channel's mean and standard deviation of
  the reference images (Hendrycks & Gimpel 2017 use Gaussian noise images as an OOD set);
- ``uniform_noise``: i.i.d. uniform pixels in [0, 255];
- ``blurred``: each reference image blurred by a Gaussian of standard deviation H / 8 pixels,
  which leaves only coarse blobs of its colours;
- ``pixel_shuffled``: each reference image with its pixel positions permuted (the same colours,
  no structure).

Every set is deterministic: image ``i`` comes from ``torch.Generator`` seeded with
``seed * 1_000_003 + i``, so a subset or another batch size gives the same images. Labels are
-1 (no known class); ``source`` is ``"synthetic:NAME"``.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from quantcal.training.splits import Split

__all__ = ["OOD_NPZ_KEYS", "SYNTHETIC_OOD", "load_ood_npz", "ood_split", "synthetic_ood"]

#: The members an ``npz:`` unknown-input file may hold its images in, the first present used.
OOD_NPZ_KEYS = ("images", "test_images", "x_test", "x")

#: The built-in sets, in the order they are listed.
SYNTHETIC_OOD = ("gaussian_noise", "uniform_noise", "blurred", "pixel_shuffled")


def _generator(seed: int, i: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + i)


def _gaussian(ref: torch.Tensor, seed: int) -> torch.Tensor:
    x = ref.double()
    mean = x.mean(dim=(0, 2, 3)).view(-1, 1, 1)
    std = x.std(dim=(0, 2, 3)).view(-1, 1, 1).clamp(min=1.0)
    out = [
        (
            mean
            + std * torch.randn(ref.shape[1:], generator=_generator(seed, i), dtype=torch.float64)
        )
        for i in range(ref.shape[0])
    ]
    return torch.stack(out).round().clamp(0, 255).to(torch.uint8)


def _uniform(ref: torch.Tensor, seed: int) -> torch.Tensor:
    out = [
        torch.randint(0, 256, ref.shape[1:], generator=_generator(seed, i), dtype=torch.int64)
        for i in range(ref.shape[0])
    ]
    return torch.stack(out).to(torch.uint8)


def _blurred(ref: torch.Tensor, seed: int) -> torch.Tensor:
    sigma = max(ref.shape[2], ref.shape[3]) / 8
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = (k / k.sum()).to(torch.float32)
    c = ref.shape[1]
    x = ref.float()
    pad_h, pad_w = min(radius, ref.shape[2] - 1), min(radius, ref.shape[3] - 1)
    for dim, pad in ((3, pad_w), (2, pad_h)):  # separable: width, then height
        size = 2 * pad + 1
        kk = k[radius - pad : radius + pad + 1]
        kk = kk / kk.sum()
        shape = (c, 1, 1, size) if dim == 3 else (c, 1, size, 1)
        padding = (pad, pad, 0, 0) if dim == 3 else (0, 0, pad, pad)
        kernel = kk.view((1, 1, 1, size) if dim == 3 else (1, 1, size, 1)).expand(shape)
        x = F.conv2d(F.pad(x, padding, mode="reflect"), kernel, groups=c)
    return x.round().clamp(0, 255).to(torch.uint8)


def _shuffled(ref: torch.Tensor, seed: int) -> torch.Tensor:
    n, c, h, w = ref.shape
    flat = ref.reshape(n, c, h * w)
    out = [flat[i][:, torch.randperm(h * w, generator=_generator(seed, i))] for i in range(n)]
    return torch.stack(out).reshape(n, c, h, w)


_MAKERS = {
    "gaussian_noise": _gaussian,
    "uniform_noise": _uniform,
    "blurred": _blurred,
    "pixel_shuffled": _shuffled,
}


def synthetic_ood(name: str, reference: Split, *, seed: int = 0) -> Split:
    """The built-in unknown-input set ``name`` (:data:`SYNTHETIC_OOD`) made from ``reference``'s
    images; preprocessed like it (same mean/std or transform)."""
    if name not in _MAKERS:
        raise ValueError(
            f"unknown synthetic OOD set {name!r}; the built-in sets are {', '.join(SYNTHETIC_OOD)}"
        )
    images = _MAKERS[name](reference.images, seed)
    n = images.shape[0]
    return dataclasses.replace(
        reference,
        images=images,
        labels=torch.full((n,), -1, dtype=torch.int64),
        indices=torch.arange(n, dtype=torch.int64),
        source=f"synthetic:{name}",
    )


def load_ood_npz(path: str, reference: Split) -> Split:
    """Unknown-input images from an npz file (uint8 ``(N, H, W)`` or ``(N, H, W, C)`` under one
    of :data:`OOD_NPZ_KEYS`; labels, if any, are ignored), preprocessed like ``reference``.
    ValueError when the file is unreadable, holds no such member, or its images are not the
    shape of the dataset's (say which, and what to do)."""
    from pathlib import Path

    import numpy as np

    from quantcal.training.loaders import npz_file, npz_member, open_npz, to_nchw

    p = npz_file(Path(path))
    with open_npz(p) as z:
        key = next((k for k in OOD_NPZ_KEYS if k in z.files), None)
        if key is None:
            raise ValueError(
                f"{p} has no image array: an unknown-input file needs one of "
                f"{', '.join(OOD_NPZ_KEYS)} (uint8, (N, H, W) or (N, H, W, C)); it has "
                f"{sorted(z.files)}"
            )
        images = to_nchw(npz_member(z, p, key), f"{p}:{key}")
    want = tuple(reference.images.shape[1:])
    if tuple(images.shape[1:]) != want or images.shape[0] == 0:
        got = "no images" if images.shape[0] == 0 else f"images of (C, H, W) = {images.shape[1:]}"
        raise ValueError(
            f"{p}:{key} holds {got}, but the dataset's images are (C, H, W) = {want}: resize "
            "(and convert) them to the dataset's size and channels before scoring them as "
            "unknown inputs"
        )
    n = images.shape[0]
    return dataclasses.replace(
        reference,
        images=torch.from_numpy(np.ascontiguousarray(images)),
        labels=torch.full((n,), -1, dtype=torch.int64),
        indices=torch.arange(n, dtype=torch.int64),
        source=f"npz:{path}",
    )


def ood_split(spec: str, reference: Split, *, seed: int = 0) -> Split:
    """The unknown-input set ``spec`` (``"synthetic:NAME"`` or ``"npz:PATH"``, the canonical
    forms of ``[data] ood``) preprocessed like ``reference``."""
    if spec.startswith("npz:"):
        return load_ood_npz(spec[4:], reference)
    name = spec.split(":", 1)[1] if spec.startswith("synthetic:") else spec
    return synthetic_ood(name, reference, seed=seed)
