"""Training objectives: what a network is trained to minimise, registered by name.

An objective is called once per training step as ``objective(forward, x, y, step_seed)`` and
returns ``(loss, logits)``: ``forward(x)`` runs the network (under the trainer's autocast and
memory format), ``y`` are integer labels, ``step_seed`` is an integer unique to (run seed, epoch,
step) for objectives that draw random numbers (mixup), so a resumed or distributed run draws the
same numbers. ``logits`` are those of the batch the network saw, for the train accuracy the
trainer logs. Losses are averaged over the batch, in float32 for half-precision logits (autocast)
and in the logits' own precision otherwise.

Objectives (the names are public; a study lists them under ``[train] objectives``):

* ``ce`` -- cross-entropy, ``-log p_y``.
* ``label_smoothing`` (``epsilon`` in [0, 1)) -- cross-entropy against ``(1 - eps) one_hot(y) +
  eps / K`` (Szegedy et al. 2016); Müller et al. 2019 ("When does label smoothing help?") find it
  calibrates but hurts temperature scaling afterwards.
* ``focal`` (``gamma`` >= 0) -- ``-(1 - p_y)^gamma log p_y`` (Lin et al. 2017); ``gamma = 0`` is
  cross-entropy. Mukhoti et al. 2020 ("Calibrating Deep Neural Networks using Focal Loss").
* ``flsd53`` -- focal loss with the sample-dependent ``gamma = 5`` if ``p_y < 0.2`` else ``3``
  (FLSD-53, Mukhoti et al. 2020, Sec. 5); gamma is chosen per sample, not differentiated.
* ``mixup`` (``alpha`` > 0) -- train on ``lam x_i + (1 - lam) x_perm(i)`` with loss ``lam CE(y) +
  (1 - lam) CE(y_perm)``, ``lam ~ Beta(alpha, alpha)`` once per batch (Zhang et al. 2018);
  Thulasidasan et al. 2019 study its calibration. ``lam`` is taken as ``max(lam, 1 - lam)`` so
  the batch's own images dominate; as ``alpha -> 0`` it is exactly plain cross-entropy.
* ``mbls`` (``margin`` > 0, ``weight`` >= 0) -- margin-based label smoothing, the explicit
  calibration regulariser of Liu et al. 2022 ("The Devil is in the Margins"):
  ``CE + weight * sum_k relu(max_j z_j - z_k - margin)``; defaults margin 10, weight 0.1.

A spec is a name (``"ce"``) or a table with ``name`` and parameters (``{name = "focal",
gamma = 3}``); :func:`canonical` validates it and fills defaults, so equal objectives get equal
cache keys. Adding an objective is one registered class with a formula docstring.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from quantcal._registry import Registry, closest

__all__ = ["OBJECTIVES", "LogitObjective", "Objective", "available", "build", "canonical", "label"]

Forward = Callable[[torch.Tensor], torch.Tensor]


class Objective(abc.ABC):
    """An objective: ``params`` lists each parameter as (name, default, allowed interval, e.g.
    ``"[0, 1)"``); calling it runs one step's forward pass and returns ``(loss, logits)``."""

    name = ""
    #: ((parameter, default, interval), ...) in the order they are written.
    params: tuple[tuple[str, float, str], ...] = ()

    def __init__(self, **params: float) -> None:
        for key, value in params.items():
            setattr(self, key, value)

    @abc.abstractmethod
    def __call__(
        self, forward: Forward, x: torch.Tensor, y: torch.Tensor, step_seed: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss, logits)`` of one training step."""


class LogitObjective(Objective):
    """An objective that is a function of the logits of the batch as given."""

    @abc.abstractmethod
    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean loss of float32 ``logits`` (N, K) and labels ``y`` (N,)."""

    def __call__(
        self, forward: Forward, x: torch.Tensor, y: torch.Tensor, step_seed: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = forward(x)
        return self.loss(_full_precision(logits), y), logits


OBJECTIVES: Registry[type[Objective]] = Registry("training objective")


def _within(value: float, interval: str) -> bool:
    """``value`` in an interval written ``"[lo, hi)"`` (``inf`` allowed)."""
    lo_s, hi_s = interval[1:-1].split(",")
    lo, hi = float(lo_s), float(hi_s)
    above = value >= lo if interval[0] == "[" else value > lo
    below = value <= hi if interval[-1] == "]" else value < hi
    return above and below


def _full_precision(logits: torch.Tensor) -> torch.Tensor:
    """Half-precision logits (under autocast) as float32; float32 and float64 as they are."""
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def _number(name: str, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"objective {name!r}: {key} must be a finite number, got {value!r}")
    return float(value)


@OBJECTIVES.register("ce")
class CrossEntropy(LogitObjective):
    """``L = -log softmax(z)_y``."""

    name = "ce"

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y)


@OBJECTIVES.register("label_smoothing")
class LabelSmoothing(LogitObjective):
    """``L = -sum_k q_k log p_k`` with ``q = (1 - eps) one_hot(y) + eps / K``."""

    name = "label_smoothing"
    params = (("epsilon", 0.1, "[0, 1)"),)

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y, label_smoothing=self.epsilon)


