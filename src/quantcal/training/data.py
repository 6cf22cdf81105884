"""Datasets as in-memory uint8 tensors, disjoint splits, and on-device batched augmentation.

Every dataset becomes a :class:`Splits`: ``train``, ``ptq_calib`` (range calibration for
post-training quantization, carved from *train*), ``val`` (post-hoc recalibration) and ``test``
(measurement). ``ptq_calib``, ``val`` and ``test`` are pairwise disjoint and neither ``ptq_calib``
nor ``val`` overlaps ``train``; each :class:`Split` records the positions it took from its source
pool (``source`` + ``indices``) so this can be proved (see ``tests/test_data.py``).

Datasets (Kuang & Wong, arXiv 2309.13866, use CIFAR-100 and PathMNIST):

* ``cifar100`` -- the official ``cifar-100-python.tar.gz`` (Krizhevsky 2009), md5-verified before
  any pickle in it is read. Train 50,000 / test 10,000; a stratified, seeded ``val`` hold-out of
  5,000 and a disjoint stratified ``ptq_calib`` sample of 1,000 are carved from train.
* ``pathmnist`` -- the official MedMNIST v2 28x28 ``pathmnist.npz`` (Yang et al. 2023) with its
  official train / val / test; ``ptq_calib`` (1,000) is carved from train.
* ``digits`` -- scikit-learn's bundled 8x8 digits (1,797 real images, offline): stratified seeded
  splits test 360, val 180, ptq_calib 100, train the remaining 1,157. The embedded default.
* ``npz:PATH`` -- any file in the MedMNIST layout (``train_images`` (N,H,W[,C]) uint8,
  ``train_labels`` (N,) or (N,1), optional ``val_*`` and ``test_*``). A missing ``test`` is held out
  from train (20 %, stratified) and a missing ``val`` too (10 % of train, stratified); the
  ``Splits.notes`` say so.

Files live in the data root: the ``root=`` argument, else ``$QUANTCAL_DATA``, else
``$XDG_CACHE_HOME/quantcal`` (default ``~/.cache/quantcal``). Downloads use only the standard
library: streamed to a temporary file with a progress bar, md5-checked, then renamed into place.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import pickle
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from quantcal._registry import Registry

__all__ = [
    "SOURCES",
    "ChecksumError",
    "DatasetNotFoundError",
    "Source",
    "Split",
    "Splits",
    "data_root",
    "dataset_digest",
    "download",
    "list_datasets",
    "load_dataset",
    "md5sum",
    "normalize",
    "per_channel",
    "stratified_split",
    "val_held_out_of_train",
    "with_normalization",
    "with_transform",
]

DATASETS: Registry[Callable[..., Splits]] = Registry("dataset")

CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
PATHMNIST_CLASSES = (
    "adipose",
    "background",
    "debris",
    "lymphocytes",
    "mucus",
    "smooth muscle",
    "normal colon mucosa",
    "cancer-associated stroma",
    "colorectal adenocarcinoma epithelium",
)


# --------------------------------------------------------------------------------------------
# Files: where they live, where they come from, how they are fetched and verified
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Source:
    """Where a dataset file comes from: its file name in the data root, address and md5."""

    filename: str
    url: str
    md5: str


SOURCES: dict[str, Source] = {
    "cifar100": Source(
        filename="cifar-100-python.tar.gz",
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
    ),
    "pathmnist": Source(
        filename="pathmnist.npz",
        url="https://zenodo.org/records/10519652/files/pathmnist.npz",
        md5="a8b06965200029087d5bd730944a56c1",
    ),
}


class DatasetNotFoundError(FileNotFoundError):
    """A dataset file is not in the data root and could not (or may not) be downloaded."""


class ChecksumError(ValueError):
    """A dataset file's md5 differs from the official one; the file is left where it is."""


def data_root(root: str | os.PathLike[str] | None = None) -> Path:
    """The data folder: ``root`` if given, else ``$QUANTCAL_DATA``, else the user cache folder."""
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get("QUANTCAL_DATA")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "quantcal"


