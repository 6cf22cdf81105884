"""The in-memory dataset types: :class:`Split` (uint8 NCHW images, labels and the positions
they came from, batched and augmented on the device) and :class:`Splits` (a dataset's four splits
and its metadata).

Every dataset becomes a :class:`Splits`: ``train``, ``ptq_calib`` (range calibration for
post-training quantization, carved from *train*), ``val`` (post-hoc recalibration) and ``test``
(measurement). ``ptq_calib``, ``val`` and ``test`` are pairwise disjoint and neither ``ptq_calib``
nor ``val`` overlaps ``train``; each :class:`Split` records the positions it took from its source
pool (``source`` + ``indices``) so this can be proved (see ``tests/test_data.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from quantcal.training.augment import affine, crop_flip, device_key, normalize

__all__ = [
    "Split",
    "Splits",
    "check_int",
]


@dataclass(frozen=True, eq=False)
class Split:
    """One split held in memory as uint8 NCHW plus labels; batches are made on the device.

    ``indices[i]`` is the position of sample ``i`` in its ``source`` pool (e.g. the official train
    set), which makes disjointness between splits checkable.
    """

    images: torch.Tensor
    labels: torch.Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    indices: torch.Tensor
    source: str = "train"
    #: A model's own preprocessing in place of ``(x / 255 - mean) / std``: called with each
    #: uint8 batch (B, C, H, W) on the device (after augmentation), it returns the float input
    #: batch (B, ...). ``transform_name`` says what it is (``module:function``).
    transform: Callable[[torch.Tensor], torch.Tensor] | None = field(
        default=None, compare=False, repr=False
    )
    transform_name: str = ""
    _cache: dict[torch.device, tuple[torch.Tensor, ...]] = field(
        default_factory=dict, init=False, repr=False
    )

    def __post_init__(self) -> None:
        imgs, labels, idx = self.images, self.labels, self.indices
        if not isinstance(imgs, torch.Tensor) or imgs.dtype != torch.uint8 or imgs.dim() != 4:
            raise ValueError(
                "Split.images must be a uint8 tensor (N, C, H, W); got "
                f"{getattr(imgs, 'dtype', type(imgs))} {tuple(getattr(imgs, 'shape', ()))}"
            )
        n = imgs.shape[0]
        for fname, t in (("labels", labels), ("indices", idx)):
            if not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or t.shape != (n,):
                raise ValueError(
                    f"Split.{fname} must be an int64 tensor of shape ({n},) to match images; got "
                    f"{getattr(t, 'dtype', type(t))} {tuple(getattr(t, 'shape', ()))}"
                )
        c = imgs.shape[1]
        mean = tuple(float(v) for v in self.mean)
        std = tuple(float(v) for v in self.std)
        if len(mean) != c or len(std) != c or min(std) <= 0:
            raise ValueError(
                f"Split.mean/std need {c} values (one per channel, std > 0); got {mean}, {std}"
            )
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)
        if not imgs.is_contiguous():
            object.__setattr__(self, "images", imgs.contiguous())

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __repr__(self) -> str:
        shape = "x".join(str(s) for s in self.images.shape)
        return f"Split({shape} uint8, source={self.source!r})"

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images -> the model's float input: this split's ``transform`` when it has one,
        else ``(x / 255 - mean) / std`` with its mean/std (see :func:`normalize`)."""
        if self.transform is not None:
            return self._transformed(images)
        return normalize(images, self.mean, self.std)

    def _transformed(self, images: torch.Tensor) -> torch.Tensor:
        out = self.transform(images)
        if (
            not isinstance(out, torch.Tensor)
            or not out.is_floating_point()
            or out.dim() < 1
            or out.shape[0] != images.shape[0]
        ):
            got = (
                f"{out.dtype} {tuple(out.shape)}"
                if isinstance(out, torch.Tensor)
                else type(out).__name__
            )
            raise TypeError(
                f"the transform {self.transform_name or self.transform!r} must return a float "
                f"tensor with the batch first, (B, ...), for a uint8 batch {tuple(images.shape)}; "
                f"got {got}"
            )
        return out

    def _on(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """(images, labels, scale, shift) on ``device``, copied there once and cached."""
        if device not in self._cache:
            scale, shift = affine(self.mean, self.std, device)
            self._cache[device] = (
                self.images.to(device),
                self.labels.to(device),
                scale,
                shift,
            )
        return self._cache[device]

    def batches(
        self,
        batch_size: int,
        *,
        device: torch.device | str | None = None,
        shuffle: bool = False,
        augment: bool = False,
        seed: int = 0,
        epoch: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        pad: int = 4,
        flip: bool = True,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(images float32 (B, C, H, W), labels int64 (B,))`` on ``device`` (default CPU).

        The split is copied to ``device`` once (cached per device); order, crop offsets and flips
        for the epoch come from one CPU generator seeded with ``seed + epoch`` and are drawn for
        the whole permutation, so a sample's augmentation does not depend on ``world_size``.
        ``augment`` applies torchvision's ``RandomCrop(H, padding=pad)`` (padding with black, i.e.
        zeros in uint8 *before* normalisation, so the border is the normalised value of black)
        then ``RandomHorizontalFlip`` if ``flip``, both as batched gathers on the device.
        With ``world_size > 1`` the permutation is cut to a multiple of ``world_size`` (dropping
        at most ``world_size - 1`` samples of this epoch's order) and rank ``r`` takes positions
        ``r, r + world_size, ...``: disjoint, equal-sized shards, as ``DistributedSampler``
        with ``drop_last=True``. ``shuffle=False`` keeps the stored order (deterministic eval).
        """
        check_int("batch_size", batch_size, 1)
        check_int("world_size", world_size, 1)
        check_int("pad", pad, 0)
        check_int("seed", seed, None)
        check_int("epoch", epoch, 0)
        if not (isinstance(rank, int) and 0 <= rank < world_size):
            raise ValueError(f"rank must be an int in [0, world_size={world_size}), got {rank!r}")
        return self._iterate(
            batch_size,
            device_key(device),
            shuffle,
            augment,
            seed,
            epoch,
            drop_last,
            rank,
            world_size,
            pad,
            flip,
        )

    def _iterate(
        self,
        batch_size: int,
        device: torch.device,
        shuffle: bool,
        augment: bool,
        seed: int,
        epoch: int,
        drop_last: bool,
        rank: int,
        world_size: int,
        pad: int,
        flip: bool,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        images, labels, scale, shift = self._on(device)
        n = len(self)
        gen = torch.Generator().manual_seed(seed + epoch)
        order = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
        if augment:
            offsets = torch.randint(0, 2 * pad + 1, (2, n), generator=gen)
            flips = torch.randint(0, 2, (n,), generator=gen).bool()
            if not flip:
                flips.zero_()
        per_rank = n // world_size if world_size > 1 else n
        positions = torch.arange(rank, per_rank * world_size, world_size)
        order = order[positions].to(device)
        if augment:
            offsets = offsets[:, positions].to(device)
            flips = flips[positions].to(device)
        stop = per_rank - per_rank % batch_size if drop_last else per_rank
        for start in range(0, stop, batch_size):
            idx = order[start : start + batch_size]
            x = images.index_select(0, idx)
            if augment:
                sl = slice(start, start + batch_size)
                x = crop_flip(x, offsets[0, sl], offsets[1, sl], flips[sl], pad)
            if self.transform is not None:
                yield self._transformed(x), labels.index_select(0, idx)
            else:
                yield x.float().mul_(scale).add_(shift), labels.index_select(0, idx)


def check_int(name: str, value: Any, minimum: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


@dataclass(frozen=True, eq=False)
class Splits:
    """A dataset's four splits and its metadata (see the module docstring for the contract)."""

    name: str
    train: Split
    ptq_calib: Split
    val: Split
    test: Split
    num_classes: int
    image_size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...]
    notes: tuple[str, ...] = ()
    #: The name of the preprocessing every split applies instead of mean/std ("" when none).
    transform_name: str = ""

    def __repr__(self) -> str:
        sizes = ", ".join(
            f"{k}={len(getattr(self, k))}" for k in ("train", "ptq_calib", "val", "test")
        )
        return (
            f"Splits({self.name!r}, {sizes}, classes={self.num_classes}, "
            f"{self.channels}x{self.image_size}x{self.image_size})"
        )

    def items(self) -> list[tuple[str, Split]]:
        """[(name, split)] for train, ptq_calib, val, test."""
        return [(k, getattr(self, k)) for k in ("train", "ptq_calib", "val", "test")]
