"""Training checkpoints: the ``out_dir/last.pt`` format, reading one safely
(``weights_only``), what is wrong with a damaged one, whether a run may resume from it (the same
recipe) and the RNG states it carries."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from quantcal.training.recipe import TrainConfig

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "check_resumable",
    "checkpoint_damage",
    "load_checkpoint",
    "resumable",
    "rng_state",
    "set_rng_state",
]

CHECKPOINT_FORMAT = "quantcal.train.checkpoint"
CHECKPOINT_VERSION = 1
# Fields that may differ between a checkpoint and the run resuming it (they do not change math).
_RESUME_FREE = ("log_every",)


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a training checkpoint with ``torch.load(weights_only=True)`` onto the CPU.

    Raises FileNotFoundError when absent and ValueError for a truncated, corrupt or foreign file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    what = (
        f"Expected a quantcal training checkpoint (the out_dir/last.pt that quantcal.train.train "
        f"writes). Delete {path} and train again (or pass resume=False), or point at the right "
        "file."
    )
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, foreign pickle, not a torch file at all
        raise ValueError(
            f"cannot read checkpoint {path}: it is truncated, corrupt or not a torch checkpoint "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). {what}"
        ) from exc
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        keys = sorted(map(str, ck))[:8] if isinstance(ck, dict) else type(ck).__name__
        raise ValueError(f"{path} is a torch file but not a quantcal checkpoint ({keys}). {what}")
    if ck.get("version") != CHECKPOINT_VERSION:
        raise ValueError(
            f"{path} is checkpoint version {ck.get('version')}, this quantcal reads version "
            f"{CHECKPOINT_VERSION}. {what}"
        )
    return ck


def checkpoint_damage(error: ValueError) -> str:
    """The first sentence of :func:`load_checkpoint`'s error: what is wrong with the file,
    without the advice to delete it (for a message saying it was removed)."""
    text = str(error)
    return text.split(". ")[0] if ". " in text else text.rstrip(".")


def resumable(
    path: Path, heal: Callable[[Path, str], None] | None, rank: int
) -> dict[str, Any] | None:
    """The checkpoint at ``path``; None when there is none, or when it is damaged and ``heal``
    is given (rank 0 calls it; the file is gone afterwards on every rank's view)."""
    if not path.is_file():
        return None
    try:
        return load_checkpoint(path)
    except FileNotFoundError:  # removed meanwhile (by rank 0's heal)
        return None
    except ValueError as exc:
        if heal is None:
            raise
        if rank == 0:
            heal(path, checkpoint_damage(exc))
            path.unlink(missing_ok=True)
        return None


def rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def check_resumable(ck: dict[str, Any], config: TrainConfig, path: Path) -> None:
    saved = ck.get("config", {})
    now = config.to_dict()
    diffs = [
        f"{k}: {saved.get(k)!r} -> {now.get(k)!r}"
        for k in sorted(set(saved) | set(now))
        if k not in _RESUME_FREE and saved.get(k) != now.get(k)
    ]
    if diffs:
        raise ValueError(
            f"{path} was written with a different TrainConfig ({'; '.join(diffs)}); resuming "
            "needs the same recipe. Use another out_dir, pass resume=False to start over, or "
            "delete the checkpoint."
        )
