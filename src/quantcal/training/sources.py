"""Dataset files: where they live, where they come from, how they are fetched and verified.

Files live in the data root: the ``root=`` argument, else ``$QUANTCAL_DATA``, else
``$XDG_CACHE_HOME/quantcal`` (default ``~/.cache/quantcal``). :data:`SOURCES` names the official
file of each downloadable dataset (file name, address, md5). Downloads use only the standard
library: streamed to a temporary file with a progress bar, md5-checked, then renamed into place.
An existing file is md5-verified before anything reads it.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "SOURCES",
    "ChecksumError",
    "DatasetNotFoundError",
    "Source",
    "data_root",
    "download",
    "locate",
    "md5sum",
]


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


def locate(
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
