"""The 15 common corruptions of Hendrycks & Dietterich (ICLR 2019), one definition each.

Every constant table is that of the CIFAR-10-C/100-C generator, ImageNet-C/create_c/
make_cifar_c.py in hendrycks/robustness (the function of the same name there); a ``table``
entry is the tuple ``c`` of one severity, in the original's order. Each definition has

- ``sample(rng, image, c, s)``: the random draws of one image (HWC uint8 numpy), made with
  ``rng`` in the original's order of calls (``normal``, ``uniform``, ``poisson``, ``random``,
  ``integers``, NumPy ``Generator`` names), so a test can hand in a generator that replays the
  reference's stream;
- ``apply(x, c, draws, s)``: the corruption of a float64 batch (N, C, H, W) in [0, 1] with the
  stacked draws, on x's device, returning values on the 0..255 scale before clipping and the
  truncation to uint8 that the original's final ``np.uint8`` does.

``s`` is the spatial scale ``min(H, W) / 32``: lengths in pixels (blur radii and sigmas,
displacements, the frost photographs' zoom) are multiplied by it, so at 32×32 every constant is
Hendrycks' own; relative quantities (zoom factors, the pixelation factor, noise levels) are not.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from io import BytesIO
from typing import Any

import numpy as np
import torch
from PIL import Image

from quantcal.training import corruptions_ops as ops

Draws = dict[str, np.ndarray]
_IMSIZE = 32  # make_cifar_c.py, elastic_transform: IMSIZE = 32
_GRAY = (0.299, 0.587, 0.114)  # OpenCV COLOR_RGB2GRAY (make_cifar_c.py, snow)
_FROST_GRAY = (0.2989, 0.5870, 0.1140)  # imagecorruptions/corruptions.py, rgb2gray (frost)


@dataclass(frozen=True)
class Corruption:
    """One corruption: its CIFAR constants per severity, its draws and its batched form."""

    name: str
    table: tuple[Any, ...]
    apply: Callable[[torch.Tensor, Any, Draws, float], torch.Tensor]
    sample: Callable[[Any, np.ndarray, Any, float], Draws] | None = None


def _t(a: np.ndarray, x: torch.Tensor) -> torch.Tensor:
    """Stacked draws (N, H, W, C) or (N, ...) as a tensor on x's device and dtype; HWC -> CHW."""
    t = torch.from_numpy(np.ascontiguousarray(a)).to(x.device, x.dtype)
    return t.permute(0, 3, 1, 2) if t.ndim == 4 else t


def _length(v: float, s: float) -> int:
    """A whole number of pixels scaled by s, rounded half up, at least 0."""
    return max(0, int(np.floor(v * s + 0.5)))


# -- noise ---------------------------------------------------------------------------------------


def _gaussian_noise_sample(rng: Any, img: np.ndarray, c: float, s: float) -> Draws:
    return {"noise": rng.normal(0.0, c, img.shape)}


def _gaussian_noise(x: torch.Tensor, c: float, d: Draws, s: float) -> torch.Tensor:
    """x + N(0, c²) per pixel and channel (gaussian_noise)."""
    return (x + _t(d["noise"], x)) * 255


def _shot_noise_sample(rng: Any, img: np.ndarray, c: float, s: float) -> Draws:
    return {"counts": rng.poisson(img / 255.0 * c)}


def _shot_noise(x: torch.Tensor, c: float, d: Draws, s: float) -> torch.Tensor:
    """Poisson(c·x) / c per pixel and channel (shot_noise)."""
    return _t(d["counts"], x) / c * 255


def _impulse_noise_sample(rng: Any, img: np.ndarray, c: float, s: float) -> Draws:
    # scikit-image util.random_noise(mode="s&p", amount=c, salt_vs_pepper=0.5): a pixel is hit
    # with probability c (``_bernoulli``: rng.random(shape) <= p, no draw for p = 0), then salt
    # (1) where a second rng.random(shape) <= 0.5, else pepper (0).
    hit = rng.random(img.shape) <= c if c > 0 else np.zeros(img.shape, dtype=bool)
    salt = rng.random(img.shape) <= 0.5
    return {"code": np.where(hit, np.where(salt, 1, -1), 0).astype(np.int8)}


def _impulse_noise(x: torch.Tensor, c: float, d: Draws, s: float) -> torch.Tensor:
    """Salt-and-pepper noise on a fraction c of the values (impulse_noise)."""
    code = _t(d["code"], x)
    return torch.where(code > 0, 1.0, torch.where(code < 0, 0.0, x)) * 255


