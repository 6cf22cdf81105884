"""The registered dataset loaders (:data:`DATASETS`) and the file readers behind them.

``cifar100`` reads the md5-verified official archive (its pickles are parsed in memory, never
extracted); ``pathmnist`` and any ``npz:PATH`` read a MedMNIST-layout npz, whose images and labels
are checked for dtype, shape and range; ``digits`` is scikit-learn's bundled 8x8 set.
:func:`export_npz` writes the CIFAR-100 archive as such an npz file.
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from quantcal._registry import Registry
from quantcal.training.carving import assemble, default_size, split_pools, stratified_split
from quantcal.training.sources import DatasetNotFoundError, Source, locate
from quantcal.training.splits import Splits

__all__ = [
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "DATASETS",
    "PATHMNIST_CLASSES",
    "export_npz",
    "load_npz",
    "npz_file",
    "npz_member",
    "open_npz",
    "to_nchw",
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


def to_nchw(images: np.ndarray, what: str) -> np.ndarray:
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
    path = locate("cifar100", root, download, source, progress)
    raw = _read_cifar100(path)
    train = _cifar_part(raw["train"], "train")
    test = _cifar_part(raw["test"], "test")
    names = tuple(n.decode() for n in raw["meta"][b"fine_label_names"])
    rng = np.random.default_rng(seed)
    pool = np.arange(len(train[1]))
    val, rest = stratified_split(train[1], pool, default_size(val_size, 5000, "val_size"), rng)
    ptq_n = default_size(ptq_calib_size, 1000, "ptq_calib_size")
    ptq, rest = stratified_split(train[1], rest, ptq_n, rng)
    parts = {
        "train": ("train", rest),
        "ptq_calib": ("train", ptq),
        "val": ("train", val),
        "test": ("test", np.arange(len(test[1]))),
    }
    return assemble(
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
    path = locate(name, root, False, source, False)
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


def open_npz(path: Path) -> Any:
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


def npz_member(z: Any, path: Path, key: str) -> np.ndarray:
    try:
        return z[key]
    except Exception as exc:  # a truncated or corrupt member
        raise ValueError(
            f"{path}: member {key!r} cannot be read ({type(exc).__name__}: {exc}); the file "
            "is damaged, truncated or holds Python objects (store uint8 images and integer labels)"
        ) from exc


def npz_file(path: Path) -> Path:
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
    npz_file(path)
    with open_npz(path) as z:
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
                imgs = to_nchw(npz_member(z, path, f"{part}_images"), f"{path}:{part}_images")
                labs = _labels_1d(
                    npz_member(z, path, f"{part}_labels"), imgs.shape[0], f"{path}:{part}_labels"
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
    path = locate("pathmnist", root, download, source, progress)
    pools = _read_npz(path)
    missing = {"val", "test"} - set(pools)
    if missing:
        raise ValueError(f"{path} lacks the official {sorted(missing)} split(s) of PathMNIST")
    parts, notes = split_pools("pathmnist", pools, seed, val_size, ptq_calib_size, None)
    return assemble(
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
    parts, _ = split_pools(
        "digits",
        pools,
        seed,
        default_size(val_size, 180, "val_size"),
        default_size(ptq_calib_size, 100, "ptq_calib_size"),
        default_size(test_size, 360, "test_size"),
    )
    return assemble("digits", pools, parts, num_classes=10)


def load_npz(
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
    parts, notes = split_pools(f"npz:{path}", pools, seed, val_size, ptq_calib_size, test_size)
    return assemble(f"npz:{path}", pools, parts, notes=notes)


def _reject_unused(name: str, unused: dict[str, Any]) -> None:
    bad = {k: v for k, v in unused.items() if v is not None}
    if bad:
        raise ValueError(
            f"dataset {name!r} does not take {sorted(bad)} (it has official splits for those)"
        )
