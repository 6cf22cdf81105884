"""Reading the study cache: every entry is verified, and a damaged one is treated as missing.

A cached JSON that does not parse, parses to the wrong type or without its required keys, or
whose content differs from the SHA-256 written into it (:data:`CHECKSUM`: a damaged byte inside
a string still parses), and a cached tensor file whose SHA-256 differs from the one recorded
in its JSON beside it, are removed with a message naming the file; the stage that wrote them
then computes them again, so a rerun heals the cache and gives the same results as a clean run.
Every heal is also recorded in ``cache/healed.json`` for the report.

Work folders of stages that train (``cache/train/KEY``, a method's ``cache/qat/KEY``) hold a
resumable ``last.pt``: ``train.train(..., heal=...)`` hands a damaged one to :meth:`Cache.heal`
(or :func:`heal_work_file`, which finds the run's cache itself) and starts over.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from quantcal._io import atomic_write_json
from quantcal.store.runfolder import MARKER

#: The key under which :meth:`Cache.write_json` records the SHA-256 of an entry's content.
CHECKSUM = "_sha256"


def _json_digest(obj: dict[str, Any]) -> str:
    """SHA-256 of ``obj`` (without :data:`CHECKSUM`) as canonical JSON."""
    body = {k: v for k, v in obj.items() if k != CHECKSUM}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class Cache:
    """Verified reads of ``root`` (a run's ``cache/`` folder); ``log`` receives heal messages."""

    def __init__(self, root: Path, log: Callable[[str], None]) -> None:
        self.root = Path(root)
        self.log = log

    def heal(self, path: Path, reason: str) -> None:
        """Remove a damaged entry (a folder standing in its place too), say so, and record it
        in ``healed.json``."""
        _remove(path)
        rel = path.relative_to(self.root.parent) if path.is_relative_to(self.root.parent) else path
        self.log(f"cache  {rel} was damaged ({reason}): removed, it will be computed again")
        record = self.root / "healed.json"
        try:
            past = json.loads(record.read_text(encoding="utf-8"))
            if not isinstance(past, list):
                past = []
        except (OSError, ValueError):
            past = []
        past.append({"file": str(rel), "reason": reason, "time": time.time()})
        with contextlib.suppress(OSError):  # the record is a courtesy; never fail a run on it
            atomic_write_json(record, past)

    def write_json(self, path: Path, obj: dict[str, Any]) -> None:
        """Write a cache entry atomically with the SHA-256 of its content, which
        :meth:`read_json` verifies."""
        atomic_write_json(path, {**obj, CHECKSUM: _json_digest(obj)})

    def read_json(self, path: Path, required: Iterable[str] = ()) -> dict[str, Any] | None:
        """The JSON object at ``path`` (without its checksum); None when absent or damaged (then
        healed). An entry written without a checksum (by an earlier release) is read as is."""
        if not path.exists():
            return None
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            self.heal(path, f"unreadable JSON: {exc}")
            return None
        if not isinstance(obj, dict):
            self.heal(path, f"holds a JSON {type(obj).__name__}, not an object")
            return None
        recorded = obj.pop(CHECKSUM, None)
        if recorded is not None and recorded != _json_digest(obj):
            self.heal(path, "its content differs from the SHA-256 recorded in it")
            return None
        lacking = [k for k in required if k not in obj]
        if lacking:
            self.heal(path, f"lacks {', '.join(lacking)}")
            return None
        return obj

    def read_torch(self, path: Path, sha256: str) -> Any | None:
        """``torch.load(path, weights_only=True)`` if the file's SHA-256 is ``sha256``; None when
        absent or damaged (then healed)."""
        import torch

        if not path.exists():
            return None
        try:
            raw = path.read_bytes()
        except OSError as exc:
            self.heal(path, f"unreadable: {exc}")
            return None
        actual = hashlib.sha256(raw).hexdigest()
        if actual != sha256:
            self.heal(path, f"SHA-256 {actual[:12]}... differs from the recorded {sha256[:12]}...")
            return None
        try:
            return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
        except Exception as exc:  # verified bytes that still fail to load: a torch change
            self.heal(path, f"cannot be loaded: {type(exc).__name__}: {exc}")
            return None


def run_cache_of(path: Path) -> Path | None:
    """The ``cache/`` folder of the quantcal run folder (one holding the run marker) that
    ``path`` lies in, or None."""
    for parent in Path(path).absolute().parents:
        if parent.name == "cache" and (parent.parent / MARKER).is_file():
            return parent
    return None


def _remove(path: Path) -> None:
    """Delete a damaged file, or a folder where a file belongs; gone already is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
        return
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def heal_work_file(path: Path, reason: str, log: Callable[[str], None]) -> None:
    """Remove a damaged file of a work folder and name it: inside a run's cache through
    :meth:`Cache.heal` (``log`` and ``healed.json``), elsewhere in a UserWarning."""
    root = run_cache_of(path)
    if root is not None:
        Cache(root, log).heal(Path(path).absolute(), reason)
        return
    _remove(Path(path))
    warnings.warn(
        f"{path} was damaged ({reason}): removed, it will be computed again",
        stacklevel=2,
    )


def healed_entries(cache_root: Path) -> list[dict[str, Any]]:
    """The heal records of a run's cache (empty when none or unreadable)."""
    try:
        obj = json.loads((Path(cache_root) / "healed.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return [r for r in obj if isinstance(r, dict)] if isinstance(obj, list) else []
