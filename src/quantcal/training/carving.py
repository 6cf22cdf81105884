"""Stratified, seeded carving of splits out of pools, and the assembly of :class:`Splits` from
the positions carved: per-channel statistics, the class count, label-range checks and the notes
on classes a split lacks. A pool missing ``test`` or ``val`` has it held out of train."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from quantcal.training.splits import Split, Splits, check_int

__all__ = [
    "assemble",
    "default_size",
    "split_pools",
    "stratified_split",
]


def _allocate(counts: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Per-class take counts summing to ``size``, proportional to ``counts`` (largest remainder;
    ties broken at random so small samples do not favour low class ids)."""
    total = int(counts.sum())
    numer = counts.astype(np.int64) * size
    base = numer // total
    frac = numer % total
    rem = size - int(base.sum())
    order = np.lexsort((rng.random(len(counts)), -frac))
    base[order[:rem]] += 1
    return base


def stratified_split(
    labels: np.ndarray | torch.Tensor, pool: np.ndarray, size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Take ``size`` positions out of ``pool`` with class proportions kept; return (taken, rest).

    ``labels`` is indexed by position; both outputs are shuffled with ``rng``.
    """
    pool = np.asarray(pool, dtype=np.int64)
    if not 0 < size < len(pool):
        raise ValueError(
            f"cannot carve {size} samples out of a pool of {len(pool)}: choose a size between 1 "
            f"and {len(pool) - 1} so that some samples remain"
        )
    lab = np.asarray(labels)[pool]
    _, inverse, counts = np.unique(lab, return_inverse=True, return_counts=True)
    take = _allocate(counts, size, rng)
    perm = rng.permutation(len(pool))
    grouped = perm[np.argsort(inverse[perm], kind="stable")]  # class-grouped, random within
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    cls_of = inverse[grouped]
    rank_in_class = np.arange(len(pool)) - starts[cls_of]
    chosen = rank_in_class < take[cls_of]
    taken = pool[grouped[chosen]]
    rest = pool[grouped[~chosen]]
    return taken[rng.permutation(len(taken))], rest[rng.permutation(len(rest))]


def _channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean/std (population) of uint8 NCHW images, divided by 255.

    Uses a 256-bin histogram per channel, so no float copy of the data is made.
    """
    means, stds = [], []
    values = np.arange(256, dtype=np.float64)
    for c in range(images.shape[1]):
        hist = np.bincount(images[:, c].reshape(-1), minlength=256).astype(np.float64)
        n = hist.sum()
        m = (hist * values).sum() / n
        var = (hist * values**2).sum() / n - m * m
        means.append(m / 255.0)
        stds.append(float(np.sqrt(max(var, 0.0))) / 255.0 or 1.0)
    return tuple(float(v) for v in means), tuple(float(v) for v in stds)


def _make_split(
    images: np.ndarray,
    labels: np.ndarray,
    idx: np.ndarray,
    mean: Sequence[float],
    std: Sequence[float],
    source: str,
) -> Split:
    idx = np.asarray(idx, dtype=np.int64)
    return Split(
        images=torch.from_numpy(np.ascontiguousarray(images[idx])),
        labels=torch.from_numpy(labels[idx].astype(np.int64)),
        mean=tuple(mean),
        std=tuple(std),
        indices=torch.from_numpy(idx),
        source=source,
    )


def assemble(
    name: str,
    pools: dict[str, tuple[np.ndarray, np.ndarray]],
    parts: dict[str, tuple[str, np.ndarray]],
    *,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    notes: Sequence[str] = (),
) -> Splits:
    """Build :class:`Splits` from pools (source -> (NCHW images, labels)) and split positions."""
    if mean is None or std is None:
        src, idx = parts["train"]
        mean, std = _channel_stats(pools[src][0][idx])
    splits = {
        k: _make_split(pools[src][0], pools[src][1], idx, mean, std, src)
        for k, (src, idx) in parts.items()
    }
    if num_classes is None:
        num_classes = _classes_from_train(name, pools)
    _check_label_range(name, pools, num_classes)
    notes = [*notes, *_absent_class_notes(splits, num_classes)]
    if class_names is None:
        class_names = tuple(str(i) for i in range(num_classes))
    some = next(iter(pools.values()))[0]
    return Splits(
        name=name,
        num_classes=num_classes,
        image_size=int(some.shape[-1]),
        channels=int(some.shape[1]),
        mean=tuple(float(v) for v in mean),
        std=tuple(float(v) for v in std),
        class_names=tuple(class_names),
        notes=tuple(notes),
        **splits,
    )


def _classes_from_train(name: str, pools: dict[str, tuple[np.ndarray, np.ndarray]]) -> int:
    """The class count of a file without a class list: the largest *train* label plus one.

    Only train decides: one stray label in val or test must not turn a 10-class study into a
    100-class one (it is refused by :func:`_check_label_range` instead)."""
    labels = pools["train"][1]
    if not len(labels):
        raise ValueError(f"{name}: train_labels is empty; a dataset needs training images")
    return int(labels.max()) + 1


def _check_label_range(
    name: str, pools: dict[str, tuple[np.ndarray, np.ndarray]], num_classes: int
) -> None:
    """Refuse labels outside 0..num_classes-1, naming the array, the values and their count."""
    for part, (_, labels) in pools.items():
        bad = labels[(labels < 0) | (labels >= num_classes)]
        if len(bad):
            values, counts = np.unique(bad, return_counts=True)
            shown = ", ".join(f"{v} ({c} images)" for v, c in zip(values[:10], counts[:10]))
            more = f" and {len(values) - 10} more values" if len(values) > 10 else ""
            raise ValueError(
                f"{name}: {part}_labels holds class ids outside 0..{num_classes - 1}: {shown}"
                f"{more}. The dataset has {num_classes} classes (for a file: the largest train "
                "label plus one). Fix or drop those labels; a class must have training images."
            )


def _absent_class_notes(splits: dict[str, Split], num_classes: int) -> list[str]:
    """One note per split that lacks some classes (a class absent from train is never learnt,
    one absent from val is never seen by recalibration, one absent from test is not measured)."""
    notes = []
    for part in ("train", "val", "test"):
        present = np.unique(splits[part].labels.numpy())
        missing = np.setdiff1d(np.arange(num_classes), present)
        if len(missing):
            shown = ", ".join(str(int(c)) for c in missing[:10])
            more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
            notes.append(
                f"{len(missing)} of {num_classes} classes have no {part} images (class "
                f"{shown}{more})"
            )
    return notes


def default_size(value: int | None, default: int, what: str) -> int:
    if value is None:
        return default
    check_int(what, value, 1)
    return value


def split_pools(
    name: str,
    pools: dict[str, tuple[np.ndarray, np.ndarray]],
    seed: int,
    val_size: int | None,
    ptq_calib_size: int | None,
    test_size: int | None,
) -> tuple[dict[str, tuple[str, np.ndarray]], list[str]]:
    """Positions for train/ptq_calib/val/test from pools; missing test/val held out of train."""
    rng = np.random.default_rng(seed)
    labels = pools["train"][1]
    n = len(labels)
    rest = np.arange(n)
    notes: list[str] = []
    parts: dict[str, tuple[str, np.ndarray]] = {}
    if "test" in pools:
        if test_size is not None:
            raise ValueError(f"{name} has an official test split; test_size applies only without")
        parts["test"] = ("test", np.arange(len(pools["test"][1])))
    else:
        size = default_size(test_size, max(1, round(0.2 * n)), "test_size")
        taken, rest = stratified_split(labels, rest, size, rng)
        parts["test"] = ("train", taken)
        notes.append(f"no test split in the file: held out {size} stratified train images")
    if "val" in pools:
        val_pool = np.arange(len(pools["val"][1]))
        if val_size is not None and val_size != len(val_pool):
            val_pool, _ = stratified_split(pools["val"][1], val_pool, val_size, rng)
        parts["val"] = ("val", val_pool)
    else:
        size = default_size(val_size, max(1, round(0.1 * n)), "val_size")
        taken, rest = stratified_split(labels, rest, size, rng)
        parts["val"] = ("train", taken)
        notes.append(f"no val split in the file: held out {size} stratified train images")
    ptq_default = min(1000, max(1, round(0.02 * n)))
    ptq_n = default_size(ptq_calib_size, ptq_default, "ptq_calib_size")
    taken, rest = stratified_split(labels, rest, ptq_n, rng)
    parts["ptq_calib"] = ("train", taken)
    parts["train"] = ("train", rest)
    return parts, notes
