"""Common corruptions of Hendrycks & Dietterich (ICLR 2019, "Benchmarking Neural Network
Robustness to Common Corruptions and Perturbations"): 15 types at 5 severities, with the
constants of their CIFAR-10-C/100-C generator (ImageNet-C/create_c/make_cifar_c.py in
hendrycks/robustness), re-derived as batched torch operations.

A shift is named ``"name:severity"`` (``"gaussian_noise:3"``, ``"jpeg:5"``);
:func:`expand_shifts` turns a study's list of specs into canonical names and :func:`corrupt`
applies one shift to uint8 images (N, C, H, W), C in {1, 3}, of any size.

**Sizes.** The CIFAR constants are for 32×32 images. For an H×W image every length in pixels
(blur radii and sigmas, glass blur's move distance, elastic displacements and their smoothing,
the frost photographs' zoom, motion-blur lengths) is multiplied by ``s = min(H, W) / 32``
(:func:`spatial_scale`), whole-pixel lengths rounded half up; relative quantities (noise levels,
zoom factors, the pixelation factor, JPEG quality) stay. At 32×32 every constant is Hendrycks'.
The fog map is the next power of two at or above ``max(H, W)`` (imagecorruptions' rule; 32 at
CIFAR size).

**Randomness.** Image i's draws come from a NumPy ``Generator`` seeded from
``SeedSequence([seed, start + i, corruption index, severity])``, so a subset, another batch size
or another ``start`` offset gives the same image. Draws are made per image on the CPU in the
original's order; the arithmetic runs batched, in float64, on ``device``.

**Where it departs from the original** (details in each definition's docstring in
``corruptions_defs.py``): motion blur (and snow's streaks) use imagecorruptions' re-derivation of
ImageMagick's ``MotionBlurImage`` instead of ImageMagick itself, rounded to 8 bits as
ImageMagick's output is; the elastic transform's affine warp follows OpenCV's 1/32-pixel
coordinate grid but not its fixed-point weights bit for bit; frost uses copies of the five
photographs already at the original's 0.2 scale (package data), resampled bilinearly for other
image sizes; gray images use the gray forms of imagecorruptions (brightness ``x + c``, gray
frost crops, 8-bit luminance JPEG); non-square images zoom each axis on its own. Glass blur's
pixel "swaps" are, as in the original (NumPy views), copies; they are reproduced exactly.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
    "snow",
    "frost",
    "fog",
    "brightness",
    "contrast",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
)
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)
ALIASES: dict[str, str] = {
    "gaussian": "gaussian_noise",
    "shot": "shot_noise",
    "impulse": "impulse_noise",
    "defocus": "defocus_blur",
    "glass": "glass_blur",
    "motion": "motion_blur",
    "zoom": "zoom_blur",
    "elastic": "elastic_transform",
    "pixelation": "pixelate",
    "jpeg": "jpeg_compression",
}
MIN_SIDE = 4


class ShiftError(ValueError):
    """A shift spec or a corruption name/severity that is not valid; the message says what
    was wrong and lists the valid names or range."""


def _valid_names() -> str:
    aliases = ", ".join(f"{k} ({v})" for k, v in ALIASES.items())
    return f"valid names: {', '.join(CORRUPTIONS)}; aliases: {aliases}; or 'all'"


def canonical_name(name: str) -> str:
    """The corruption's canonical name: case, spaces and hyphens are ignored and aliases
    resolved ("JPEG" -> "jpeg_compression", "Gaussian Noise" -> "gaussian_noise")."""
    if not isinstance(name, str):
        raise ShiftError(f"corruption name must be a string, got {type(name).__name__}")
    key = name.strip().lower().replace("-", "_").replace(" ", "_")
    key = ALIASES.get(key, key)
    if key not in CORRUPTIONS:
        raise ShiftError(f"unknown corruption {name!r}; {_valid_names()}")
    return key


def _severity(value: Any, spec: str | None = None) -> int:
    where = f" in {spec!r}" if spec is not None else ""
    if isinstance(value, str):
        text = value.strip()
        if not (text.isdigit() or (text[:1] in "+-" and text[1:].isdigit())):
            raise ShiftError(f"severity{where} must be an integer in 1..5, got {value!r}")
        level = int(text)
    elif isinstance(value, bool):
        raise ShiftError(f"severity{where} must be an integer in 1..5, got {value!r}")
    else:
        try:
            level = operator.index(value)
        except TypeError:
            raise ShiftError(f"severity{where} must be an integer in 1..5, got {value!r}") from None
    if level not in SEVERITIES:
        raise ShiftError(f"severity{where} must be an integer in 1..5, got {level}")
    return level


def parse_shift(spec: str) -> tuple[str, int]:
    """``"name:severity"`` -> (canonical name, severity): ``"jpeg:5"`` ->
    ``("jpeg_compression", 5)``. Raises :class:`ShiftError` without a severity, for an unknown
    name or a severity that is not an integer in 1..5."""
    if not isinstance(spec, str):
        raise ShiftError(f"a shift spec is a string 'name:severity', got {type(spec).__name__}")
    name, sep, level = spec.partition(":")
    if not sep:
        raise ShiftError(f"shift {spec!r} needs a severity: 'name:severity', severity in 1..5")
    if name.strip().lower() == "all":
        raise ShiftError(f"{spec!r} names many shifts; expand it with expand_shifts")
    return canonical_name(name), _severity(level, spec)


def expand_shifts(specs: Sequence[str]) -> list[str]:
    """Canonical ``"name:severity"`` strings for a list of specs, deduplicated and ordered by
    ``CORRUPTIONS`` then severity. ``"all"`` is every type at every severity, ``"all:3"`` every
    type at severity 3, a name alone its five severities. A single string counts as one spec.
    Raises :class:`ShiftError` for an unknown name (listing the valid ones) or a severity that
    is not an integer in 1..5."""
    if isinstance(specs, str):
        specs = [specs]
    chosen: set[tuple[int, int]] = set()
    for spec in specs:
        if not isinstance(spec, str) or not spec.strip():
            raise ShiftError(f"a shift spec is a non-empty string 'name[:severity]', got {spec!r}")
        name, sep, level = spec.partition(":")
        levels = [_severity(level, spec)] if sep else list(SEVERITIES)
        if name.strip().lower() == "all":
            idxs = range(len(CORRUPTIONS))
        else:
            idxs = [CORRUPTIONS.index(canonical_name(name))]
        chosen.update((i, lv) for i in idxs for lv in levels)
    return [f"{CORRUPTIONS[i]}:{lv}" for i, lv in sorted(chosen)]


def spatial_scale(height: int, width: int) -> float:
    """The factor ``min(H, W) / 32`` by which lengths in pixels scale from the CIFAR
    constants."""
    return min(height, width) / 32


def image_rng(seed: int, index: int, name: str, severity: int) -> np.random.Generator:
    """Image ``index``'s generator for one shift: PCG64 from
    ``SeedSequence([seed, index, CORRUPTIONS.index(name), severity])``."""
    entropy = [seed, index, CORRUPTIONS.index(name), severity]
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy)))


def _check_images(images: Any) -> None:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise ValueError(f"images must be uint8 (0..255), got dtype {images.dtype}")
    if images.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got {images.ndim} dimensions")
    n, c, h, w = images.shape
    if c not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels (N, C, H, W), got C = {c}")
    if n and min(h, w) < MIN_SIDE:
        raise ValueError(f"images must be at least {MIN_SIDE}x{MIN_SIDE}, got {h}x{w}")


def _check_count(value: Any, what: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{what} must be an integer >= {low}, got {value!r}")
    return int(value)


def corrupt(
    images: torch.Tensor,
    name: str,
    severity: int,
    *,
    seed: int = 0,
    start: int = 0,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    params: Any = None,
    rng_for: Callable[[int], Any] | None = None,
) -> torch.Tensor:
    """Corrupt uint8 images (N, C, H, W), C in {1, 3}, with one shift; uint8 of the same shape
    on the CPU.

    ``name`` (aliases accepted) and ``severity`` (1..5) pick the corruption and its CIFAR
    constants (make_cifar_c.py); image i's randomness comes from :func:`image_rng` with
    ``(seed, start + i)``. The arithmetic runs on ``device`` (default: the images' device) in
    batches of ``batch_size``; the result is the original's ``np.uint8(clip(...))``: clipped to
    0..255 and truncated. N = 0 gives an empty tensor.

    For tests against reference implementations: ``params`` replaces the severity's constant
    tuple (e.g. imagecorruptions' ImageNet-C constants) and ``rng_for(index)`` supplies the
    generator of image ``index`` (anything with the NumPy ``Generator`` methods the
    corruption draws with). Raises :class:`ShiftError` for an unknown name or a bad severity,
    ValueError for images of the wrong dtype or shape.
    """
    from quantcal.training.corruptions_defs import DEFINITIONS

    name = canonical_name(name)
    severity = _severity(severity)
    _check_images(images)
    seed = _check_count(seed, "seed", 0)
    start = _check_count(start, "start", 0)
    batch_size = _check_count(batch_size, "batch_size", 1)
    defn = DEFINITIONS[CORRUPTIONS.index(name)]
    c = defn.table[severity - 1] if params is None else params
    dev = torch.device(device) if device is not None else images.device
    n, _, h, w = images.shape
    s = spatial_scale(h, w)
    if rng_for is None:

        def rng_for(index: int) -> np.random.Generator:
            return image_rng(seed, index, name, severity)

    cpu = images.detach().cpu()
    out = torch.empty(cpu.shape, dtype=torch.uint8)
    for b0 in range(0, n, batch_size):
        xb = cpu[b0 : b0 + batch_size]
        draws: dict[str, np.ndarray] = {}
        if defn.sample is not None:
            hwc = xb.permute(0, 2, 3, 1).numpy()
            per = [defn.sample(rng_for(start + b0 + j), hwc[j], c, s) for j in range(len(xb))]
            draws = {k: np.stack([np.asarray(p[k]) for p in per]) for k in per[0]}
        x = xb.to(dev, torch.float64) / 255
        y = defn.apply(x, c, draws, s)
        out[b0 : b0 + len(xb)] = torch.floor(y.clamp(0, 255)).to(torch.uint8).cpu()
    return out
