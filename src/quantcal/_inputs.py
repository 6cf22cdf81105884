"""Checks of what a person gives quantcal, shared by every command and the study loader.

Each check runs where the value is read, before any work, and raises ``ValueError`` (or
``FileNotFoundError`` for a path that is not there) whose message names the option or key, what
was wrong and what to do. The CLI turns both into exit status 2 with one line on stderr.
"""

from __future__ import annotations

import math
import os
import stat
from pathlib import Path
from typing import Any

__all__ = [
    "check_input_file",
    "check_number",
    "parse_float_list",
]


def check_input_file(path: str | os.PathLike[str], what: str) -> Path:
    """``path`` as a Path if it names a readable regular file; else an error naming ``what``
    (e.g. "--onnx", "model.checkpoint") and whether the path is missing, a folder, a device or
    unreadable. A missing file is FileNotFoundError, the rest ValueError."""
    p = Path(path).expanduser()
    try:
        st = p.stat()
    except FileNotFoundError:
        raise FileNotFoundError(f"{what}: {p} does not exist") from None
    except OSError as exc:
        raise ValueError(f"{what}: {p} cannot be read ({exc.strerror or exc})") from None
    if stat.S_ISDIR(st.st_mode):
        raise ValueError(f"{what}: {p} is a folder; give the file itself")
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(
            f"{what}: {p} is not a regular file (a device, pipe or socket); give a file"
        )
    if st.st_size == 0:
        raise ValueError(f"{what}: {p} is empty (0 bytes)")
    if not os.access(p, os.R_OK):
        raise ValueError(f"{what}: {p} is not readable (permission denied)")
    return p


def check_number(
    value: Any,
    what: str,
    *,
    integer: bool = False,
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive_minimum: bool = False,
) -> Any:
    """``value`` if it is a finite number (an int when ``integer``) within the bounds; else a
    ValueError naming ``what`` and the allowed range. Booleans are not numbers here."""
    kind = "an integer" if integer else "a number"
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or (not integer and not math.isfinite(value)):
        raise ValueError(
            f"{what} must be {kind}{_range(minimum, maximum, exclusive_minimum)}, got {value!r}"
        )
    low_bad = minimum is not None and (value <= minimum if exclusive_minimum else value < minimum)
    if low_bad or (maximum is not None and value > maximum):
        raise ValueError(
            f"{what} must be {kind}{_range(minimum, maximum, exclusive_minimum)}, got {value!r}"
        )
    return value


def _range(lo: float | None, hi: float | None, exclusive_lo: bool) -> str:
    parts = []
    if lo is not None:
        parts.append(f"{'>' if exclusive_lo else '>='} {lo:g}")
    if hi is not None:
        parts.append(f"<= {hi:g}")
    return (" " + " and ".join(parts)) if parts else ""


def parse_float_list(text: str, what: str) -> list[float]:
    """Comma-separated finite numbers (``"0.5,0.5,0.5"``); a ValueError naming ``what`` and the
    offending item otherwise."""
    items = [t.strip() for t in str(text).split(",")]
    out = []
    for item in items:
        try:
            v = float(item)
        except ValueError:
            raise ValueError(
                f"{what} must be comma-separated numbers (e.g. 0.5,0.5,0.5), got {text!r}"
            ) from None
        if not math.isfinite(v):
            raise ValueError(f"{what} must hold finite numbers, got {text!r}")
        out.append(v)
    return out
