"""The training recipe: :class:`TrainConfig`, the crop padding and the learning-rate schedule.

The recipe of Kuang & Wong (arXiv 2309.13866, Sec. 4): SGD with momentum 0.9, weight decay 1e-4,
learning rate 0.1 with cosine annealing with warm restarts (SGDR, Loshchilov & Hutter, ICLR 2017),
200 epochs, batch size 32, cross-entropy, random crop + horizontal flip. Those are the defaults of
:class:`TrainConfig`.

Warm restarts: the paper does not give the cycle lengths, and SGDR's usual ``T_0, T_mult``
rarely make the last epoch end a cycle (with T_0=10, T_mult=2 a 200-epoch run stops mid-cycle at
a high learning rate). Here the ``cycles`` lengths grow geometrically by ``cycle_mult`` and are
scaled so they sum exactly to the epochs after warm-up; the scheduler steps every iteration, so
boundaries may fall mid-epoch. Defaults (3 cycles, x2) over 200 epochs: 28.6, 57.1 and 114.3
epochs, the last ending with the last iteration.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from quantcal._registry import closest

__all__ = [
    "AMP_MODES",
    "CHANNELS_LAST_MODES",
    "SCHEDULES",
    "TrainConfig",
    "crop_padding",
    "lr_multiplier",
]

SCHEDULES = ("cosine_restarts", "cosine", "constant")
AMP_MODES = ("auto", "bf16", "off")
CHANNELS_LAST_MODES = ("auto", "on", "off")


@dataclass(frozen=True)
class TrainConfig:
    """Training recipe; the defaults are the study's (see module docstring).

    ``batch_size`` is global (divided over DDP ranks). ``schedule``: "cosine_restarts" (``cycles``
    cycles, lengths growing by ``cycle_mult``, summing to the post-warm-up epochs), "cosine" (one
    cycle) or "constant"; ``warmup_epochs`` ramps linearly from ``lr / warmup_steps`` to ``lr``
    first. ``objective``: the training objective, a name or ``{"name": ..., params}`` (see
    :mod:`quantcal.training.objectives`; stored in canonical form with defaults filled).
    ``augment``: random crop with ``crop_padding`` zero pixels (None: ``round(size / 8)``, at
    least 1: 4 for 32x32 and 28x28 as in the CIFAR recipe, 1 for 8x8 digits), plus a horizontal
    flip if ``hflip``. ``amp``: "auto" = bf16 autocast on CUDA, off on CPU; "bf16"
    or "off" force it.
    ``channels_last``: "auto" = on for CUDA. ``deterministic``: deterministic algorithms (needed
    for bitwise-reproducible resumes; strict on CPU, warn-only on CUDA). ``log_every``: steps
    between progress-bar refreshes (each costs a device sync).
    """

    epochs: int = 200
    batch_size: int = 32
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    schedule: str = "cosine_restarts"
    cycles: int = 3
    cycle_mult: float = 2.0
    warmup_epochs: float = 0.0
    objective: str | dict[str, Any] = "ce"
    augment: bool = True
    crop_padding: int | None = None
    hflip: bool = True
    seed: int = 0
    amp: str = "auto"
    channels_last: str = "auto"
    deterministic: bool = False
    log_every: int = 20

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type in ("float", float):
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ValueError(f"TrainConfig.{f.name} must be a number, got {value!r}")
                object.__setattr__(self, f.name, float(value))
            elif f.type in ("int", int):
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ValueError(f"TrainConfig.{f.name} must be an integer, got {value!r}")
            elif f.type in ("bool", bool) and not isinstance(value, bool):
                raise ValueError(f"TrainConfig.{f.name} must be true or false, got {value!r}")
        _at_least("epochs", self.epochs, 1)
        _at_least("batch_size", self.batch_size, 1)
        _at_least("cycles", self.cycles, 1)
        if self.crop_padding is not None:
            if isinstance(self.crop_padding, bool) or not isinstance(self.crop_padding, int):
                raise ValueError(
                    "TrainConfig.crop_padding must be an integer or None (automatic), got "
                    f"{self.crop_padding!r}"
                )
            _at_least("crop_padding", self.crop_padding, 0)
        _at_least("log_every", self.log_every, 1)
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise ValueError(f"TrainConfig.lr must be a finite number > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"TrainConfig.momentum must be in [0, 1), got {self.momentum}")
        if self.nesterov and self.momentum == 0:
            raise ValueError("TrainConfig.nesterov=True needs momentum > 0")
        if self.weight_decay < 0:
            raise ValueError(f"TrainConfig.weight_decay must be >= 0, got {self.weight_decay}")
        if self.cycle_mult < 1:
            raise ValueError(f"TrainConfig.cycle_mult must be >= 1, got {self.cycle_mult}")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise ValueError(
                f"TrainConfig.warmup_epochs must be in [0, epochs={self.epochs}), got "
                f"{self.warmup_epochs}"
            )
        from quantcal.training import objectives

        object.__setattr__(self, "objective", objectives.canonical(self.objective))
        for name, allowed in (
            ("schedule", SCHEDULES),
            ("amp", AMP_MODES),
            ("channels_last", CHANNELS_LAST_MODES),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"TrainConfig.{name} must be one of {', '.join(allowed)}; got "
                    f"{getattr(self, name)!r}"
                )

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of all fields (JSON/TOML friendly)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from a dict; an unknown key raises ValueError naming the closest valid key."""
        names = [f.name for f in dataclasses.fields(cls)]
        if "label_smoothing" in values:
            raise ValueError(
                "TrainConfig.label_smoothing is now a training objective: write objective = "
                f'{{name = "label_smoothing", epsilon = {values["label_smoothing"]}}}'
            )
        for key in values:
            if key not in names:
                hint = closest(str(key), names)
                did = f" Did you mean {hint!r}?" if hint else ""
                raise ValueError(
                    f"unknown TrainConfig key {key!r}.{did} Valid keys: {', '.join(names)}."
                )
        return cls(**values)


