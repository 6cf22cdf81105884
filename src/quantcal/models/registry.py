"""Model registry and factory: ``create_model(name, ...)`` builds any registered family by name.

A family registers a class (or factory) taking keyword arguments ``num_classes``,
``image_size``, ``in_chans``, ``width`` plus its own options; ``create_model`` builds it,
applies the He initialisation (seeded by ``seed`` when given) and records the arguments in
``model.config`` so that ``create_model(**model.config)`` rebuilds the same architecture.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from quantcal._registry import Registry
from quantcal.models._common import init_weights

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")


def register_model(name: str) -> Callable[[Any], Any]:
    """Decorator registering a model class/factory under ``name`` (lower-cased)."""
    return MODELS.register(name)


def list_models() -> list[str]:
    """Sorted names of every registered model family."""
    return MODELS.available()


def create_model(
    name: str,
    *,
    num_classes: int,
    image_size: int = 32,
    in_chans: int = 3,
    width: float = 1.0,
    seed: int | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build the model ``name`` in train mode, He-initialised.

    Args:
        name: a name from :func:`list_models` (case-insensitive); an unknown name raises
            ValueError listing the available ones.
        num_classes: logits per sample (>= 1).
        image_size: side of the square input the network is adapted to (>= the family's minimum,
            4; 32 gives the reference CIFAR form).
        in_chans: input channels (3 RGB, 1 grey-scale).
        width: channel multiplier (1.0 = paper size; small values give tiny test nets).
        seed: if given, initial weights depend on it alone (a private ``torch.Generator``);
            otherwise they come from the global RNG.
        **kwargs: family options (e.g. ``head_channels`` for the ShuffleNets).

    The returned module has ``num_classes``, ``image_size``, ``in_chans``, ``width`` and
    ``config`` (these arguments, with ``name`` and ``seed``).
    """
    factory = MODELS.get(name)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be an int or None, got {seed!r}")
    model = factory(
        num_classes=num_classes, image_size=image_size, in_chans=in_chans, width=width, **kwargs
    )
    generator = None
    if seed is not None:
        generator = torch.Generator().manual_seed(seed)
    init_weights(model, generator)
    config = dict(getattr(model, "config", {}))
    config.update(
        name=name.lower(),
        num_classes=num_classes,
        image_size=image_size,
        in_chans=in_chans,
        width=float(width),
        seed=seed,
        **kwargs,
    )
    model.config = config
    return model.train()
