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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from quantcal._io import atomic_write_json

MARKER = ".quantcal-run"
#: Stage folders under ``cache/`` and the entry names quantcal writes in them.
_STAGES = ("train", "qat", "logits", "rows", "errors")
_ENTRY = re.compile(r"^(err-)?[0-9a-f]{16}(\.(pt|json|log))?$")
_TMP = re.compile(r"^\..+\.tmp$")
_MEMOS = ("digests.json", "healed.json")
#: What a run writes at the top of its folder (named when another run would replace them).
_REPLACED = ("results.csv", "report.html", "details.json", "config.toml")


class ForeignFolderError(ValueError):
    """``--out`` names a folder (or file) that quantcal did not make."""


def _is_legacy_run(out: Path) -> bool:
    """A run folder of a quantcal release before the marker: env.json written by quantcal."""
    try:
        env = json.loads((out / "env.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(env, dict) and "quantcal" in env and (out / "config.toml").is_file()


def _describe(identity: Mapping[str, Any]) -> str:
    """``identity`` in words: "study 'demo'", "eval of checkpoint /m.pt (resnet20@1)"."""
    ident = dict(identity)
    command = ident.pop("command", "run")
    if command == "run" and set(ident) == {"study"}:
        return f"study {ident['study']!r}"
    return f"{command} of " + ", ".join(f"{k} {v}" for k, v in ident.items())


def _read_marker(marker: Path) -> dict[str, Any]:
    try:
        obj = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


def check(
    out: str | Path, *, force: bool = False, identity: Mapping[str, Any] | None = None
) -> Path:
    """Raise :class:`ForeignFolderError` unless ``out`` may take this run; write nothing.

    Accepted: a new or empty folder, a legacy run folder, a marked folder whose recorded
    ``identity`` (what made it: a study's name, an eval's source) is absent or equals
    ``identity``; with ``force``, any folder. A path that is a file never."""
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
    elif marker.exists() and identity is not None and not force:
        held = _read_marker(marker).get("identity")
        if held is not None and held != dict(identity):
            replaced = [n for n in _REPLACED if (out / n).exists()]
            raise ForeignFolderError(
                f"--out {out} holds the results of {_describe(held)}; this is "
                f"{_describe(identity)}. Nothing was written. Choose another --out, or pass "
                "--force to replace "
                + (", ".join(replaced) if replaced else "its results")
                + " there (cached stages are kept and reused where they match)"
            )
    return out


def claim(
    out: str | Path, *, force: bool = False, identity: Mapping[str, Any] | None = None
) -> Path:
    """Make ``out`` a quantcal run folder, or raise :class:`ForeignFolderError` saying why not
    (the rules of :func:`check`). The marker records ``identity`` when given, so that another
    study or evaluation into the same folder is refused."""
    out = check(out, force=force, identity=identity)
    marker = out / MARKER
    out.mkdir(parents=True, exist_ok=True)
    record = _read_marker(marker) if marker.exists() else {}
    if not record or (identity is not None and record.get("identity") != dict(identity)):
        record = {
            "created_by": "quantcal",
            "time": record.get("time", time.time()),
            **({"identity": dict(identity)} if identity is not None else {}),
        }
        atomic_write_json(marker, record)
    return out


def check_owned(out: str | Path, *, force: bool = False, action: str = "write into") -> Path:
    """``out`` is a folder quantcal made (marked, or a legacy run folder), or ``force``; else a
    :class:`ForeignFolderError` naming the folder and what would be written."""
    out = Path(out)
    if not force and not (out / MARKER).exists() and not _is_legacy_run(out):
        raise ForeignFolderError(
            f"{out} was not made by quantcal (no {MARKER} marker): quantcal will not {action} "
            "a folder it does not own. Nothing was written. Pass --force to write report.html "
            "and figures/ there anyway"
        )
    return out


def empty(out: str | Path, *, remove_folder: bool) -> None:
    """Remove what a refused run wrote into a folder that was new (``remove_folder``: the
    folder too) or empty before it."""
    out = Path(out)
    if remove_folder:
        shutil.rmtree(out, ignore_errors=True)
        return
    for p in out.iterdir() if out.is_dir() else ():
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


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
