"""Splits derived from loaded ones: another per-channel normalisation, a stratified subset of
the training split, or a model's own preprocessing (checked on two images first). Images are
shared, never copied."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from quantcal.training.carving import stratified_split
from quantcal.training.splits import Splits

__all__ = [
    "TransformError",
    "per_channel",
    "with_normalization",
    "with_train_size",
    "with_transform",
]


def per_channel(
    values: float | Sequence[float], channels: int, what: str, *, dataset: str | None = None
) -> tuple[float, ...]:
    """One finite value per channel from a number or a sequence (a single value is repeated);
    otherwise a ValueError naming ``what``, how many values were given, how many channels the
    ``dataset`` has and what to give."""
    if isinstance(values, (int, float)) and not isinstance(values, bool):
        values = [values]
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be numbers, got {values!r}") from None
    if len(out) != channels and len(out) != 1:
        raise ValueError(
            f"{what} has {_count(len(out), 'value')} but "
            + (f"the dataset ({dataset})" if dataset else "the data")
            + f" has {_count(channels, 'channel')}: give "
            + (
                "1 value"
                if channels == 1
                else f"{channels} values (one per channel) or 1 (used for every channel)"
            )
        )
    if not all(np.isfinite(out)):
        raise ValueError(f"{what} must hold finite numbers, got {list(values)}")
    return out * channels if len(out) == 1 else out


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def with_normalization(
    splits: Splits,
    mean: float | Sequence[float],
    std: float | Sequence[float],
    *,
    names: tuple[str, str] = ("mean", "std"),
) -> Splits:
    """The same splits, normalised as ``(x / 255 - mean) / std`` with the given per-channel
    ``mean`` and ``std`` (on the [0, 1] pixel scale, as timm and torchvision give them; one value
    is used for every channel): ``mean=0, std=1`` feeds ``x / 255``. Images are shared.
    ``names``: what the user called them in errors (``("--mean", "--std")``, ``("data.mean",
    "data.std")``)."""
    c = splits.channels
    m = per_channel(mean, c, names[0], dataset=splits.name)
    sd = per_channel(std, c, names[1], dataset=splits.name)
    if min(sd) <= 0:
        raise ValueError(f"{names[1]} must be > 0 for every channel, got {list(sd)}")
    parts = {k: dataclasses.replace(v, mean=m, std=sd) for k, v in splits.items()}
    return dataclasses.replace(splits, mean=m, std=sd, **parts)


def with_train_size(splits: Splits, size: int, *, seed: int = 0) -> Splits:
    """The same splits with the training split cut to a stratified subset of ``size`` images
    (class proportions kept, drawn with ``seed``; the other splits untouched), for a study sized
    to a small machine. The cut is named in ``notes``. ValueError when ``size`` is not below the
    training split's size."""
    n = len(splits.train)
    if isinstance(size, bool) or not isinstance(size, int) or not 0 < size <= n:
        raise ValueError(
            f"train_size must be an integer in [1, {n}] (the training split of {splits.name} "
            f"has {n} images), got {size!r}"
        )
    if size == n:
        return splits
    t = splits.train
    rng = np.random.default_rng([seed, 0x7472])  # its own stream: the other splits are drawn
    taken, _ = stratified_split(t.labels.numpy(), np.arange(n), size, rng)
    idx = torch.from_numpy(np.sort(taken))
    train = dataclasses.replace(
        t, images=t.images[idx], labels=t.labels[idx], indices=t.indices[idx]
    )
    note = f"trained on a stratified {size} of the {n} training images ([data] train_size)"
    return dataclasses.replace(splits, train=train, notes=(*splits.notes, note))


class TransformError(ValueError, TypeError):
    """A ``transform`` (a model's own preprocessing) that cannot be used: it raised, or returned
    something other than a float batch (B, C, H, W). A ValueError (bad input: exit 2); also a
    TypeError, which callers caught before it existed."""


def _describe(out: Any) -> str:
    if isinstance(out, torch.Tensor):
        return f"{out.dtype} {tuple(out.shape)}"
    if isinstance(out, np.ndarray):
        return f"numpy {out.dtype} {tuple(out.shape)}"
    return f"a {type(out).__name__}"


