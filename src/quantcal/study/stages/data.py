"""The data stage: a group's splits, preprocessed as its model expects, and which images each
later stage may read.

Splits are loaded once per (dataset, seed, sizes) and normalised once per preprocessing, for the
whole run (several models share a dataset). A group's inputs are the dataset's own statistics,
the study's ``[data] mean/std`` or ``transform``, or what a ``module:factory`` declares. Before
anything is computed, :func:`preflight` checks every input of the run's groups.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from quantcal.study import cells as _cells
from quantcal.study.cells import Group, QuantCell
from quantcal.study.factories import build_model, import_factory, load_weights, reparameterizer
from quantcal.study.keys import split_args
from quantcal.study.notes import fmt3
from quantcal.study.stages.base import Need, Stage
from quantcal.training import images as _images

if TYPE_CHECKING:  # pragma: no cover
    from quantcal.study.context import Context

__all__ = [
    "Data",
    "base_splits",
    "data_digest",
    "fresh_model",
    "input_notes",
    "normalization",
    "preflight",
    "ptq_batches",
    "recal_fit",
    "report_fold",
    "search_split",
    "splits",
    "stage_images",
    "transform",
]


class Data(Stage):
    """A group's splits as its model reads them (not cached: loading is cheap and verified)."""

    name: ClassVar[str] = "data"
    scope: ClassVar[str] = "group"

    def run(self, ctx: Context, item: Group, need: Need) -> Any:
        return splits(ctx, item)


def data_digest(ctx: Context, dataset: str) -> str:
    """The content digest of a dataset (the SHA-256 of an ``npz:`` file, the verified md5 of an
    official one), part of the train key."""
    from quantcal.training import data

    memo = ctx.memo("data_digest")
    if dataset not in memo:
        if dataset.lower().startswith("npz:"):
            digest = "sha256:" + ctx.file_digest(dataset[4:])
        else:
            digest = data.dataset_digest(dataset)
        memo[dataset] = digest
    return memo[dataset]


def normalization(
    ctx: Context, g: Group
) -> tuple[tuple[float, ...], tuple[float, ...], str] | None:
    """(mean, std, where it comes from) when the group's inputs are not normalised with the
    dataset's own statistics: the study's ``[data] mean/std``, else what a ``module:factory``
    declares as ``factory.mean`` and ``factory.std``."""
    config = ctx.config
    if config.mean is not None and config.std is not None:
        return config.mean, config.std, "the study's data.mean/std"
    if ":" in g.model.arch:
        factory = import_factory(g.model.arch)
        mean, std = getattr(factory, "mean", None), getattr(factory, "std", None)
        if mean is not None and std is not None:
            as_tuple = lambda v: (  # noqa: E731 - one value or one per channel
                (float(v),) if isinstance(v, (int, float)) else tuple(float(x) for x in v)
            )
            return as_tuple(mean), as_tuple(std), f"declared by {g.model.arch}"
    return None


def transform(ctx: Context, g: Group) -> tuple[Callable[..., Any], str, str] | None:
    """(function, identity, where it comes from) when the group's model preprocesses its
    own inputs: the study's ``[data] transform``, else what a ``module:factory`` declares
    as ``factory.transform`` (a callable or a ``module:function`` string). The identity
    (its name and the SHA-256 of its source file) goes into the cache keys."""
    config = ctx.config
    if config.transform is not None:
        spec: Any = config.transform
        source = "the study's data.transform"
    elif ":" in g.model.arch and config.mean is None:
        spec = getattr(import_factory(g.model.arch), "transform", None)
        source = f"declared by {g.model.arch}"
    else:
        spec = None
    if spec is None:
        return None
    fn = import_factory(spec) if isinstance(spec, str) else spec
    if not callable(fn):
        raise ValueError(
            f"the transform ({source}) must be a callable or a 'module:function' string, got "
            f"{type(fn).__name__}"
        )
    name = spec if isinstance(spec, str) else getattr(fn, "__qualname__", repr(fn))
    try:
        file = inspect.getsourcefile(fn)
    except TypeError:
        file = None
    identity = f"{name} sha256:{ctx.file_digest(file)}" if file else name
    return fn, identity, source


def stage_images(ctx: Context, g: Group) -> _images.StageImages:
    """The group's image policy (:func:`quantcal.study.cells.stage_images`), resolved once."""
    memo = ctx.memo("stage_images")
    if g not in memo:
        memo[g] = _cells.stage_images(ctx.config, g)
    return memo[g]


def recal_fit(ctx: Context, g: Group) -> tuple[str, list[str]]:
    """Where the group's recalibrators are fitted (``val`` or ``test_crossfit``) and the
    notes that go with it (see ``quantcal.study.config.RECAL_FIT``)."""
    memo = ctx.memo("recal_fit")
    if g not in memo:
        policy = stage_images(ctx, g)
        memo[g] = (policy.recal, list(policy.notes))
    return memo[g]


def search_split(ctx: Context, g: Group):
    """The images the group's plan search and attribution read: ``val``, or for a
    checkpoint trained elsewhere whose ``val`` was carved from train, the search half of
    test (``quantcal.training.images.test_halves``)."""
    s = splits(ctx, g)
    if stage_images(ctx, g).search != _images.TEST_HALF:
        return s.val
    half = _images.test_halves(s.test.labels, g.seed)[_images.SEARCH]
    return _images.subset(s.test, half)


