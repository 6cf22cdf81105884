"""The study files shipped inside the package (``src/quantcal/studies/*.toml``), by name."""

from __future__ import annotations

from pathlib import Path

__all__ = ["builtin_studies"]


def builtin_studies() -> dict[str, Path]:
    """Study files shipped inside the package: name -> path."""
    folder = Path(__file__).parents[1] / "studies"
    return {p.stem: p for p in sorted(folder.glob("*.toml"))}
