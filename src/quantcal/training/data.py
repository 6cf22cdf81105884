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

The parts: :mod:`~quantcal.training.sources` (files, download, md5),
:mod:`~quantcal.training.splits` (:class:`Split`, :class:`Splits`),
:mod:`~quantcal.training.augment` (normalisation, crop and flip),
:mod:`~quantcal.training.carving` (stratified hold-outs), :mod:`~quantcal.training.loaders` (one
loader per dataset) and :mod:`~quantcal.training.transforms` (splits derived from loaded ones).
This module loads a dataset by name and gathers their public names.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

from quantcal.training.augment import normalize
from quantcal.training.carving import stratified_split
from quantcal.training.loaders import CIFAR100_MEAN as CIFAR100_MEAN
from quantcal.training.loaders import CIFAR100_STD as CIFAR100_STD
from quantcal.training.loaders import DATASETS, load_npz, npz_file, open_npz
from quantcal.training.loaders import PATHMNIST_CLASSES as PATHMNIST_CLASSES
from quantcal.training.loaders import export_npz as export_npz
from quantcal.training.ood_sets import SYNTHETIC_OOD, synthetic_ood
from quantcal.training.sources import (
    SOURCES,
    ChecksumError,
    DatasetNotFoundError,
    Source,
    data_root,
    download,
    md5sum,
)
from quantcal.training.splits import Split, Splits, check_int
from quantcal.training.transforms import TransformError as TransformError
from quantcal.training.transforms import (
    per_channel,
    with_normalization,
    with_transform,
)
from quantcal.training.transforms import with_train_size as with_train_size

# The ``name as name`` imports above are public names of this module that ``__all__`` (and so
# the facade ``quantcal.data``) leaves out; they stay importable from here.
__all__ = [
    "SOURCES",
    "SYNTHETIC_OOD",
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
    "synthetic_ood",
    "val_held_out_of_train",
    "with_normalization",
    "with_transform",
]

#: Registered datasets whose ``val`` split is official (not held out of train).
_OFFICIAL_VAL = ("pathmnist",)


def val_held_out_of_train(name: str) -> bool:
    """Whether dataset ``name``'s ``val`` split is held out of its train split (no official val):
    CIFAR-100, digits, and an ``npz:`` file without ``val_images``. A model trained elsewhere on
    the whole train split has then seen the ``val`` images. Reads only the npz's member names."""
    if name.lower().startswith("npz:"):
        path = npz_file(Path(name[4:]).expanduser())
        with open_npz(path) as z:
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
    from quantcal.store.digest import sha256_file

    if name.lower().startswith("npz:"):
        path = npz_file(Path(name[4:]).expanduser())
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
    check_int("seed", seed, None)
    if name.lower().startswith("npz:"):
        path = name[4:]
        if not path:
            raise ValueError("'npz:' needs a file path, e.g. 'npz:/data/pathmnist.npz'")
        return load_npz(
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


def check_dataset_name(name: str, what: str) -> str:
    """``name`` if it is a registered dataset or ``npz:PATH`` (the file itself is checked when
    it is loaded); else a ValueError naming ``what`` and the closest valid name."""
    from quantcal._registry import closest

    known = list_datasets()
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{what} must name a dataset ({', '.join(known)} or npz:PATH)")
    if name.lower().startswith("npz:"):
        if not name[4:].strip():
            raise ValueError(f"{what}: 'npz:' needs a file path, e.g. 'npz:data.npz'")
    elif name.lower() not in known:
        hint = closest(name.lower(), known)
        raise ValueError(
            f"{what}: unknown dataset {name!r}"
            + (f" (did you mean {hint!r}?)" if hint else "")
            + f"; choose from {known} or give 'npz:PATH' (a MedMNIST-layout file)"
        )
    return name
