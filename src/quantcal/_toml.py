"""Read TOML (``tomllib`` / ``tomli``) and write the small subset quantcal's study files use."""

from __future__ import annotations

import math
import sys
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

__all__ = ["dumps", "loads", "parse_value"]


def loads(text: str) -> dict[str, Any]:
    """Parse TOML text; a syntax error becomes ``ValueError`` with the parser's position."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"invalid TOML: {exc}") from exc


def parse_value(text: str) -> Any:
    """Parse a command-line override value as TOML (``2``, ``0.1``, ``true``, ``["a", "b"]``);
    anything that is not a TOML value is taken as a plain string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{escaped}"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_scalar(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_scalar(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def _is_table_array(value: Any) -> bool:
    return (
        isinstance(value, (list, tuple)) and bool(value) and all(isinstance(v, dict) for v in value)
    )


def dumps(data: dict[str, Any]) -> str:
    """Write nested dicts as TOML: scalars first, then ``[tables]`` and ``[[arrays of tables]]``.
    ``None`` values are omitted (TOML has no null)."""
    lines: list[str] = []

    def emit(table: dict[str, Any], prefix: str) -> None:
        for key, value in table.items():
            if value is None or isinstance(value, dict) or _is_table_array(value):
                continue
            lines.append(f"{key} = {_scalar(value)}")
        for key, value in table.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                lines.append("")
                lines.append(f"[{name}]")
                emit(value, f"{name}.")
            elif _is_table_array(value):
                for item in value:
                    lines.append("")
                    lines.append(f"[[{name}]]")
                    emit(item, f"{name}.")

    emit(data, "")
    return "\n".join(lines).lstrip("\n") + "\n"
