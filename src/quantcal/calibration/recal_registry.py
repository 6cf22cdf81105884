"""Recalibrators by name: :func:`get`, :func:`available` and :func:`from_state_dict` over every
registered recalibrator (importing this module registers them all).
"""

from __future__ import annotations

from typing import Any

# imported for their @register side effect: the lookups below see every recalibrator
from quantcal.calibration import recal_scaling, recal_toplabel  # noqa: F401
from quantcal.calibration.recal_base import REGISTRY, Recalibrator

__all__ = ["available", "from_state_dict", "get"]


def get(name: str) -> type:
    """The recalibrator class registered as ``name`` (ValueError with suggestions otherwise)."""
    return REGISTRY.get(name)


def available() -> list[str]:
    """Registered recalibrator names, sorted."""
    return REGISTRY.available()


def from_state_dict(state: dict[str, Any]) -> Recalibrator:
    """Rebuild any registered recalibrator from its ``state_dict()``."""
    if not isinstance(state, dict) or "name" not in state:
        raise ValueError("state must be a dict produced by a recalibrator's state_dict().")
    return get(state["name"]).from_state_dict(state)