def crop_padding(config: TrainConfig, image_size: int) -> int:
    """Zero padding of the random crop: ``config.crop_padding``, or ``max(1, round(size / 8))``."""
    if config.crop_padding is not None:
        return config.crop_padding
    return max(1, round(image_size / 8))


def _at_least(name: str, value: int, minimum: int) -> None:
    if value < minimum:
        raise ValueError(f"TrainConfig.{name} must be >= {minimum}, got {value}")


def lr_multiplier(step: int, steps_per_epoch: int, config: TrainConfig) -> float:
    """Learning-rate factor (times ``config.lr``) for optimizer step ``step`` (0-based).

    Warm-up: ``(step + 1) / warmup_steps``. Then, with ``u`` the fraction of the post-warm-up
    steps done, "constant" gives 1, "cosine" ``(1 + cos(pi u)) / 2`` (SGDR, eta_min = 0) and
    "cosine_restarts" the same cosine within each of ``cycles`` cycles of relative lengths
    ``cycle_mult ** i`` (normalised to sum to 1).
    """
    total = config.epochs * steps_per_epoch
    warm = round(config.warmup_epochs * steps_per_epoch)
    if step < warm:
        return (step + 1) / warm
    if config.schedule == "constant":
        return 1.0
    done = Fraction(step - warm, max(1, total - warm))
    if config.schedule == "cosine_restarts":
        # exact rational arithmetic so a step on a cycle boundary always starts the new cycle
        lengths = [Fraction(config.cycle_mult) ** i for i in range(config.cycles)]
        total_len = sum(lengths)
        start = Fraction(0)
        for i, length in enumerate(lengths):
            frac = length / total_len
            if done < start + frac or i == len(lengths) - 1:
                done = (done - start) / frac
                break
            start += frac
    u = float(done)
    return 0.5 * (1.0 + math.cos(math.pi * min(max(u, 0.0), 1.0)))