def report_fold(ctx: Context, cell: QuantCell, labels) -> tuple[Any, Any] | None:
    """(search half, report half) of test for a plan cell searched on test: its rows are
    scored on the report half only, recalibrated by fits on the search half. Else None."""
    if not cell.precision.startswith("plan:"):
        return None
    if stage_images(ctx, cell.group).search != _images.TEST_HALF:
        return None
    return _images.test_halves(labels, cell.group.seed)


def splits(ctx: Context, g: Group):
    """The group's splits, normalised as its model expects (said once on stderr)."""
    from quantcal.training import data

    base = base_splits(ctx, g)
    norm = normalization(ctx, g)
    tf = transform(ctx, g)
    key = (
        split_args(ctx.config, g),
        None if norm is None else norm[:2],
        None if tf is None else tf[1],
    )
    memo = ctx.memo("normalized")
    if key not in memo:
        if tf is not None:
            memo[key] = data.with_transform(base, tf[0], tf[1])
            name = tf[1].split(" sha256:")[0]
            ctx.say(f"data   {g.dataset}: inputs are {name}(uint8 images) ({tf[2]})")
            return memo[key]
        if norm is None:
            memo[key] = base
            how = f"the dataset's statistics, mean {fmt3(base.mean)}, std {fmt3(base.std)}"
        else:
            memo[key] = data.with_normalization(
                base, norm[0], norm[1], names=("data.mean", "data.std")
            )
            s = memo[key]
            how = f"mean {fmt3(s.mean)}, std {fmt3(s.std)} ({norm[2]})"
        ctx.say(f"data   {g.dataset}: inputs are (x / 255 - mean) / std with {how}")
    return memo[key]


def base_splits(ctx: Context, g: Group):
    """The group's splits as the dataset gives them (loaded once per dataset, seed and sizes)."""
    from quantcal.training import data

    config = ctx.config
    key = split_args(config, g)
    memo = ctx.memo("splits")
    if key not in memo:
        kw: dict[str, Any] = {"seed": g.seed}
        if config.val_size is not None:
            kw["val_size"] = config.val_size
        if config.ptq_calib_size is not None:
            kw["ptq_calib_size"] = config.ptq_calib_size * config.ptq_calib_samples
        s = data.load_dataset(g.dataset, **kw)
        if config.train_size is not None:
            s = data.with_train_size(s, config.train_size, seed=g.seed)
        for note in s.notes:
            ctx.say(f"note   {g.dataset} (seed {g.seed}): {note}")
        memo[key] = s
    return memo[key]


def preflight(ctx: Context, groups: list[Group]) -> None:
    """Check every input of ``groups`` before computing anything: each dataset loads, each
    ``module:factory`` imports, each ``npz:`` unknown-input file fits the dataset's images,
    each checkpoint loads into its model. Raises ValueError
    naming the input (bad input exits 2 and computes nothing)."""
    for g in groups:
        if ":" in g.model.arch:
            import_factory(g.model.arch)
            reparameterizer(g.model.arch)
        try:
            base_splits(ctx, g)
            data_digest(ctx, g.dataset)
        except (ValueError, OSError) as exc:
            raise ValueError(f"dataset {g.dataset!r}: {exc}") from exc
        try:  # a bad mean/std or transform is named by with_normalization/with_transform
            s = splits(ctx, g)
        except TypeError as exc:
            raise ValueError(f"the inputs of {g.label}: {exc}") from exc
        for spec in ctx.config.ood:  # an unknown-input file must fit the dataset's images
            if spec.startswith("npz:"):
                from quantcal.training.ood_sets import load_ood_npz

                try:
                    load_ood_npz(spec[4:], s.test)
                except (ValueError, OSError) as exc:
                    raise ValueError(f"data.ood {spec!r} for {g.dataset!r}: {exc}") from exc
        if g.model.checkpoint is not None:
            load_weights(fresh_model(g, s), g.model.checkpoint)


def fresh_model(g: Group, s):
    """The group's architecture, freshly initialised for its data (seeded)."""
    return build_model(
        g.model.arch,
        num_classes=s.num_classes,
        image_size=s.image_size,
        in_chans=s.channels,
        width=g.model.width,
        seed=g.seed,
    )


def ptq_batches(ctx: Context, s, sample: int) -> list:
    """Range-calibration sample ``sample``: the sample-th of equal disjoint slices."""
    k = ctx.config.ptq_calib_samples
    pool = s.ptq_calib
    size = len(pool) // k
    if size < 1:
        raise ValueError(
            f"the ptq_calib split has {len(pool)} images, too few for {k} disjoint samples"
        )
    part = dataclasses.replace(
        pool,
        images=pool.images[sample * size : (sample + 1) * size],
        labels=pool.labels[sample * size : (sample + 1) * size],
        indices=pool.indices[sample * size : (sample + 1) * size],
    )
    return [x for x, _ in part.batches(256, device=ctx.device)]


def input_notes(ctx: Context, model, s) -> list[str]:
    """A note when the validation inputs, as preprocessed, are not what the model's first
    BatchNorm saw in training (``diagnose.input_statistics_notes``)."""
    from quantcal.calibration import diagnose

    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else ctx.device
    x = next(iter(s.val.batches(256, device=device)), (None,))[0]
    if x is None:
        return []
    return diagnose.input_statistics_notes(model, x, preprocessing="mean/std or transform")