def _focal(logits: torch.Tensor, y: torch.Tensor, gamma: torch.Tensor | float) -> torch.Tensor:
    logp = F.log_softmax(logits, dim=1).gather(1, y[:, None])[:, 0]
    p = logp.exp()
    return (-((1 - p).clamp_min(0) ** gamma) * logp).mean()


@OBJECTIVES.register("focal")
class Focal(LogitObjective):
    """``L = -(1 - p_y)^gamma log p_y`` (Lin et al. 2017; Mukhoti et al. 2020)."""

    name = "focal"
    params = (("gamma", 3.0, "[0, 20]"),)

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return _focal(logits, y, self.gamma)


@OBJECTIVES.register("flsd53")
class FocalSampleDependent53(LogitObjective):
    """Focal loss with ``gamma = 5`` where ``p_y < 0.2`` and ``3`` elsewhere (Mukhoti et al.
    2020, FLSD-53); the per-sample gamma is a constant of the step (not differentiated)."""

    name = "flsd53"

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            p = F.softmax(logits, dim=1).gather(1, y[:, None])[:, 0]
            gamma = torch.where(p < 0.2, 5.0, 3.0)
        return _focal(logits, y, gamma)


@OBJECTIVES.register("mixup")
class Mixup(Objective):
    """``L = lam CE(f(x_mix), y) + (1 - lam) CE(f(x_mix), y[perm])`` with ``x_mix = lam x +
    (1 - lam) x[perm]``, ``lam = max(b, 1 - b)``, ``b ~ Beta(alpha, alpha)`` per batch (Zhang
    et al. 2018). ``lam`` and ``perm`` come from ``step_seed`` (reproducible across resumes)."""

    name = "mixup"
    params = (("alpha", 0.2, "(0, 10]"),)

    def draw(self, n: int, step_seed: int) -> tuple[float, np.ndarray]:
        """(lam, perm) of one step."""
        rng = np.random.default_rng(step_seed)
        b = float(rng.beta(self.alpha, self.alpha))
        return max(b, 1.0 - b), rng.permutation(n)

    def __call__(
        self, forward: Forward, x: torch.Tensor, y: torch.Tensor, step_seed: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        lam, perm_np = self.draw(x.shape[0], step_seed)
        perm = torch.from_numpy(perm_np).to(x.device)
        mixed = x * lam + x.index_select(0, perm) * (1.0 - lam)
        logits = forward(mixed)
        z = _full_precision(logits)
        loss = lam * F.cross_entropy(z, y) + (1.0 - lam) * F.cross_entropy(
            z, y.index_select(0, perm)
        )
        return loss, logits


@OBJECTIVES.register("mbls")
class MarginLabelSmoothing(LogitObjective):
    """``L = CE + weight * mean_i sum_k relu(max_j z_ij - z_ik - margin)`` (Liu et al. 2022)."""

    name = "mbls"
    params = (("margin", 10.0, "(0, inf)"), ("weight", 0.1, "[0, inf)"))

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        gaps = logits.max(dim=1, keepdim=True).values - logits
        penalty = F.relu(gaps - self.margin).sum(dim=1).mean()
        return F.cross_entropy(logits, y) + self.weight * penalty


def available() -> list[str]:
    """Registered objective names."""
    return OBJECTIVES.available()


def canonical(spec: str | Mapping[str, Any]) -> dict[str, Any]:
    """``{"name": ..., **params}`` with defaults filled and ranges checked (ValueError naming
    the valid names or the parameter otherwise)."""
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str):
        raise ValueError(
            "an objective is a name or a table with 'name' (e.g. {name = \"focal\", gamma = 3}), "
            f"got {spec!r}; valid names: {', '.join(available())}"
        )
    name = spec["name"].lower()
    if name not in OBJECTIVES:
        hint = closest(name, available())
        raise ValueError(
            f"unknown training objective {spec['name']!r}"
            + (f" (did you mean {hint!r}?)" if hint else "")
            + f"; valid objectives: {', '.join(available())}"
        )
    cls = OBJECTIVES.get(name)
    extra = sorted(set(spec) - {"name"} - {p for p, _, _ in cls.params})
    if extra:
        allowed = ", ".join(p for p, _, _ in cls.params) or "none"
        raise ValueError(f"objective {name!r} takes no {extra}; its parameters: {allowed}")
    values = {}
    for key, default, interval in cls.params:
        v = _number(name, key, spec.get(key, default))
        if not _within(v, interval):
            raise ValueError(f"objective {name!r}: {key} must be in {interval}, got {v:g}")
        values[key] = v
    return {"name": name, **values}


def build(spec: str | Mapping[str, Any]) -> Objective:
    """The objective a spec names, ready to call."""
    c = canonical(spec)
    return OBJECTIVES.get(c["name"])(**{k: v for k, v in c.items() if k != "name"})


def label(spec: str | Mapping[str, Any]) -> str:
    """A short, stable label: ``ce``, ``focal(gamma=3)``, ``mixup(alpha=0.2)``."""
    c = canonical(spec)
    params = ",".join(f"{k}={v:g}" for k, v in c.items() if k != "name")
    return c["name"] if not params else f"{c['name']}({params})"