def md5sum(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    """Hex md5 digest of a file, read in chunks."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _source(name: str, source: Source | None) -> Source:
    if source is not None:
        if not isinstance(source, Source):
            raise TypeError(f"source must be a quantcal.data.Source, got {type(source).__name__}")
        return source
    if name not in SOURCES:
        raise ValueError(
            f"dataset {name!r} has nothing to download: downloadable datasets are "
            f"{', '.join(sorted(SOURCES))} ('digits' ships with scikit-learn, 'npz:PATH' is "
            "your own file)."
        )
    return SOURCES[name]


def _how_to_place(name: str, src: Source, folder: Path) -> str:
    return (
        f"Address: {src.url} (md5 {src.md5}). To place it by hand, run `quantcal data download "
        f"{name}` on a machine with network access, or download the address with any tool and "
        f"copy the file to {folder / src.filename} (or point root= / $QUANTCAL_DATA at the "
        "folder that holds it)."
    )


def _verify(name: str, path: Path, src: Source) -> None:
    actual = md5sum(path)
    if actual != src.md5:
        raise ChecksumError(
            f"{path} has md5 {actual}, but the official {src.filename} for dataset {name!r} has "
            f"md5 {src.md5}. The file was left in place, untouched and unread: it is probably an "
            f"incomplete download or a different version. Delete it and download again "
            f"(`quantcal data download {name}`), or replace it with the official file from "
            f"{src.url}."
        )


def _fetch(url: str, dest: Path, md5: str, *, progress: bool, timeout: float = 60.0) -> None:
    """Stream ``url`` to a temporary file next to ``dest``, check md5, then rename atomically."""
    from tqdm.auto import tqdm

    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    digest = hashlib.md5(usedforsecurity=False)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, os.fdopen(fd, "wb") as out:
            total = resp.headers.get("Content-Length")
            bar = tqdm(
                total=int(total) if total else None,
                unit="B",
                unit_scale=True,
                desc=dest.name,
                disable=not (progress and sys.stderr.isatty()),
            )
            with bar:
                for chunk in iter(lambda: resp.read(1 << 20), b""):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
            out.flush()
            os.fsync(out.fileno())
        if digest.hexdigest() != md5:
            raise ChecksumError(
                f"the download from {url} has md5 {digest.hexdigest()}, expected {md5}; it was "
                f"discarded and nothing was written to {dest}. Try again later, or download the "
                "file by hand and check its md5."
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def download(
    name: str,
    root: str | os.PathLike[str] | None = None,
    *,
    source: Source | None = None,
    progress: bool = True,
) -> Path:
    """Make sure the official file of dataset ``name`` is in the data root; return its path.

    An existing file is md5-verified (a wrong checksum raises :class:`ChecksumError` and leaves the
    file alone); a missing one is downloaded. ``source`` overrides :data:`SOURCES` (address, md5).
    """
    src = _source(name, source)
    folder = data_root(root)
    path = folder / src.filename
    if not path.is_file():
        try:
            _fetch(src.url, path, src.md5, progress=progress)
        except (urllib.error.URLError, OSError) as exc:
            raise DatasetNotFoundError(
                f"dataset {name!r}: {src.filename} is not in {folder} and downloading it failed "
                f"({exc}). {_how_to_place(name, src, folder)}"
            ) from exc
    _verify(name, path, src)
    return path


def _locate(
    name: str,
    root: str | os.PathLike[str] | None,
    download_ok: bool,
    source: Source | None,
    progress: bool,
) -> Path:
    """The verified local file of ``name``: downloaded if allowed, else a clear error."""
    src = _source(name, source)
    folder = data_root(root)
    path = folder / src.filename
    if path.is_file():
        _verify(name, path, src)
        return path
    if not download_ok:
        raise DatasetNotFoundError(
            f"dataset {name!r}: {src.filename} is not in {folder} and download=False. "
            f"{_how_to_place(name, src, folder)}"
        )
    return download(name, root, source=src, progress=progress)


# --------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------
def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 images (N, C, H, W) -> float32 ``(x / 255 - mean) / std`` per channel, same device."""
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(
            f"normalize expects uint8 images of shape (N, C, H, W), got {images.dtype} with "
            f"shape {tuple(images.shape)}"
        )
    if len(mean) != images.shape[1] or len(std) != images.shape[1]:
        raise ValueError(
            f"normalize got {len(mean)} means and {len(std)} stds for {images.shape[1]} channels; "
            "give one per channel"
        )
    scale, shift = _affine(mean, std, images.device)
    return images.float().mul_(scale).add_(shift)


def _affine(
    mean: Sequence[float], std: Sequence[float], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x/255 - m)/s == x * scale + shift with scale = 1/(255 s), shift = -m/s, shaped (1,C,1,1)."""
    m = torch.tensor(mean, dtype=torch.float64)
    s = torch.tensor(std, dtype=torch.float64)
    scale = (1.0 / (255.0 * s)).float().view(1, -1, 1, 1).to(device)
    shift = (-m / s).float().view(1, -1, 1, 1).to(device)
    return scale, shift


def _device_key(device: torch.device | str | None) -> torch.device:
    dev = torch.device("cpu") if device is None else torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def _crop_flip(
    x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor, pad: int
) -> torch.Tensor:
    """Batched zero-padded random crop then horizontal flip of uint8 images (B, C, H, W).

    Sample ``b`` becomes ``P[b, :, dy_b : dy_b + H, dx_b : dx_b + W]`` of its zero-padded copy
    ``P`` (torchvision ``RandomCrop(H, padding=pad)``), mirrored along W where ``flip_b``.
    Rows are gathered as 8-byte lanes (the padded width is rounded up to a multiple of 8, the
    extra columns are never read), then one element gather crops the columns and folds in the
    flip; about 3x cheaper than element gathers on both axes.
    """
    b, c, h, w = x.shape
    lanes = -(-(w + 2 * pad) // 8)
    padded = x.new_zeros(b, c, h + 2 * pad, lanes * 8)
    padded[:, :, pad : pad + h, pad : pad + w] = x
    ar_h = torch.arange(h, device=x.device)
    ar_w = torch.arange(w, device=x.device)
    rows = (dy[:, None] + ar_h)[:, None, :, None].expand(b, c, h, lanes)
    out = padded.view(torch.int64).gather(2, rows).view(torch.uint8)  # (B, C, H, 8*lanes)
    cols = dx[:, None] + torch.where(flip[:, None], ar_w.flip(0), ar_w)  # (B, W)
    return out.gather(3, cols[:, None, None, :].expand(b, c, h, w))


@dataclass(frozen=True, eq=False)
class Split:
    """One split held in memory as uint8 NCHW plus labels; batches are made on the device.

    ``indices[i]`` is the position of sample ``i`` in its ``source`` pool (e.g. the official train
    set), which makes disjointness between splits checkable.
    """

    images: torch.Tensor
    labels: torch.Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    indices: torch.Tensor
    source: str = "train"
    #: A model's own preprocessing in place of ``(x / 255 - mean) / std``: called with each
    #: uint8 batch (B, C, H, W) on the device (after augmentation), it returns the float input
    #: batch (B, ...). ``transform_name`` says what it is (``module:function``).
    transform: Callable[[torch.Tensor], torch.Tensor] | None = field(
        default=None, compare=False, repr=False
    )
    transform_name: str = ""
    _cache: dict[torch.device, tuple[torch.Tensor, ...]] = field(
        default_factory=dict, init=False, repr=False
    )

    def __post_init__(self) -> None:
        imgs, labels, idx = self.images, self.labels, self.indices
        if not isinstance(imgs, torch.Tensor) or imgs.dtype != torch.uint8 or imgs.dim() != 4:
            raise ValueError(
                "Split.images must be a uint8 tensor (N, C, H, W); got "
                f"{getattr(imgs, 'dtype', type(imgs))} {tuple(getattr(imgs, 'shape', ()))}"
            )
        n = imgs.shape[0]
        for fname, t in (("labels", labels), ("indices", idx)):
            if not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or t.shape != (n,):
                raise ValueError(
                    f"Split.{fname} must be an int64 tensor of shape ({n},) to match images; got "
                    f"{getattr(t, 'dtype', type(t))} {tuple(getattr(t, 'shape', ()))}"
                )
        c = imgs.shape[1]
        mean = tuple(float(v) for v in self.mean)
        std = tuple(float(v) for v in self.std)
        if len(mean) != c or len(std) != c or min(std) <= 0:
            raise ValueError(
                f"Split.mean/std need {c} values (one per channel, std > 0); got {mean}, {std}"
            )
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)
        if not imgs.is_contiguous():
            object.__setattr__(self, "images", imgs.contiguous())

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __repr__(self) -> str:
        shape = "x".join(str(s) for s in self.images.shape)
        return f"Split({shape} uint8, source={self.source!r})"

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images -> the model's float input: this split's ``transform`` when it has one,
        else ``(x / 255 - mean) / std`` with its mean/std (see :func:`normalize`)."""
        if self.transform is not None:
            return self._transformed(images)
        return normalize(images, self.mean, self.std)

    def _transformed(self, images: torch.Tensor) -> torch.Tensor:
        out = self.transform(images)
        if (
            not isinstance(out, torch.Tensor)
            or not out.is_floating_point()
            or out.dim() < 1
            or out.shape[0] != images.shape[0]
        ):
            got = (
                f"{out.dtype} {tuple(out.shape)}"
                if isinstance(out, torch.Tensor)
                else type(out).__name__
            )
            raise TypeError(
                f"the transform {self.transform_name or self.transform!r} must return a float "
                f"tensor with the batch first, (B, ...), for a uint8 batch {tuple(images.shape)}; "
                f"got {got}"
            )
        return out

    def _on(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """(images, labels, scale, shift) on ``device``, copied there once and cached."""
        if device not in self._cache:
            scale, shift = _affine(self.mean, self.std, device)
            self._cache[device] = (
                self.images.to(device),
                self.labels.to(device),
                scale,
                shift,
            )
        return self._cache[device]

    def batches(
        self,
        batch_size: int,
        *,
        device: torch.device | str | None = None,
        shuffle: bool = False,
        augment: bool = False,
        seed: int = 0,
        epoch: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        pad: int = 4,
        flip: bool = True,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(images float32 (B, C, H, W), labels int64 (B,))`` on ``device`` (default CPU).

        The split is copied to ``device`` once (cached per device); order, crop offsets and flips
        for the epoch come from one CPU generator seeded with ``seed + epoch`` and are drawn for
        the whole permutation, so a sample's augmentation does not depend on ``world_size``.
        ``augment`` applies torchvision's ``RandomCrop(H, padding=pad)`` (padding with black, i.e.
        zeros in uint8 *before* normalisation, so the border is the normalised value of black)
        then ``RandomHorizontalFlip`` if ``flip``, both as batched gathers on the device.
        With ``world_size > 1`` the permutation is cut to a multiple of ``world_size`` (dropping
        at most ``world_size - 1`` samples of this epoch's order) and rank ``r`` takes positions
        ``r, r + world_size, ...``: disjoint, equal-sized shards, as ``DistributedSampler``
        with ``drop_last=True``. ``shuffle=False`` keeps the stored order (deterministic eval).
        """
        _check_int("batch_size", batch_size, 1)
        _check_int("world_size", world_size, 1)
        _check_int("pad", pad, 0)
        _check_int("seed", seed, None)
        _check_int("epoch", epoch, 0)
        if not (isinstance(rank, int) and 0 <= rank < world_size):
            raise ValueError(f"rank must be an int in [0, world_size={world_size}), got {rank!r}")
        return self._iterate(
            batch_size,
            _device_key(device),
            shuffle,
            augment,
            seed,
            epoch,
            drop_last,
            rank,
            world_size,
            pad,
            flip,
        )

    def _iterate(
        self,
        batch_size: int,
        device: torch.device,
        shuffle: bool,
        augment: bool,
        seed: int,
        epoch: int,
        drop_last: bool,
        rank: int,
        world_size: int,
        pad: int,
        flip: bool,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        images, labels, scale, shift = self._on(device)
        n = len(self)
        gen = torch.Generator().manual_seed(seed + epoch)
        order = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
        if augment:
            offsets = torch.randint(0, 2 * pad + 1, (2, n), generator=gen)
            flips = torch.randint(0, 2, (n,), generator=gen).bool()
            if not flip:
                flips.zero_()
        per_rank = n // world_size if world_size > 1 else n
        positions = torch.arange(rank, per_rank * world_size, world_size)
        order = order[positions].to(device)
        if augment:
            offsets = offsets[:, positions].to(device)
            flips = flips[positions].to(device)
        stop = per_rank - per_rank % batch_size if drop_last else per_rank
        for start in range(0, stop, batch_size):
            idx = order[start : start + batch_size]
            x = images.index_select(0, idx)
            if augment:
                sl = slice(start, start + batch_size)
                x = _crop_flip(x, offsets[0, sl], offsets[1, sl], flips[sl], pad)
            if self.transform is not None:
                yield self._transformed(x), labels.index_select(0, idx)
            else:
                yield x.float().mul_(scale).add_(shift), labels.index_select(0, idx)


def _check_int(name: str, value: Any, minimum: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


@dataclass(frozen=True, eq=False)
class Splits:
    """A dataset's four splits and its metadata (see the module docstring for the contract)."""

    name: str
    train: Split
    ptq_calib: Split
    val: Split
    test: Split
    num_classes: int
    image_size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...]
    notes: tuple[str, ...] = ()
    #: The name of the preprocessing every split applies instead of mean/std ("" when none).
    transform_name: str = ""

    def __repr__(self) -> str:
        sizes = ", ".join(
            f"{k}={len(getattr(self, k))}" for k in ("train", "ptq_calib", "val", "test")
        )
        return (
            f"Splits({self.name!r}, {sizes}, classes={self.num_classes}, "
            f"{self.channels}x{self.image_size}x{self.image_size})"
        )

    def items(self) -> list[tuple[str, Split]]:
        """[(name, split)] for train, ptq_calib, val, test."""
        return [(k, getattr(self, k)) for k in ("train", "ptq_calib", "val", "test")]


# --------------------------------------------------------------------------------------------
# Stratified, seeded carving
# --------------------------------------------------------------------------------------------
def _allocate(counts: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Per-class take counts summing to ``size``, proportional to ``counts`` (largest remainder;
    ties broken at random so small samples do not favour low class ids)."""
    total = int(counts.sum())
    numer = counts.astype(np.int64) * size
    base = numer // total
    frac = numer % total
    rem = size - int(base.sum())
    order = np.lexsort((rng.random(len(counts)), -frac))
    base[order[:rem]] += 1
    return base


def stratified_split(
    labels: np.ndarray | torch.Tensor, pool: np.ndarray, size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Take ``size`` positions out of ``pool`` with class proportions kept; return (taken, rest).

    ``labels`` is indexed by position; both outputs are shuffled with ``rng``.
    """
    pool = np.asarray(pool, dtype=np.int64)
    if not 0 < size < len(pool):
        raise ValueError(
            f"cannot carve {size} samples out of a pool of {len(pool)}: choose a size between 1 "
            f"and {len(pool) - 1} so that some samples remain"
        )
    lab = np.asarray(labels)[pool]
    _, inverse, counts = np.unique(lab, return_inverse=True, return_counts=True)
    take = _allocate(counts, size, rng)
    perm = rng.permutation(len(pool))
    grouped = perm[np.argsort(inverse[perm], kind="stable")]  # class-grouped, random within
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    cls_of = inverse[grouped]
    rank_in_class = np.arange(len(pool)) - starts[cls_of]
    chosen = rank_in_class < take[cls_of]
    taken = pool[grouped[chosen]]
    rest = pool[grouped[~chosen]]
    return taken[rng.permutation(len(taken))], rest[rng.permutation(len(rest))]


def _channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean/std (population) of uint8 NCHW images, divided by 255.

    Uses a 256-bin histogram per channel, so no float copy of the data is made.
    """
    means, stds = [], []
    values = np.arange(256, dtype=np.float64)
    for c in range(images.shape[1]):
        hist = np.bincount(images[:, c].reshape(-1), minlength=256).astype(np.float64)
        n = hist.sum()
        m = (hist * values).sum() / n
        var = (hist * values**2).sum() / n - m * m
        means.append(m / 255.0)
        stds.append(float(np.sqrt(max(var, 0.0))) / 255.0 or 1.0)
    return tuple(float(v) for v in means), tuple(float(v) for v in stds)


def _make_split(
    images: np.ndarray,
    labels: np.ndarray,
    idx: np.ndarray,
    mean: Sequence[float],
    std: Sequence[float],
    source: str,
) -> Split:
    idx = np.asarray(idx, dtype=np.int64)
    return Split(
        images=torch.from_numpy(np.ascontiguousarray(images[idx])),
        labels=torch.from_numpy(labels[idx].astype(np.int64)),
        mean=tuple(mean),
        std=tuple(std),
        indices=torch.from_numpy(idx),
        source=source,
    )


def _to_nchw(images: np.ndarray, what: str) -> np.ndarray:
    """(N,H,W) or (N,H,W,C) uint8 -> contiguous (N,C,H,W) uint8."""
    if images.dtype != np.uint8:
        raise ValueError(f"{what} must be uint8, got {images.dtype}; store pixels as 0-255 uint8")
    if images.ndim == 3:
        images = images[:, None]
    elif images.ndim == 4:
        images = images.transpose(0, 3, 1, 2)
    else:
        raise ValueError(f"{what} must have shape (N,H,W) or (N,H,W,C), got {images.shape}")
    if images.shape[2] != images.shape[3]:
        raise ValueError(f"{what} must hold square images, got H x W = {images.shape[2:]}")
    return np.ascontiguousarray(images)


def _labels_1d(labels: np.ndarray, n: int, what: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"{what} must be integer class ids of shape ({n},) or ({n}, 1), got "
            f"{labels.dtype} {labels.shape}"
        )
    if n and labels.min() < 0:
        raise ValueError(f"{what} holds negative class ids; expected 0..num_classes-1")
    return labels.astype(np.int64)


def _assemble(
    name: str,
    pools: dict[str, tuple[np.ndarray, np.ndarray]],
    parts: dict[str, tuple[str, np.ndarray]],
    *,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    notes: Sequence[str] = (),
) -> Splits:
    """Build :class:`Splits` from pools (source -> (NCHW images, labels)) and split positions."""
    if mean is None or std is None:
        src, idx = parts["train"]
        mean, std = _channel_stats(pools[src][0][idx])
    splits = {
        k: _make_split(pools[src][0], pools[src][1], idx, mean, std, src)
        for k, (src, idx) in parts.items()
    }
    if num_classes is None:
        num_classes = _classes_from_train(name, pools)
    _check_label_range(name, pools, num_classes)
    notes = [*notes, *_absent_class_notes(splits, num_classes)]
    if class_names is None:
        class_names = tuple(str(i) for i in range(num_classes))
    some = next(iter(pools.values()))[0]
    return Splits(
        name=name,
        num_classes=num_classes,
        image_size=int(some.shape[-1]),
        channels=int(some.shape[1]),
        mean=tuple(float(v) for v in mean),
        std=tuple(float(v) for v in std),
        class_names=tuple(class_names),
        notes=tuple(notes),
        **splits,
    )


def _classes_from_train(name: str, pools: dict[str, tuple[np.ndarray, np.ndarray]]) -> int:
    """The class count of a file without a class list: the largest *train* label plus one.

    Only train decides: one stray label in val or test must not turn a 10-class study into a
    100-class one (it is refused by :func:`_check_label_range` instead)."""
    labels = pools["train"][1]
    if not len(labels):
        raise ValueError(f"{name}: train_labels is empty; a dataset needs training images")
    return int(labels.max()) + 1


def _check_label_range(
    name: str, pools: dict[str, tuple[np.ndarray, np.ndarray]], num_classes: int
) -> None:
    """Refuse labels outside 0..num_classes-1, naming the array, the values and their count."""
    for part, (_, labels) in pools.items():
        bad = labels[(labels < 0) | (labels >= num_classes)]
        if len(bad):
            values, counts = np.unique(bad, return_counts=True)
            shown = ", ".join(f"{v} ({c} images)" for v, c in zip(values[:10], counts[:10]))
            more = f" and {len(values) - 10} more values" if len(values) > 10 else ""
            raise ValueError(
                f"{name}: {part}_labels holds class ids outside 0..{num_classes - 1}: {shown}"
                f"{more}. The dataset has {num_classes} classes (for a file: the largest train "
                "label plus one). Fix or drop those labels; a class must have training images."
            )


def _absent_class_notes(splits: dict[str, Split], num_classes: int) -> list[str]:
    """One note per split that lacks some classes (a class absent from train is never learnt,
    one absent from val is never seen by recalibration, one absent from test is not measured)."""
    notes = []
    for part in ("train", "val", "test"):
        present = np.unique(splits[part].labels.numpy())
        missing = np.setdiff1d(np.arange(num_classes), present)
        if len(missing):
            shown = ", ".join(str(int(c)) for c in missing[:10])
            more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
            notes.append(
                f"{len(missing)} of {num_classes} classes have no {part} images (class "
                f"{shown}{more})"
            )
    return notes


def _default_size(value: int | None, default: int, what: str) -> int:
    if value is None:
        return default
    _check_int(what, value, 1)
    return value


# --------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------
def _read_cifar100(path: Path) -> dict[str, Any]:
    """Parse the verified official archive: train/test pickles and meta (never extracted)."""
    out: dict[str, Any] = {}
    with tarfile.open(path, "r:gz") as tar:
        for member in ("train", "test", "meta"):
            try:
                info = tar.getmember(f"cifar-100-python/{member}")
            except KeyError:
                raise ValueError(
                    f"{path} is not the CIFAR-100 python archive: it has no member "
                    f"cifar-100-python/{member}; use the official cifar-100-python.tar.gz"
                ) from None
            if not info.isfile():
                raise ValueError(f"{path}: archive member {info.name} is not a regular file")
            fh = tar.extractfile(info)
            if fh is None:  # pragma: no cover - guarded by isfile
                raise ValueError(f"{path}: cannot read archive member {info.name}")
            with fh:
                out[member] = pickle.load(fh, encoding="bytes")
    return out


def _cifar_part(d: dict[bytes, Any], what: str) -> tuple[np.ndarray, np.ndarray]:
    data = np.asarray(d[b"data"], dtype=np.uint8)
    labels = np.asarray(d[b"fine_labels"], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or labels.shape != (data.shape[0],):
        raise ValueError(
            f"CIFAR-100 member {what!r} is malformed: data {data.shape}, labels {labels.shape}; "
            "expected (N, 3072) and (N,)"
        )
    return np.ascontiguousarray(data.reshape(-1, 3, 32, 32)), labels


@DATASETS.register("cifar100")
def _load_cifar100(
    *,
    root: Any = None,
    download: bool = True,
    seed: int = 0,
    val_size: int | None = None,
    ptq_calib_size: int | None = None,
    source: Source | None = None,
    progress: bool = True,
    **unused: Any,
) -> Splits:
    _reject_unused("cifar100", unused)
    path = _locate("cifar100", root, download, source, progress)
    raw = _read_cifar100(path)
    train = _cifar_part(raw["train"], "train")
    test = _cifar_part(raw["test"], "test")
    names = tuple(n.decode() for n in raw["meta"][b"fine_label_names"])
    rng = np.random.default_rng(seed)
    pool = np.arange(len(train[1]))
    val, rest = stratified_split(train[1], pool, _default_size(val_size, 5000, "val_size"), rng)
    ptq_n = _default_size(ptq_calib_size, 1000, "ptq_calib_size")
    ptq, rest = stratified_split(train[1], rest, ptq_n, rng)
    parts = {
        "train": ("train", rest),
        "ptq_calib": ("train", ptq),
        "val": ("train", val),
        "test": ("test", np.arange(len(test[1]))),
    }
    return _assemble(
        "cifar100",
        {"train": train, "test": test},
        parts,
        num_classes=len(names),
        class_names=names,
        mean=CIFAR100_MEAN,
        std=CIFAR100_STD,
    )


def export_npz(
    name: str,
    out: str | os.PathLike[str],
    *,
    root: str | os.PathLike[str] | None = None,
    source: Source | None = None,
) -> Path:
    """Write the official train and test images of dataset ``name`` (``cifar100``) from its
    checksum-verified archive in the data root as one npz file in the MedMNIST layout
    (``train_images`` (N, H, W, C) uint8, ``train_labels``, ``test_images``, ``test_labels``),
    atomically; returns the path. ``npz:PATH`` then loads it like any other file: the README's
    CIFAR-100 commands use such a file. The archive is not downloaded here: run
    :func:`download` first (``quantcal data download cifar100``)."""
    from quantcal._io import atomic_write_bytes

    if name != "cifar100":
        raise ValueError(
            f"dataset {name!r} cannot be exported: only cifar100 comes as an archive "
            "(pathmnist's official file already is an npz; point npz: at it)"
        )
    path = _locate(name, root, False, source, False)
    raw = _read_cifar100(path)
    arrays = {}
    for part in ("train", "test"):
        images, labels = _cifar_part(raw[part], part)
        arrays[f"{part}_images"] = np.ascontiguousarray(images.transpose(0, 2, 3, 1))
        arrays[f"{part}_labels"] = labels
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    out = Path(out).expanduser()
    if out.is_dir():
        raise ValueError(f"{out} is a folder; give the npz file's name, e.g. {out}/cifar100.npz")
    atomic_write_bytes(out, buf.getvalue())
    return out


def _open_npz(path: Path) -> Any:
    """``np.load`` of an npz archive, or ValueError naming the file and what is wrong."""
    try:
        z = np.load(path, allow_pickle=False)
    except Exception as exc:  # BadZipFile, EOFError, pickle refusals, ... all mean "not an npz"
        raise ValueError(
            f"{path} cannot be read as an npz archive ({type(exc).__name__}: {exc}); write it "
            "with numpy.savez or numpy.savez_compressed"
        ) from exc
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise ValueError(
            f"{path} holds a single array, not an npz archive; write it with numpy.savez("
            "path, train_images=..., train_labels=..., ...)"
        )
    return z


def _npz_member(z: Any, path: Path, key: str) -> np.ndarray:
    try:
        return z[key]
    except Exception as exc:  # a truncated or corrupt member
        raise ValueError(
            f"{path}: member {key!r} cannot be read ({type(exc).__name__}: {exc}); the file "
            "is damaged, truncated or holds Python objects (store uint8 images and integer labels)"
        ) from exc


def _npz_file(path: Path) -> Path:
    """``path`` if it is a readable, non-empty regular file; DatasetNotFoundError when it is
    not there, ValueError naming what it is instead (a folder, a device such as /dev/null, an
    empty file, unreadable)."""
    from quantcal._inputs import check_input_file

    try:
        return check_input_file(path, "npz dataset")
    except FileNotFoundError:
        raise DatasetNotFoundError(f"npz dataset file {path} does not exist") from None


def _read_npz(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{split: (NCHW uint8, labels int64)} for the splits present in a MedMNIST-layout npz."""
    _npz_file(path)
    with _open_npz(path) as z:
        keys = set(z.files)
        if "train_images" not in keys or "train_labels" not in keys:
            raise ValueError(
                f"{path} is not in the MedMNIST npz layout: it needs train_images and "
                f"train_labels (and optionally val_*, test_*); it has {sorted(keys)}"
            )
        pools = {}
        for part in ("train", "val", "test"):
            if f"{part}_images" in keys:
                if f"{part}_labels" not in keys:
                    raise ValueError(f"{path} has {part}_images but no {part}_labels")
                imgs = _to_nchw(_npz_member(z, path, f"{part}_images"), f"{path}:{part}_images")
                labs = _labels_1d(
                    _npz_member(z, path, f"{part}_labels"), imgs.shape[0], f"{path}:{part}_labels"
                )
                pools[part] = (imgs, labs)
            elif f"{part}_labels" in keys:
                raise ValueError(f"{path} has {part}_labels but no {part}_images")
    shapes = {p: v[0].shape[1:] for p, v in pools.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"{path}: splits have different image shapes {shapes}")
    if not len(pools["train"][1]):
        raise ValueError(f"{path}: train_images is empty; a dataset needs training images")
    return pools


def _split_pools(
    name: str,
    pools: dict[str, tuple[np.ndarray, np.ndarray]],
    seed: int,
    val_size: int | None,
    ptq_calib_size: int | None,
    test_size: int | None,
) -> tuple[dict[str, tuple[str, np.ndarray]], list[str]]:
    """Positions for train/ptq_calib/val/test from pools; missing test/val held out of train."""
    rng = np.random.default_rng(seed)
    labels = pools["train"][1]
    n = len(labels)
    rest = np.arange(n)
    notes: list[str] = []
    parts: dict[str, tuple[str, np.ndarray]] = {}
    if "test" in pools:
        if test_size is not None:
            raise ValueError(f"{name} has an official test split; test_size applies only without")
        parts["test"] = ("test", np.arange(len(pools["test"][1])))
    else:
        size = _default_size(test_size, max(1, round(0.2 * n)), "test_size")
        taken, rest = stratified_split(labels, rest, size, rng)
        parts["test"] = ("train", taken)
        notes.append(f"no test split in the file: held out {size} stratified train images")
    if "val" in pools:
        val_pool = np.arange(len(pools["val"][1]))
        if val_size is not None and val_size != len(val_pool):
            val_pool, _ = stratified_split(pools["val"][1], val_pool, val_size, rng)
        parts["val"] = ("val", val_pool)
    else:
        size = _default_size(val_size, max(1, round(0.1 * n)), "val_size")
        taken, rest = stratified_split(labels, rest, size, rng)
        parts["val"] = ("train", taken)
        notes.append(f"no val split in the file: held out {size} stratified train images")
    ptq_default = min(1000, max(1, round(0.02 * n)))
    ptq_n = _default_size(ptq_calib_size, ptq_default, "ptq_calib_size")
    taken, rest = stratified_split(labels, rest, ptq_n, rng)
    parts["ptq_calib"] = ("train", taken)
    parts["train"] = ("train", rest)
    return parts, notes


@DATASETS.register("pathmnist")
def _load_pathmnist(
    *,
    root: Any = None,
    download: bool = True,
    seed: int = 0,
    val_size: int | None = None,
    ptq_calib_size: int | None = None,
    source: Source | None = None,
    progress: bool = True,
    **unused: Any,
) -> Splits:
    _reject_unused("pathmnist", unused)
    path = _locate("pathmnist", root, download, source, progress)
    pools = _read_npz(path)
    missing = {"val", "test"} - set(pools)
    if missing:
        raise ValueError(f"{path} lacks the official {sorted(missing)} split(s) of PathMNIST")
    parts, notes = _split_pools("pathmnist", pools, seed, val_size, ptq_calib_size, None)
    return _assemble(
        "pathmnist",
        pools,
        parts,
        num_classes=len(PATHMNIST_CLASSES),
        class_names=PATHMNIST_CLASSES,
        notes=notes,
    )


@DATASETS.register("digits")
def _load_digits(
    *,
    seed: int = 0,
    val_size: int | None = None,
    ptq_calib_size: int | None = None,
    test_size: int | None = None,
    **ignored: Any,
) -> Splits:
    """scikit-learn's 8x8 digits, values 0-16 scaled to 0-255; test 360, val 180, ptq 100."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.clip(np.rint(bunch.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    pools = {"train": (np.ascontiguousarray(images[:, None]), bunch.target.astype(np.int64))}
    parts, _ = _split_pools(
        "digits",
        pools,
        seed,
        _default_size(val_size, 180, "val_size"),
        _default_size(ptq_calib_size, 100, "ptq_calib_size"),
        _default_size(test_size, 360, "test_size"),
    )
    return _assemble("digits", pools, parts, num_classes=10)


def _load_npz(
    path: str,
    *,
    seed: int = 0,
    val_size: int | None = None,
    ptq_calib_size: int | None = None,
    test_size: int | None = None,
    **ignored: Any,
) -> Splits:
    file = Path(path).expanduser()
    pools = _read_npz(file)
    parts, notes = _split_pools(f"npz:{path}", pools, seed, val_size, ptq_calib_size, test_size)
    return _assemble(f"npz:{path}", pools, parts, notes=notes)


def _reject_unused(name: str, unused: dict[str, Any]) -> None:
    bad = {k: v for k, v in unused.items() if v is not None}
    if bad:
        raise ValueError(
            f"dataset {name!r} does not take {sorted(bad)} (it has official splits for those)"
        )


def per_channel(
    values: float | Sequence[float], channels: int, what: str, *, dataset: str | None = None
) -> tuple[float, ...]:
    """One finite value per channel from a number or a sequence (a single value is repeated);
    otherwise a ValueError naming ``what``, how many values were given, how many channels the
    ``dataset`` has and what to give."""
    if isinstance(values, (int, float)) and not isinstance(values, bool):
        values = [values]
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be numbers, got {values!r}") from None
    if len(out) != channels and len(out) != 1:
        raise ValueError(
            f"{what} has {_count(len(out), 'value')} but "
            + (f"the dataset ({dataset})" if dataset else "the data")
            + f" has {_count(channels, 'channel')}: give "
            + (
                "1 value"
                if channels == 1
                else f"{channels} values (one per channel) or 1 (used for every channel)"
            )
        )
    if not all(np.isfinite(out)):
        raise ValueError(f"{what} must hold finite numbers, got {list(values)}")
    return out * channels if len(out) == 1 else out


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def with_normalization(
    splits: Splits,
    mean: float | Sequence[float],
    std: float | Sequence[float],
    *,
    names: tuple[str, str] = ("mean", "std"),
) -> Splits:
    """The same splits, normalised as ``(x / 255 - mean) / std`` with the given per-channel
    ``mean`` and ``std`` (on the [0, 1] pixel scale, as timm and torchvision give them; one value
    is used for every channel): ``mean=0, std=1`` feeds ``x / 255``. Images are shared.
    ``names``: what the user called them in errors (``("--mean", "--std")``, ``("data.mean",
    "data.std")``)."""
    c = splits.channels
    m = per_channel(mean, c, names[0], dataset=splits.name)
    sd = per_channel(std, c, names[1], dataset=splits.name)
    if min(sd) <= 0:
        raise ValueError(f"{names[1]} must be > 0 for every channel, got {list(sd)}")
    parts = {k: dataclasses.replace(v, mean=m, std=sd) for k, v in splits.items()}
    return dataclasses.replace(splits, mean=m, std=sd, **parts)


def with_train_size(splits: Splits, size: int, *, seed: int = 0) -> Splits:
    """The same splits with the training split cut to a stratified subset of ``size`` images
    (class proportions kept, drawn with ``seed``; the other splits untouched), for a study sized
    to a small machine. The cut is named in ``notes``. ValueError when ``size`` is not below the
    training split's size."""
    n = len(splits.train)
    if isinstance(size, bool) or not isinstance(size, int) or not 0 < size <= n:
        raise ValueError(
            f"train_size must be an integer in [1, {n}] (the training split of {splits.name} "
            f"has {n} images), got {size!r}"
        )
    if size == n:
        return splits
    t = splits.train
    rng = np.random.default_rng([seed, 0x7472])  # its own stream: the other splits are drawn
    taken, _ = stratified_split(t.labels.numpy(), np.arange(n), size, rng)
    idx = torch.from_numpy(np.sort(taken))
    train = dataclasses.replace(
        t, images=t.images[idx], labels=t.labels[idx], indices=t.indices[idx]
    )
    note = f"trained on a stratified {size} of the {n} training images ([data] train_size)"
    return dataclasses.replace(splits, train=train, notes=(*splits.notes, note))


class TransformError(ValueError, TypeError):
    """A ``transform`` (a model's own preprocessing) that cannot be used: it raised, or returned
    something other than a float batch (B, C, H, W). A ValueError (bad input: exit 2); also a
    TypeError, which callers caught before it existed."""


def _describe(out: Any) -> str:
    if isinstance(out, torch.Tensor):
        return f"{out.dtype} {tuple(out.shape)}"
    if isinstance(out, np.ndarray):
        return f"numpy {out.dtype} {tuple(out.shape)}"
    return f"a {type(out).__name__}"


def _check_transform(transform: Callable[..., Any], name: str, images: torch.Tensor) -> Any:
    """``transform(images)`` on a few uint8 images, checked: a TransformError naming ``name``,
    what it returned and what is expected if it raised or did not return a float (B, C, H, W)
    tensor or numpy array with the same B. Returns its output."""
    shape = tuple(images.shape)
    try:
        out = transform(images)
    except Exception as exc:
        raise TransformError(
            f"the transform {name} raised {type(exc).__name__}: {exc} when given a uint8 batch "
            f"{shape} (values 0-255, channels first): fix the function so it takes that and "
            "returns the model's float input (B, C, H, W)"
        ) from None
    expected = (
        f"it must return a float tensor with the batch first, (B, C, H, W), for a uint8 batch "
        f"{shape}"
    )
    if not isinstance(out, (torch.Tensor, np.ndarray)):
        raise TransformError(f"the transform {name} returned {_describe(out)}: {expected}")
    floating = (
        out.is_floating_point()
        if isinstance(out, torch.Tensor)
        else np.issubdtype(out.dtype, np.floating)
    )
    if not floating:
        raise TransformError(
            f"the transform {name} must return a float tensor with the batch first, (B, C, H, W),"
            f" for a uint8 batch {shape}; got {_describe(out)} (e.g. x.float() / 255)"
        )
    if out.ndim != 4 or out.shape[0] != shape[0]:
        raise TransformError(
            f"the transform {name} returned {_describe(out)} for {shape[0]} images: {expected}"
        )
    return out


def _float32_transform(
    transform: Callable[..., Any], name: str, example: Any
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``transform`` itself when ``example`` (its checked output) is a float32 tensor; else a
    wrapper that turns its numpy output into a tensor on the input's device and casts float64 /
    float16 to float32 (said once on stderr), so the model gets the dtype of its weights."""
    if isinstance(example, torch.Tensor) and example.dtype == torch.float32:
        return transform
    dtype = str(example.dtype).removeprefix("torch.")
    if dtype != "float32":
        print(
            f"note: the transform {name} returns {dtype}; quantcal casts it to float32, the "
            "dtype of the model's weights",
            file=sys.stderr,
        )

    def as_float32(images: torch.Tensor) -> torch.Tensor:
        out = transform(images)
        if isinstance(out, np.ndarray):
            out = torch.from_numpy(np.ascontiguousarray(out)).to(images.device)
        if isinstance(out, torch.Tensor) and out.is_floating_point():
            out = out.float()
        return out

    as_float32.__qualname__ = getattr(transform, "__qualname__", name)
    return as_float32


def with_transform(
    splits: Splits, transform: Callable[[torch.Tensor], torch.Tensor], name: str
) -> Splits:
    """The same splits, preprocessed by ``transform`` instead of ``(x / 255 - mean) / std``:
    each uint8 batch (B, C, H, W), on the device and after augmentation, goes through
    ``transform`` and must come back as a float tensor (B, C, H, W). ``name``
    (``module:function``) is said wherever the preprocessing is.

    Checked here first, on two training images: a :class:`TransformError` (a ValueError) naming
    ``name``, the exception or what came back, and what is expected, if it raises or returns
    anything but a floating tensor or numpy array of 4 dimensions with the same batch size. A
    numpy array, float64 or float16 is turned into a float32 tensor (said once on stderr).
    When it returns square images, ``channels`` and ``image_size`` become theirs (the model's
    input)."""
    if not callable(transform):
        raise TransformError(f"transform {name!r} is not callable ({type(transform).__name__})")
    example = _check_transform(transform, name, splits.train.images[:2])
    transform = _float32_transform(transform, name, example)
    parts = {
        k: dataclasses.replace(v, transform=transform, transform_name=name)
        for k, v in splits.items()
    }
    example = parts["train"].normalize(parts["train"].images[:2])
    shape = {}
    if example.dim() == 4 and example.shape[-1] == example.shape[-2]:  # what the model sees
        shape = {"channels": int(example.shape[1]), "image_size": int(example.shape[-1])}
    return dataclasses.replace(splits, transform_name=name, **parts, **shape)


#: Registered datasets whose ``val`` split is official (not held out of train).
_OFFICIAL_VAL = ("pathmnist",)


def val_held_out_of_train(name: str) -> bool:
    """Whether dataset ``name``'s ``val`` split is held out of its train split (no official val):
    CIFAR-100, digits, and an ``npz:`` file without ``val_images``. A model trained elsewhere on
    the whole train split has then seen the ``val`` images. Reads only the npz's member names."""
    if name.lower().startswith("npz:"):
        path = _npz_file(Path(name[4:]).expanduser())
        with _open_npz(path) as z:
            return "val_images" not in z.files
    return name.lower() not in _OFFICIAL_VAL


def dataset_digest(name: str, *, file_digest: Callable[[str], str] | None = None) -> str:
    """A content identity of dataset ``name`` for cache keys: equal digests, equal data.

    ``npz:PATH``: ``"sha256:..."`` of the file (``file_digest(path)``, default a fresh
    SHA-256; the study runner passes a memoised one). A downloadable dataset: ``"md5:..."`` of
    its official file, which every load verifies. Anything else (``digits``, a dataset a user
    registered): the SHA-256 of its loaded splits' images, labels and positions (seed 0).
    Raises :class:`DatasetNotFoundError` for a missing ``npz:`` file.
    """
    from quantcal.study.digest import sha256_file

    if name.lower().startswith("npz:"):
        path = _npz_file(Path(name[4:]).expanduser())
        return "sha256:" + (file_digest or sha256_file)(str(path))
    if name.lower() in SOURCES:
        return "md5:" + SOURCES[name.lower()].md5
    splits = load_dataset(name, seed=0)
    h = hashlib.sha256()
    for part, split in splits.items():
        for t in (split.images, split.labels, split.indices):
            h.update(f"{part}:{tuple(t.shape)}:{t.dtype}".encode())
            h.update(t.contiguous().numpy().tobytes())
    return "sha256:" + h.hexdigest()


def list_datasets() -> list[str]:
    """Registered dataset names; any MedMNIST-layout file also loads as ``"npz:PATH"``."""
    return DATASETS.available()


def load_dataset(
    name: str,
    *,
    root: str | os.PathLike[str] | None = None,
    download: bool = True,
    seed: int = 0,
    val_size: int | None = None,
    ptq_calib_size: int | None = None,
    test_size: int | None = None,
    source: Source | None = None,
    progress: bool = True,
) -> Splits:
    """Load dataset ``name`` (see :func:`list_datasets`, or ``"npz:PATH"``) as :class:`Splits`.

    ``seed`` drives every random hold-out; ``val_size`` / ``ptq_calib_size`` / ``test_size``
    override the defaults listed in the module docstring (``test_size`` only where a test split
    is held out of train). ``source`` overrides the address and md5 of the official file.
    Raises :class:`DatasetNotFoundError` when the file is absent and cannot be downloaded, and
    :class:`ChecksumError` when its md5 is wrong (the file is left alone).
    """
    if not isinstance(name, str):
        raise TypeError(f"dataset name must be a string, got {type(name).__name__}")
    _check_int("seed", seed, None)
    if name.lower().startswith("npz:"):
        path = name[4:]
        if not path:
            raise ValueError("'npz:' needs a file path, e.g. 'npz:/data/pathmnist.npz'")
        return _load_npz(
            path,
            seed=seed,
            val_size=val_size,
            ptq_calib_size=ptq_calib_size,
            test_size=test_size,
        )
    loader = DATASETS.get(name)
    return loader(
        root=root,
        download=download,
        seed=seed,
        val_size=val_size,
        ptq_calib_size=ptq_calib_size,
        test_size=test_size,
        source=source,
        progress=progress,
    )
