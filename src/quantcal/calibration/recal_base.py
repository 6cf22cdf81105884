"""What every recalibrator shares: the registry they are listed in (``REGISTRY``, filled by
``@register``), the :class:`Recalibrator` protocol, :class:`NotFittedError`, the validation of
fit and apply inputs, the output conversion and the abstract :class:`Base` class. The contract
itself is described in :mod:`quantcal.calibration.recal`.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
import torch

from quantcal._registry import Registry
from quantcal.calibration.checks import ArrayLike, check_finite, validate, validate_logits

__all__ = [
    "REGISTRY",
    "Base",
    "NotFittedError",
    "Recalibrator",
    "apply_input",
    "check_state",
    "fit_inputs",
    "output",
    "register",
]

REGISTRY: Registry[type] = Registry("recalibrator")
register = REGISTRY.register


@runtime_checkable
class Recalibrator(Protocol):
    """What every recalibrator offers (see ``quantcal.recal`` for the full contract)."""

    name: ClassVar[str]
    preserves_argmax: ClassVar[bool]

    def fit(self, logits: ArrayLike, labels: ArrayLike) -> Recalibrator: ...

    def __call__(self, logits: ArrayLike) -> ArrayLike: ...

    def state_dict(self) -> dict[str, Any]: ...

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> Recalibrator: ...


class NotFittedError(ValueError):
    """Raised when a recalibrator is applied before ``fit`` (or ``fixed``)."""


def fit_inputs(logits: ArrayLike, labels: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated float64 logits and long labels for fitting."""
    z, y = validate(logits, labels)
    check_finite(int((~torch.isfinite(z)).any(dim=1).sum()), z.shape[0])
    return z.double(), y


def apply_input(logits: ArrayLike) -> torch.Tensor:
    z = validate_logits(logits)
    check_finite(int((~torch.isfinite(z)).any(dim=1).sum()), z.shape[0])
    return z


def output(out: torch.Tensor, like: ArrayLike, z: torch.Tensor) -> ArrayLike:
    dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
    out = out.to(dtype=dtype, device=z.device)
    return out.cpu().numpy() if isinstance(like, np.ndarray) else out


def check_state(cls: type, state: dict[str, Any]) -> None:
    if not isinstance(state, dict) or state.get("name") != cls.name:
        got = state.get("name") if isinstance(state, dict) else type(state).__name__
        raise ValueError(
            f"state_dict is for {got!r}, not {cls.name!r}; use recal.from_state_dict(state)."
        )


class Base(abc.ABC):
    name: ClassVar[str] = ""
    preserves_argmax: ClassVar[bool] = True
    n_classes: int | None = None

    @classmethod
    def fit_parameters(cls, n_classes: int | None = None) -> int | None:
        """How many numbers a fit sets (None: depends on an unknown ``n_classes``)."""
        return 1

    def _require_fitted(self, z: torch.Tensor) -> None:
        if not self.fitted:
            raise NotFittedError(
                f"{type(self).__name__} is not fitted; call .fit(val_logits, val_labels) first."
            )
        if self.n_classes is not None and z.shape[1] != self.n_classes:
            raise ValueError(
                f"{type(self).__name__} was fitted on C = {self.n_classes} classes but got "
                f"logits with {z.shape[1]} columns."
            )

    @property
    @abc.abstractmethod
    def fitted(self) -> bool: ...

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.state_dict()!r:.200})"

    @abc.abstractmethod
    def state_dict(self) -> dict[str, Any]: ...