def _check_transform(transform: Callable[..., Any], name: str, images: torch.Tensor) -> Any:
    """``transform(images)`` on a few uint8 images, checked: a TransformError naming ``name``,
    what it returned and what is expected if it raised or did not return a float (B, C, H, W)
    tensor or numpy array with the same B. Returns its output."""
    shape = tuple(images.shape)
    try:
        out = transform(images)
    except Exception as exc:
        raise TransformError(
            f"the transform {name} raised {type(exc).__name__}: {exc} when given a uint8 batch "
            f"{shape} (values 0-255, channels first): fix the function so it takes that and "
            "returns the model's float input (B, C, H, W)"
        ) from None
    expected = (
        f"it must return a float tensor with the batch first, (B, C, H, W), for a uint8 batch "
        f"{shape}"
    )
    if not isinstance(out, (torch.Tensor, np.ndarray)):
        raise TransformError(f"the transform {name} returned {_describe(out)}: {expected}")
    floating = (
        out.is_floating_point()
        if isinstance(out, torch.Tensor)
        else np.issubdtype(out.dtype, np.floating)
    )
    if not floating:
        raise TransformError(
            f"the transform {name} must return a float tensor with the batch first, (B, C, H, W),"
            f" for a uint8 batch {shape}; got {_describe(out)} (e.g. x.float() / 255)"
        )
    if out.ndim != 4 or out.shape[0] != shape[0]:
        raise TransformError(
            f"the transform {name} returned {_describe(out)} for {shape[0]} images: {expected}"
        )
    return out


def _float32_transform(
    transform: Callable[..., Any], name: str, example: Any
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``transform`` itself when ``example`` (its checked output) is a float32 tensor; else a
    wrapper that turns its numpy output into a tensor on the input's device and casts float64 /
    float16 to float32 (said once on stderr), so the model gets the dtype of its weights."""
    if isinstance(example, torch.Tensor) and example.dtype == torch.float32:
        return transform
    dtype = str(example.dtype).removeprefix("torch.")
    if dtype != "float32":
        print(
            f"note: the transform {name} returns {dtype}; quantcal casts it to float32, the "
            "dtype of the model's weights",
            file=sys.stderr,
        )

    def as_float32(images: torch.Tensor) -> torch.Tensor:
        out = transform(images)
        if isinstance(out, np.ndarray):
            out = torch.from_numpy(np.ascontiguousarray(out)).to(images.device)
        if isinstance(out, torch.Tensor) and out.is_floating_point():
            out = out.float()
        return out

    as_float32.__qualname__ = getattr(transform, "__qualname__", name)
    return as_float32


def with_transform(
    splits: Splits, transform: Callable[[torch.Tensor], torch.Tensor], name: str
) -> Splits:
    """The same splits, preprocessed by ``transform`` instead of ``(x / 255 - mean) / std``:
    each uint8 batch (B, C, H, W), on the device and after augmentation, goes through
    ``transform`` and must come back as a float tensor (B, C, H, W). ``name``
    (``module:function``) is said wherever the preprocessing is.

    Checked here first, on two training images: a :class:`TransformError` (a ValueError) naming
    ``name``, the exception or what came back, and what is expected, if it raises or returns
    anything but a floating tensor or numpy array of 4 dimensions with the same batch size. A
    numpy array, float64 or float16 is turned into a float32 tensor (said once on stderr).
    When it returns square images, ``channels`` and ``image_size`` become theirs (the model's
    input)."""
    if not callable(transform):
        raise TransformError(f"transform {name!r} is not callable ({type(transform).__name__})")
    example = _check_transform(transform, name, splits.train.images[:2])
    transform = _float32_transform(transform, name, example)
    parts = {
        k: dataclasses.replace(v, transform=transform, transform_name=name)
        for k, v in splits.items()
    }
    example = parts["train"].normalize(parts["train"].images[:2])
    shape = {}
    if example.dim() == 4 and example.shape[-1] == example.shape[-2]:  # what the model sees
        shape = {"channels": int(example.shape[1]), "image_size": int(example.shape[-1])}
    return dataclasses.replace(splits, transform_name=name, **parts, **shape)
