"""Models from other libraries in a study: ``arch = "timm:NAME"``.

:func:`timm_factory` returns a factory with the signature every ``module:factory`` arch has
(``num_classes``, ``image_size``, ``in_chans``, ``width``), so a timm model (Wightman, "PyTorch
Image Models", github.com/huggingface/pytorch-image-models) enters the same sweep as the
registry's: created without pretrained weights (the study trains it), with the study's class
count and input channels, and ``img_size`` set to the study's image size where the architecture
takes one (ViTs and other fixed-grid models); convolutional ones adapt through their global
pooling. The factory checks one forward pass at the image size and names what went wrong.
timm is an optional dependency (the ``timm`` extra); it is imported on first use.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

__all__ = ["TIMM_PREFIX", "timm_factory", "timm_version"]

TIMM_PREFIX = "timm:"


def _timm() -> Any:
    try:
        import timm
    except ImportError as exc:
        raise ValueError(
            "arch 'timm:NAME' needs the timm package, which is not installed: pip install "
            "'quantcal[timm]' (or pip install timm; it brings torchvision, which needs a matching "
            "torch build)"
        ) from exc
    return timm


def timm_version() -> str:
    """The installed timm version (it goes into the cache keys: model definitions change)."""
    return str(_timm().__version__)


def timm_factory(name: str) -> Callable[..., nn.Module]:
    """A factory building timm's ``name`` for a study (see the module docstring). ValueError
    when timm is missing or does not know ``name`` (with the closest names it knows)."""
    timm = _timm()
    known = timm.list_models()
    if name not in known:
        import difflib

        close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
        hint = f"; closest: {', '.join(close)}" if close else ""
        raise ValueError(
            f"timm {timm.__version__} has no model {name!r}{hint} (timm.list_models() lists them)"
        )

    def factory(*, num_classes: int, image_size: int, in_chans: int, width: float) -> nn.Module:
        import torch

        if float(width) != 1.0:
            raise ValueError(
                f"timm:{name} has no width multiplier (width = {width:g}); give width = 1 and pick "
                "a smaller variant of the family (e.g. timm:mobilenetv3_small_050)"
            )
        common = {"pretrained": False, "num_classes": num_classes, "in_chans": in_chans}
        try:
            model = timm.create_model(name, img_size=image_size, **common)
        except TypeError:  # a convolutional net without a fixed input grid
            model = timm.create_model(name, **common)
        except (AssertionError, ValueError) as exc:
            raise ValueError(
                f"timm:{name} cannot be built for {image_size}x{image_size}: {exc}"
            ) from exc
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                out = model(torch.zeros(2, in_chans, image_size, image_size))
        except Exception as exc:
            raise ValueError(
                f"timm:{name} does not run on {in_chans}x{image_size}x{image_size} images "
                f"({type(exc).__name__}: {exc}); choose an architecture that accepts this size"
            ) from exc
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
            raise ValueError(
                f"timm:{name} gives {getattr(out, 'shape', type(out))} for 2 images, not "
                f"(2, {num_classes}) logits"
            )
        model.train(was_training)
        return model

    factory.__qualname__ = f"timm:{name}"
    return factory
