"""Batched image operations behind the common corruptions (``corruptions.py``).

Each function re-derives, on (N, C, H, W) float tensors, one operation of the libraries that
Hendrycks & Dietterich's reference code calls (ImageNet-C/create_c/make_cifar_c.py in
hendrycks/robustness): SciPy's ``gaussian_filter``, ``zoom`` and ``map_coordinates``, OpenCV's
``filter2D``, ``GaussianBlur`` and ``warpAffine``, ImageMagick's ``MotionBlurImage`` (as
re-implemented without ImageMagick by imagecorruptions/corruptions.py, ``_motion_blur``),
Pillow's BOX and NEAREST ``resize`` and the diamond-square ``plasma_fractal``. Where the
original rounds (Pillow's fixed-point resampling) the rounding is reproduced; where it cannot be
matched bit for bit the function says so.

Border modes use SciPy's names for the two reflections, which differ: ``"symmetric"`` repeats
the edge pixel (SciPy ``reflect``: d c b a | a b c d), ``"reflect101"`` does not (SciPy
``mirror``, OpenCV's default ``BORDER_REFLECT_101``, torch's ``reflect``: d c b | a b c d);
``"edge"`` repeats the edge pixel forever (SciPy ``nearest``, OpenCV ``BORDER_REPLICATE``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

BORDER_MODES = ("symmetric", "reflect101", "edge")


def border_index(idx: torch.Tensor, n: int, mode: str) -> torch.Tensor:
    """Map integer positions ``idx`` (any range) onto 0..n-1 by the border ``mode``."""
    if mode == "edge" or n == 1:
        return idx.clamp(0, n - 1)
    if mode == "symmetric":
        r = torch.remainder(idx, 2 * n)
        return torch.where(r >= n, 2 * n - 1 - r, r)
    if mode == "reflect101":
        r = torch.remainder(idx, 2 * n - 2)
        return torch.where(r >= n, 2 * n - 2 - r, r)
    raise ValueError(f"unknown border mode {mode!r}; expected one of {BORDER_MODES}")


def pad2d(x: torch.Tensor, ph: int, pw: int, mode: str) -> torch.Tensor:
    """Pad the last two dimensions by ``ph`` rows and ``pw`` columns on each side, by ``mode``
    (any pad width, also wider than the image)."""
    h, w = x.shape[-2:]
    rows = border_index(torch.arange(-ph, h + ph, device=x.device), h, mode)
    cols = border_index(torch.arange(-pw, w + pw, device=x.device), w, mode)
    return x.index_select(-2, rows).index_select(-1, cols)


def correlate2d(x: torch.Tensor, kernel: torch.Tensor, mode: str) -> torch.Tensor:
    """Each channel of ``x`` (N, C, H, W) correlated with the odd-sized 2-D ``kernel`` (not
    flipped: OpenCV ``filter2D`` and torch ``conv2d``), borders by ``mode``."""
    kh, kw = kernel.shape
    c = x.shape[1]
    weight = kernel.to(x).expand(c, 1, kh, kw)
    return F.conv2d(pad2d(x, kh // 2, kw // 2, mode), weight, groups=c)


def scipy_gaussian_kernel(sigma: float, truncate: float) -> np.ndarray:
    """SciPy's 1-D Gaussian weights (scipy/ndimage/_filters.py, ``gaussian_filter1d``): radius
    ``int(truncate * sigma + 0.5)``, ``exp(-x²/2σ²)`` normalised; sigma 0 is the identity."""
    if sigma <= 1e-15:
        return np.ones(1)
    radius = int(truncate * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    w = np.exp(-0.5 * x * x / (sigma * sigma))
    return w / w.sum()


def gaussian_filter(x: torch.Tensor, sigma: float, truncate: float, mode: str) -> torch.Tensor:
    """SciPy ``gaussian_filter`` over the two spatial dimensions of (N, C, H, W), as
    scikit-image's ``gaussian`` calls it: the same ``sigma`` on both axes, none across channels
    (``multichannel=True``)."""
    k = torch.from_numpy(scipy_gaussian_kernel(sigma, truncate))
    if k.numel() == 1:
        return x
    x = correlate2d(x, k[None, :], mode)
    return correlate2d(x, k[:, None], mode)


def cv2_gaussian_kernel(ksize: int, sigma: float) -> np.ndarray:
    """OpenCV ``getGaussianKernel(ksize, sigma)`` for sigma > 0: ``exp(-(i-(k-1)/2)²/2σ²)``
    normalised."""
    i = np.arange(ksize, dtype=np.float64) - (ksize - 1) / 2
    w = np.exp(-(i * i) / (2 * sigma * sigma))
    return w / w.sum()


def disk_kernel(radius: float, alias_blur: float, scale: float = 1.0) -> torch.Tensor:
    """Defocus kernel of make_cifar_c.py ``disk``: the indicator of ``X² + Y² <= radius²`` on
    the grid ``-L..L`` (L = 8 for radius <= 8, else radius), normalised, then blurred by an
    OpenCV ``GaussianBlur`` of size 3 (5 for radius > 8) and sigma ``alias_blur`` with
    BORDER_REFLECT_101 on that grid. At ``scale`` s the 8 and the Gaussian sizes scale with s
    (radius and alias_blur arrive already scaled). All-zero border rows/columns are cut (they
    change nothing in the filtering)."""
    small = radius <= 8 * scale
    half = max(round(8 * scale), 1) if small else int(radius)
    g_half = max(1, round(scale)) * (1 if small else 2)
    grid = np.arange(-half, half + 1, dtype=np.float64)
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    disk = ((xx**2 + yy**2) <= radius**2).astype(np.float32)
    disk /= disk.sum()
    g = cv2_gaussian_kernel(2 * g_half + 1, alias_blur)
    kernel = correlate2d(
        torch.from_numpy(disk.astype(np.float64))[None, None],
        torch.from_numpy(np.outer(g, g)),
        "reflect101",
    )[0, 0]
    rows = torch.nonzero(kernel.abs().sum(1) > 0).flatten()
    cols = torch.nonzero(kernel.abs().sum(0) > 0).flatten()
    r = int(max(half - rows.min().item(), rows.max().item() - half))
    c = int(max(half - cols.min().item(), cols.max().item() - half))
    return kernel[half - r : half + r + 1, half - c : half + c + 1].float()


def sample_bilinear(x: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor, mode: str) -> torch.Tensor:
    """Linear interpolation of (N, C, H, W) at float coordinates ``ys``, ``xs`` (N, H', W') of
    the border-extended image (SciPy ``map_coordinates(order=1)``; OpenCV's ``INTER_LINEAR``)."""
    n, c, h, w = x.shape
    y0 = torch.floor(ys)
    x0 = torch.floor(xs)
    fy = (ys - y0).unsqueeze(1)
    fx = (xs - x0).unsqueeze(1)
    y0 = y0.long()
    x0 = x0.long()
    flat = x.reshape(n, c, h * w)

    def tap(yi: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
        idx = border_index(yi, h, mode) * w + border_index(xi, w, mode)
        idx = idx.reshape(n, 1, -1).expand(n, c, -1)
        return flat.gather(2, idx).reshape(n, c, *ys.shape[1:])

    top = tap(y0, x0) * (1 - fx) + tap(y0, x0 + 1) * fx
    bottom = tap(y0 + 1, x0) * (1 - fx) + tap(y0 + 1, x0 + 1) * fx
    return top * (1 - fy) + bottom * fy


def motion_offsets(radius: int, sigma: float, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Weights and (dy, dx) offsets of ImageMagick's motion blur as imagecorruptions'
    ``_motion_blur`` re-derives it: width ``2·radius + 1`` (``getOptimalKernelWidth1D``),
    one-sided Gaussian weights ``exp(-i²/2σ²)`` for i = 0..width-1 normalised
    (``getMotionBlurKernel``), tap i reading the pixel at
    ``(ceil(i·sin a - 1/2), ceil(i·cos a - 1/2))`` from the output pixel, a in degrees."""
    width = 2 * radius + 1
    i = np.arange(width, dtype=np.float64)
    k = np.exp(-(i**2) / (2 * sigma**2)) / (np.sqrt(2 * np.pi) * sigma)
    k = k / k.sum()
    a = np.deg2rad(angle)
    py, px = width * np.sin(a), width * np.cos(a)
    hyp = math.hypot(py, px)
    dy = np.array([math.ceil(j * py / hyp - 0.5) for j in range(width)])
    dx = np.array([math.ceil(j * px / hyp - 0.5) for j in range(width)])
    return k, np.stack([dy, dx], axis=1)


def motion_blur(x: torch.Tensor, radius: int, sigma: float, angles: np.ndarray) -> torch.Tensor:
    """Motion blur of each image of (N, C, H, W) along its own angle (degrees): the weighted sum
    of the image shifted by each tap's offset, edge pixels repeated (imagecorruptions
    ``shift``); taps from the first one whose offset reaches the image size on are dropped, as
    ``_motion_blur``'s ``break`` does (no renormalisation)."""
    n, c, h, w = x.shape
    taps = [motion_offsets(radius, sigma, float(a)) for a in angles]
    weights = np.stack([t[0] for t in taps])
    offsets = np.stack([t[1] for t in taps])  # (N, width, 2)
    beyond = (np.abs(offsets[..., 0]) >= h) | (np.abs(offsets[..., 1]) >= w)
    weights = np.where(np.cumsum(beyond, axis=1) > 0, 0.0, weights)
    dev = x.device
    wt = torch.from_numpy(weights).to(dev, x.dtype)
    off = torch.from_numpy(offsets).to(dev)
    yy = torch.arange(h, device=dev).view(1, h, 1)
    xx = torch.arange(w, device=dev).view(1, 1, w)
    flat = x.reshape(n, c, h * w)
    out = torch.zeros_like(x)
    for i in range(weights.shape[1]):
        rows = (yy + off[:, i, 0].view(n, 1, 1)).clamp(0, h - 1)
        cols = (xx + off[:, i, 1].view(n, 1, 1)).clamp(0, w - 1)
        idx = (rows * w + cols).reshape(n, 1, h * w).expand(n, c, h * w)
        out += wt[:, i].view(n, 1, 1, 1) * flat.gather(2, idx).reshape(n, c, h, w)
    return out


@lru_cache(maxsize=512)
def zoom_matrix(n: int, factor: float) -> torch.Tensor:
    """(n, n) linear map of make_cifar_c.py ``clipped_zoom`` along one axis: crop the central
    ``ceil(n / z)`` pixels (from ``(n - ch) // 2``), enlarge them with SciPy
    ``zoom(order=1)`` to ``round(ch · z)`` pixels (output o reads input ``o·(ch-1)/(out-1)``),
    keep the central n (from ``(out - n) // 2``). Float64."""
    ch = int(np.ceil(n / float(factor)))
    top = (n - ch) // 2
    out = round(ch * factor)
    trim = (out - n) // 2
    step = (ch - 1) / (out - 1) if out > 1 else 0.0
    a = torch.zeros(n, n, dtype=torch.float64)
    for o in range(n):
        pos = (o + trim) * step
        i0 = min(int(np.floor(pos)), ch - 1)
        f = pos - i0
        a[o, top + i0] += 1 - f
        if f > 0:
            a[o, top + min(i0 + 1, ch - 1)] += f
    return a


def clipped_zoom(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``clipped_zoom`` of make_cifar_c.py on (N, C, H, W), each axis on its own (the original
    assumes square images)."""
    ah = zoom_matrix(x.shape[-2], float(factor)).to(x)
    aw = zoom_matrix(x.shape[-1], float(factor)).to(x)
    return ah @ x @ aw.T


@lru_cache(maxsize=128)
def pil_box_weights(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) fixed-point weights of Pillow's BOX resampling (libImaging/Resample.c,
    ``precompute_coeffs`` with ``box_filter`` and ``normalize_coeffs_8bpc``): output pixel
    xx averages the inputs whose centres fall in ``(center - s/2, center + s/2]``, s = n_in/n_out
    (at least 1), weights scaled to 2²² and rounded. Float64 holding integers."""
    scale = n_in / n_out
    fscale = max(scale, 1.0)
    support = 0.5 * fscale
    kk = torch.zeros(n_out, n_in, dtype=torch.float64)
    for xx in range(n_out):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), n_in)
        w = []
        for x in range(xmin, xmax):
            t = (x - center + 0.5) / fscale
            w.append(1.0 if -0.5 < t <= 0.5 else 0.0)
        total = sum(w)
        for j, wj in enumerate(w):
            v = wj / total if total else 0.0
            kk[xx, xmin + j] = math.trunc(0.5 + v * (1 << 22))
    return kk


def pil_resize_box(x: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
    """Pillow ``resize((out_w, out_h), Image.BOX)`` of uint8-valued (N, C, H, W) floats: the
    horizontal pass, rounded to uint8, then the vertical one (libImaging/Resample.c,
    ``ImagingResampleInner``), each output ``clip8((Σ k·p + 2²¹) >> 22)``."""
    h, w = x.shape[-2:]
    y = x.double()
    if out_w != w:
        k = pil_box_weights(w, out_w).to(y.device)
        y = torch.floor((y @ k.T + 2**21) / 2**22).clamp(0, 255)
    if out_h != h:
        k = pil_box_weights(h, out_h).to(y.device)
        y = torch.floor((k @ y + 2**21) / 2**22).clamp(0, 255)
    return y.to(x.dtype)


def pil_resize_nearest(x: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
    """Pillow ``resize((out_w, out_h), Image.NEAREST)`` (libImaging/Geometry.c,
    ``ImagingScaleAffine``): output pixel o reads input ``int(t_o)`` with ``t_0 = r / 2`` and
    ``t_{o+1} = t_o + r``, r = n_in / n_out, summed in double as Pillow does."""

    def index(n_in: int, n_out: int) -> torch.Tensor:
        r = n_in / n_out
        t = r * 0.5
        out = []
        for _ in range(n_out):
            out.append(min(int(t), n_in - 1))
            t += r
        return torch.tensor(out, device=x.device)

    h, w = x.shape[-2:]
    return x.index_select(-2, index(h, out_h)).index_select(-1, index(w, out_w))


def plasma_fractal(
    uniform: Callable[[float, float, tuple[int, ...]], np.ndarray], mapsize: int, decay: float
) -> np.ndarray:
    """Diamond-square height map of make_cifar_c.py ``plasma_fractal`` (after FLHerne/mapgen),
    side ``mapsize`` (a power of two), in [0, 1]. Each new point is the mean of its neighbours
    plus ``wibble · U(-wibble, wibble)`` (wibble starts at 100 and is divided by ``decay`` per
    level, so the noise scales with wibble², as in the original); ``uniform(low, high, shape)``
    draws the noise, called in the original's order."""
    m = np.empty((mapsize, mapsize), dtype=np.float64)
    m[0, 0] = 0
    step = mapsize
    wibble = 100.0

    def wibbled(a: np.ndarray) -> np.ndarray:
        return a / 4 + wibble * uniform(-wibble, wibble, a.shape)

    while step >= 2:
        half = step // 2
        corner = m[0:mapsize:step, 0:mapsize:step]
        sq = corner + np.roll(corner, shift=-1, axis=0)
        sq += np.roll(sq, shift=-1, axis=1)
        m[half:mapsize:step, half:mapsize:step] = wibbled(sq)
        dr = m[half:mapsize:step, half:mapsize:step]
        ul = m[0:mapsize:step, 0:mapsize:step]
        lt = (dr + np.roll(dr, 1, axis=0)) + (ul + np.roll(ul, -1, axis=1))
        m[0:mapsize:step, half:mapsize:step] = wibbled(lt)
        tt = (dr + np.roll(dr, 1, axis=1)) + (ul + np.roll(ul, -1, axis=0))
        m[half:mapsize:step, 0:mapsize:step] = wibbled(tt)
        step //= 2
        wibble /= decay
    m -= m.min()
    return m / m.max()
