"""The output folder of a run belongs to quantcal, or quantcal refuses to write there.

A folder quantcal creates (or finds empty) gets a marker file, :data:`MARKER`. A non-empty folder
without it is someone else's: a run refuses it (``force=True`` adopts it explicitly) instead of
overwriting ``results.csv`` or ``report.html`` a user keeps there. ``--fresh`` removes only the
cache entries quantcal names itself (hex keys, error records, its memo files, orphaned
temporaries), never another file under ``cache/``.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

from quantcal._io import atomic_write_json

MARKER = ".quantcal-run"
#: Stage folders under ``cache/`` and the entry names quantcal writes in them.
_STAGES = ("train", "logits", "rows", "errors")
_ENTRY = re.compile(r"^(err-)?[0-9a-f]{16}(\.(pt|json|log))?$")
_TMP = re.compile(r"^\..+\.tmp$")
_MEMOS = ("digests.json", "healed.json")


class ForeignFolderError(ValueError):
    """``--out`` names a folder (or file) that quantcal did not make."""


def _is_legacy_run(out: Path) -> bool:
    """A run folder of a quantcal release before the marker: env.json written by quantcal."""
    try:
        env = json.loads((out / "env.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(env, dict) and "quantcal" in env and (out / "config.toml").is_file()


def claim(out: str | Path, *, force: bool = False) -> Path:
    """Make ``out`` a quantcal run folder, or raise :class:`ForeignFolderError` saying why not.

    New, empty, marked or legacy run folders are accepted (and marked); a non-empty folder
    without the marker only with ``force``; a path that is a file never."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ForeignFolderError(
            f"--out {out} is a file, not a folder; give a new or empty folder for the run"
        )
    marker = out / MARKER
    if out.is_dir() and not marker.exists():
        # A shard starting at the same moment may be writing the marker right now.
        others = sorted(p.name for p in out.iterdir() if not p.name.startswith(f".{MARKER}."))
        if others and not force and not _is_legacy_run(out):
            shown = ", ".join(others[:5]) + (
                f" and {len(others) - 5} more" if len(others) > 5 else ""
            )
            raise ForeignFolderError(
                f"--out {out} is not empty ({shown}) and quantcal did not make it (no {MARKER} "
                "marker). Nothing was written. Choose a new or empty folder, or pass --force to "
                "use it anyway (quantcal then writes results.csv, report.html, config.toml, "
                "env.json, details.json, figures/ and cache/ there, replacing files of those "
                "names)"
            )
    out.mkdir(parents=True, exist_ok=True)
    if not marker.exists():
        atomic_write_json(marker, {"created_by": "quantcal", "time": time.time()})
    return out


def clear_cache(out: str | Path) -> int:
    """Remove the cache entries quantcal wrote under ``out/cache``; returns how many."""
    cache = Path(out) / "cache"
    removed = 0
    for stage in _STAGES:
        folder = cache / stage
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            if not (_ENTRY.match(entry.name) or _TMP.match(entry.name)):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed += 1
        if not any(folder.iterdir()):
            folder.rmdir()
    for name in _MEMOS:
        if (cache / name).is_file():
            (cache / name).unlink()
            removed += 1
    return removed


def remove_stale_tmp(out: str | Path, older_than: float = 600.0) -> list[Path]:
    """Delete temporaries (``.NAME.*.tmp``) left by a killed writer, older than ``older_than``
    seconds (younger ones may belong to a shard writing right now); returns them."""
    out = Path(out)
    now = time.time()
    gone = []
    for path in out.rglob(".*.tmp"):
        try:
            if path.is_file() and now - path.stat().st_mtime > older_than:
                path.unlink()
                gone.append(path)
        except FileNotFoundError:  # another process removed or renamed it
            continue
    return gone