# -- blurs ---------------------------------------------------------------------------------------


def _defocus_blur(x: torch.Tensor, c: tuple[float, float], d: Draws, s: float) -> torch.Tensor:
    """Correlation with an antialiased disk of radius c[0], Gaussian alias blur c[1]
    (defocus_blur, ``disk``; OpenCV filter2D, BORDER_REFLECT_101)."""
    kernel = ops.disk_kernel(c[0] * s, c[1] * s, s)
    return ops.correlate2d(x, kernel.to(x.dtype), "reflect101") * 255


def _glass_delta(c: tuple[float, int, int], s: float) -> int:
    return max(1, _length(c[1], s))


def _glass_positions(h: int, w: int, delta: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows and columns visited, in the original's order (``range(H - δ, δ, -1)``, row-major)."""
    hs = np.arange(h - delta, delta, -1)
    ws = np.arange(w - delta, delta, -1)
    rows, cols = np.meshgrid(hs, ws, indexing="ij")
    return rows.ravel(), cols.ravel()


def _glass_blur_sample(rng: Any, img: np.ndarray, c: tuple[float, int, int], s: float) -> Draws:
    delta = _glass_delta(c, s)
    n = len(_glass_positions(img.shape[0], img.shape[1], delta)[0])
    # one np.random.randint(-δ, δ, size=(2,)) -> (dx, dy) per position and iteration
    return {"dxy": rng.integers(-delta, delta, (c[2], n, 2))}


def _glass_blur(x: torch.Tensor, c: tuple[float, int, int], d: Draws, s: float) -> torch.Tensor:
    """Gaussian blur (sigma c[0]), truncated to uint8, then c[2] passes of local pixel moves by
    up to c[1], then the blur again (glass_blur).

    The original's "swap" ``x[h, w], x[h', w'] = x[h', w'], x[h, w]`` acts on NumPy views of
    the channel vectors, so it is a copy: ``x[h, w] ← x[h + dy, w + dx]`` with dx, dy drawn in
    [-δ, δ - 1], positions visited from the bottom-right. For δ = 1 (every CIFAR severity) each
    source is still unmodified when read, so a pass is one parallel gather, which equals the
    loop exactly; for δ > 1 (larger images, other tables) the copies run in the original's
    order, batched over images.
    """
    sigma = c[0] * s
    delta = _glass_delta(c, s)
    n, ch, h, w = x.shape
    y = torch.floor(ops.gaussian_filter(x, sigma, 4.0, "edge") * 255)
    rows, cols = _glass_positions(h, w, delta)
    flat = y.reshape(n, ch, h * w).clone()
    target = torch.from_numpy(rows * w + cols).to(x.device)
    dxy = torch.from_numpy(d["dxy"]).to(x.device)  # (N, iterations, P, 2)
    tr = torch.from_numpy(rows).to(x.device)
    tc = torch.from_numpy(cols).to(x.device)
    for it in range(dxy.shape[1]):
        source = (tr + dxy[:, it, :, 1]) * w + (tc + dxy[:, it, :, 0])  # (N, P)
        if delta == 1:
            moved = flat.gather(2, source.unsqueeze(1).expand(n, ch, -1))
            flat.scatter_(2, target.view(1, 1, -1).expand(n, ch, -1), moved)
        else:
            batch = torch.arange(n, device=x.device)
            for k in range(target.numel()):
                flat[batch, :, target[k]] = flat[batch, :, source[:, k]]
    y = flat.reshape(n, ch, h, w) / 255
    return ops.gaussian_filter(y, sigma, 4.0, "edge") * 255


def _motion_sample(rng: Any, img: np.ndarray, c: Any, s: float) -> Draws:
    return {"angle": np.asarray(rng.uniform(-45, 45))}


def _motion_blur(x: torch.Tensor, c: tuple[float, float], d: Draws, s: float) -> torch.Tensor:
    """ImageMagick motion blur, radius c[0], sigma c[1], angle U(-45°, 45°) (motion_blur),
    as imagecorruptions' ``_motion_blur`` re-derives it; rounded as ImageMagick's 8-bit PNG
    output is (imagecorruptions truncates instead)."""
    blurred = ops.motion_blur(x * 255, _length(c[0], s), c[1] * s, d["angle"])
    return torch.round(blurred)


def _zoom_blur(x: torch.Tensor, c: tuple[float, float], d: Draws, s: float) -> torch.Tensor:
    """Mean of x and its clipped zooms by ``np.arange(1, c[0], c[1])`` (zoom_blur)."""
    factors = np.arange(1, c[0], c[1])
    out = torch.zeros_like(x)
    for z in factors:
        out += ops.clipped_zoom(x, float(z))
    return (x + out) / (len(factors) + 1) * 255


# -- weather -------------------------------------------------------------------------------------


def _snow_sample(rng: Any, img: np.ndarray, c: tuple, s: float) -> Draws:
    field = rng.normal(c[0], c[1], img.shape[:2])
    return {"field": field, "angle": np.asarray(rng.uniform(-135, -45))}


def _gray(x: torch.Tensor, weights: tuple[float, float, float]) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    w = torch.tensor(weights, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def _snow(x: torch.Tensor, c: tuple, d: Draws, s: float) -> torch.Tensor:
    """Snow (snow): a N(c[0], c[1]²) field, clipped-zoomed by c[2], cut below c[3], stored as
    an 8-bit image, motion-blurred (radius c[4], sigma c[5], angle U(-135°, -45°)) and rounded
    to 8 bits; the image is whitened to ``c[6]·x + (1 - c[6])·max(x, 1.5·gray + 0.5)`` and the
    layer is added twice, once rotated by 180°."""
    layer = ops.clipped_zoom(_t(d["field"], x).unsqueeze(1), c[2])
    layer = torch.where(layer < c[3], 0.0, layer)
    layer = torch.floor(layer.clamp(0, 1) * 255)
    layer = torch.round(ops.motion_blur(layer, _length(c[4], s), c[5] * s, d["angle"])) / 255
    x = c[6] * x + (1 - c[6]) * torch.maximum(x, _gray(x, _GRAY) * 1.5 + 0.5)
    return (x + layer + torch.rot90(layer, 2, dims=(-2, -1))).clamp(0, 1) * 255


@lru_cache(maxsize=8)
def frost_photo(idx: int) -> np.ndarray:
    """Frost photograph ``idx`` (0..4) as HWC uint8 RGB, at the 0.2 scale make_cifar_c.py's
    ``frost`` resizes it to (OpenCV INTER_LINEAR, done once; package data under frost/)."""
    path = resources.files("quantcal.training").joinpath("frost", f"frost{idx + 1}.png")
    with path.open("rb") as f, Image.open(f) as im:
        return np.array(im.convert("RGB"))


@lru_cache(maxsize=64)
def _frost_scaled(idx: int, factor: float) -> np.ndarray:
    photo = frost_photo(idx)
    if factor == 1.0:
        return photo
    t = torch.from_numpy(photo).permute(2, 0, 1)[None].double()
    size = (int(np.ceil(photo.shape[0] * factor)), int(np.ceil(photo.shape[1] * factor)))
    out = torch.nn.functional.interpolate(
        t, size=size, mode="bilinear", align_corners=False, antialias=factor < 1
    )
    return out[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def _frost_sample(rng: Any, img: np.ndarray, c: Any, s: float) -> Draws:
    h, w = img.shape[:2]
    idx = int(rng.integers(5))  # np.random.randint(5): frost6 is never drawn
    fh, fw = frost_photo(idx).shape[:2]
    factor = max(s, (h + 1) / fh, (w + 1) / fw)
    photo = _frost_scaled(idx, round(factor, 6))
    top = int(rng.integers(0, photo.shape[0] - h))
    left = int(rng.integers(0, photo.shape[1] - w))
    return {"crop": photo[top : top + h, left : left + w]}


def _frost(x: torch.Tensor, c: tuple[float, float], d: Draws, s: float) -> torch.Tensor:
    """``c[0]·x + c[1]·frost`` on the 0..255 scale with a random crop of one of the first five
    frost photographs (frost); gray images take the crop's gray value."""
    crop = _t(d["crop"], x)
    if x.shape[1] == 1:
        crop = _gray(crop, _FROST_GRAY)
    return c[0] * x * 255 + c[1] * crop


def _next_pow2(n: int) -> int:
    return 1 if n <= 1 else 2 ** (n - 1).bit_length()


def _fog_sample(rng: Any, img: np.ndarray, c: tuple[float, float], s: float) -> Draws:
    h, w = img.shape[:2]
    size = _next_pow2(max(h, w))  # imagecorruptions/corruptions.py, fog; 32 at CIFAR size
    plasma = ops.plasma_fractal(lambda lo, hi, shape: rng.uniform(lo, hi, shape), size, c[1])
    return {"plasma": plasma[:h, :w]}


def _fog(x: torch.Tensor, c: tuple[float, float], d: Draws, s: float) -> torch.Tensor:
    """``(x + c[0]·plasma) · max(x) / (max(x) + c[0])`` with a diamond-square plasma of wibble
    decay c[1] (fog)."""
    peak = x.amax(dim=(1, 2, 3), keepdim=True)
    y = x + c[0] * _t(d["plasma"], x).unsqueeze(1)
    return (y * peak / (peak + c[0])).clamp(0, 1) * 255


# -- digital -------------------------------------------------------------------------------------


def _brightness(x: torch.Tensor, c: float, d: Draws, s: float) -> torch.Tensor:
    """HSV value + c, clipped (brightness). Hue and saturation kept, RGB is linear in V:
    ``(rgb / V) · min(V + c, 1)`` with V = max(r, g, b); black becomes gray ``min(c, 1)``;
    a gray image is ``x + c``."""
    v = x.amax(dim=1, keepdim=True)
    v_new = (v + c).clamp(max=1)
    share = x / torch.where(v > 0, v, 1.0)  # 1 exactly on the channel holding V
    return torch.where(v > 0, share * v_new, v_new).clamp(0, 1) * 255


def _contrast(x: torch.Tensor, c: float, d: Draws, s: float) -> torch.Tensor:
    """``(x - mean) · c + mean``, means per channel over the image (contrast)."""
    m = x.mean(dim=(2, 3), keepdim=True)
    return ((x - m) * c + m).clamp(0, 1) * 255


def _elastic_sample(rng: Any, img: np.ndarray, c: tuple[float, float, float], s: float) -> Draws:
    h, w = img.shape[:2]
    out: Draws = {}
    if c[2] > 0:  # no affine draw when its amplitude is 0 (imagecorruptions' ImageNet form)
        out["affine"] = rng.uniform(-c[2] * s, c[2] * s, (3, 2))
    out["dx"] = rng.uniform(-1, 1, (h, w))
    out["dy"] = rng.uniform(-1, 1, (h, w))
    return out


def _affine_grid(h: int, w: int, jitter: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Source coordinates of OpenCV ``warpAffine(getAffineTransform(pts1, pts1 + jitter))``
    as make_cifar_c.py sets it up (pts1 from the centre ± a third of the short side, in the
    original's (row, col) order read by OpenCV as (x, y)), rounded to OpenCV's 1/32 pixel."""
    center = np.float32([h, w]) // 2
    sq = min(h, w) // 3
    pts1 = np.float32([center + sq, [center[0] + sq, center[1] - sq], center - sq])
    pts2 = (pts1 + jitter.astype(np.float32)).astype(np.float64)
    a = np.concatenate([pts1.astype(np.float64), np.ones((3, 1))], axis=1)
    m = np.linalg.solve(a, pts2).T  # dst = m @ [x, y, 1]
    inv = np.linalg.inv(np.vstack([m, [0, 0, 1]]))[:2]
    yy, xx = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w), indexing="ij")
    sx = inv[0, 0] * xx + inv[0, 1] * yy + inv[0, 2]
    sy = inv[1, 0] * xx + inv[1, 1] * yy + inv[1, 2]
    return np.round(sy * 32) / 32, np.round(sx * 32) / 32


def _elastic_transform(
    x: torch.Tensor, c: tuple[float, float, float], d: Draws, s: float
) -> torch.Tensor:
    """Random affine warp (corner jitter U(-c[2], c[2]), BORDER_REFLECT_101), then the elastic
    displacement ``c[0] · gaussian(U(-1, 1), sigma=c[1], truncate=3, reflect)`` per axis,
    sampled bilinearly with reflection (elastic_transform; c in pixels, = IMSIZE · factor).
    OpenCV's fixed-point interpolation is followed to its 1/32-pixel coordinate grid, not bit
    for bit."""
    h, w = x.shape[-2:]
    if "affine" in d:
        grids = [_affine_grid(h, w, j) for j in d["affine"]]
        sy = torch.from_numpy(np.stack([g[0] for g in grids])).to(x)
        sx = torch.from_numpy(np.stack([g[1] for g in grids])).to(x)
        x = ops.sample_bilinear(x, sy, sx, "reflect101")
    alpha, sigma = c[0] * s, c[1] * s

    def field(u: np.ndarray) -> torch.Tensor:
        smooth = ops.gaussian_filter(_t(u, x).unsqueeze(1), sigma, 3.0, "symmetric")
        return (smooth * alpha).float().to(x.dtype)[:, 0]  # .astype(np.float32)

    dx, dy = field(d["dx"]), field(d["dy"])
    yy = torch.arange(h, device=x.device, dtype=x.dtype).view(1, h, 1)
    xx = torch.arange(w, device=x.device, dtype=x.dtype).view(1, 1, w)
    out = ops.sample_bilinear(x, yy + dy, xx + dx, "symmetric")
    return out.clamp(0, 1) * 255


def _pixelate(x: torch.Tensor, c: tuple[float, str], d: Draws, s: float) -> torch.Tensor:
    """Pillow BOX resize to ``int(side · c[0])`` and back (pixelate; back with BOX in the
    CIFAR code, NEAREST in imagecorruptions' ImageNet form, c[1])."""
    h, w = x.shape[-2:]
    u = torch.round(x * 255)
    small = ops.pil_resize_box(u, max(1, int(h * c[0])), max(1, int(w * c[0])))
    if c[1] == "nearest":
        return ops.pil_resize_nearest(small, h, w)
    return ops.pil_resize_box(small, h, w)


def _jpeg_compression(x: torch.Tensor, c: int, d: Draws, s: float) -> torch.Tensor:
    """Pillow JPEG at quality c and decoded (jpeg_compression); per image on the CPU, gray
    images as 8-bit luminance JPEGs."""
    u = torch.round(x * 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = []
    for img in u:
        im = Image.fromarray(img[..., 0] if img.shape[2] == 1 else img)
        buf = BytesIO()
        im.save(buf, "JPEG", quality=c)
        buf.seek(0)
        with Image.open(buf) as dec:
            arr = np.array(dec)
        out.append(arr.reshape(img.shape))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).to(x.device, x.dtype)


# -- the table -----------------------------------------------------------------------------------

DEFINITIONS: tuple[Corruption, ...] = (
    Corruption(
        "gaussian_noise", (0.04, 0.06, 0.08, 0.09, 0.10), _gaussian_noise, _gaussian_noise_sample
    ),
    Corruption("shot_noise", (500, 250, 100, 75, 50), _shot_noise, _shot_noise_sample),
    Corruption(
        "impulse_noise", (0.01, 0.02, 0.03, 0.05, 0.07), _impulse_noise, _impulse_noise_sample
    ),
    Corruption(
        "defocus_blur", ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)), _defocus_blur
    ),
    Corruption(
        "glass_blur",
        ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)),
        _glass_blur,
        _glass_blur_sample,
    ),
    Corruption(
        "motion_blur", ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)), _motion_blur, _motion_sample
    ),
    Corruption(
        "zoom_blur",
        ((1.06, 0.01), (1.11, 0.01), (1.16, 0.01), (1.21, 0.01), (1.26, 0.01)),
        _zoom_blur,
    ),
    Corruption(
        "snow",
        (
            (0.1, 0.2, 1, 0.6, 8, 3, 0.95),
            (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
            (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
            (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
            (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8),
        ),
        _snow,
        _snow_sample,
    ),
    Corruption(
        "frost",
        ((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)),
        _frost,
        _frost_sample,
    ),
    Corruption("fog", ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)), _fog, _fog_sample),
    Corruption("brightness", (0.05, 0.1, 0.15, 0.2, 0.3), _brightness),
    Corruption("contrast", (0.75, 0.5, 0.4, 0.3, 0.15), _contrast),
    Corruption(
        "elastic_transform",
        (
            (_IMSIZE * 0, _IMSIZE * 0, _IMSIZE * 0.08),
            (_IMSIZE * 0.05, _IMSIZE * 0.2, _IMSIZE * 0.07),
            (_IMSIZE * 0.08, _IMSIZE * 0.06, _IMSIZE * 0.06),
            (_IMSIZE * 0.1, _IMSIZE * 0.04, _IMSIZE * 0.05),
            (_IMSIZE * 0.1, _IMSIZE * 0.03, _IMSIZE * 0.03),
        ),
        _elastic_transform,
        _elastic_sample,
    ),
    Corruption(
        "pixelate",
        ((0.95, "box"), (0.9, "box"), (0.85, "box"), (0.75, "box"), (0.65, "box")),
        _pixelate,
    ),
    Corruption("jpeg_compression", (80, 65, 58, 50, 40), _jpeg_compression),
)
