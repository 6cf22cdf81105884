"""Content digests of files, memoised by (path, size, mtime) so a 160 MB dataset is read once.

A cache key that depends on a file holds the file's SHA-256, never its path alone: replacing the
content of ``cifar100.npz`` must recompute whatever was derived from it. Hashing 160 MB costs
about half a second, so digests are memoised per resolved path together with the file's size and
``st_mtime_ns``; a changed size or modification time hashes the file again. (A file rewritten
with the same size and a forged modification time would be missed; ``--fresh`` covers that.)
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from quantcal._io import atomic_write_json


def sha256_file(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(chunk_size), b""):
            h.update(chunk)
    return h.hexdigest()


class FileDigests:
    """``digests(path) -> sha256 hex``, memoised by (resolved path, size, mtime_ns).

    With ``store`` the memo is kept in that JSON file across runs (an unreadable store is
    ignored and rewritten). :meth:`last_known` returns the digest recorded for a path whatever
    its size and time now (for assembling results after the file was moved away)."""

    def __init__(self, store: str | os.PathLike[str] | None = None) -> None:
        self.store = None if store is None else Path(store)
        self._memo: dict[str, dict] = {}
        if self.store is not None and self.store.is_file():
            try:
                loaded = json.loads(self.store.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                loaded = {}
            if isinstance(loaded, dict):
                self._memo = {
                    k: v
                    for k, v in loaded.items()
                    if isinstance(v, dict) and {"size", "mtime_ns", "sha256"} <= v.keys()
                }

    def __call__(self, path: str | os.PathLike[str]) -> str:
        resolved = str(Path(path).expanduser().resolve())
        st = os.stat(resolved)
        entry = self._memo.get(resolved)
        if entry and entry["size"] == st.st_size and entry["mtime_ns"] == st.st_mtime_ns:
            return str(entry["sha256"])
        digest = sha256_file(resolved)
        self._memo[resolved] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
        if self.store is not None:
            atomic_write_json(self.store, self._memo)
        return digest

    def last_known(self, path: str | os.PathLike[str]) -> str | None:
        entry = self._memo.get(str(Path(path).expanduser().resolve()))
        return None if entry is None else str(entry["sha256"])
