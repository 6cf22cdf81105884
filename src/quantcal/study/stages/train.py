"""The train stage: a group's trained (or loaded) model, cached by its train key.

Key (:func:`quantcal.study.keys.train_key`): the dataset's content digest, its splits, the
input preprocessing when not the dataset's, the model, and the recipe with the pinned thread
count (or a given checkpoint's SHA-256). Record: ``cache/train/KEY/{model.pt, meta.json,
last.pt}``; ``meta.json`` is written last and marks the entry complete, ``last.pt`` lets a killed
training resume.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any, ClassVar

from quantcal._io import atomic_write_bytes, torch_bytes
from quantcal.study import keys
from quantcal.study.cells import Group, objective_spec
from quantcal.study.environment import rank
from quantcal.study.factories import load_state, load_weights
from quantcal.study.stages import data as data_stage
from quantcal.study.stages.base import Need, Stage

if TYPE_CHECKING:  # pragma: no cover
    from quantcal.study.context import Context

__all__ = ["Train", "key", "train_config"]


def key(ctx: Context, g: Group) -> str:
    """The group's train key."""
    ckpt = None if g.model.checkpoint is None else ctx.file_digest(g.model.checkpoint)
    norm = data_stage.normalization(ctx, g)
    tf = data_stage.transform(ctx, g)
    return keys.train_key(
        ctx.config,
        g,
        data_stage.data_digest(ctx, g.dataset),
        ckpt,
        None if norm is None else norm[:2],
        None if tf is None else tf[1],
    )


def train_config(ctx: Context, g: Group):
    """The group's training recipe (``train.TrainConfig``)."""
    from quantcal.training import train

    return train.TrainConfig.from_dict(
        {**ctx.config.train, "objective": objective_spec(ctx.config, g), "seed": g.seed}
    )


class Train(Stage):
    """(model, train key, meta): trained with the study's recipe, or a checkpoint loaded."""

    name: ClassVar[str] = "train"
    scope: ClassVar[str] = "group"
    reads: ClassVar[tuple[str, ...]] = ("data",)
    eager: ClassVar[bool] = True
    cache: ClassVar[str | None] = "train"

    def keys(self, ctx: Context, item: Group) -> list[str]:
        return [key(ctx, item)]

    def failed(self, ctx: Context, cells: list, exc: BaseException) -> bool:
        from quantcal.study.stages.rows import error_rows

        error_rows(ctx, cells, exc)
        return False

    def run(self, ctx: Context, item: Group, need: Need) -> Any:
        from quantcal.training import train

        g = item
        tkey = key(ctx, g)
        folder = ctx.cache / "train" / tkey
        splits = need("data")
        model = data_stage.fresh_model(g, splits)
        if g.model.checkpoint is not None:
            return load_weights(model, g.model.checkpoint), tkey, {"checkpoint": g.model.checkpoint}
        final, meta_path, last = folder / "model.pt", folder / "meta.json", folder / "last.pt"
        meta = ctx.store.read_json(meta_path, ("history", "model_sha256"))
        if meta is not None:
            state = ctx.store.read_torch(final, meta["model_sha256"])
            if state is not None:
                return load_state(model, state, final), tkey, meta
            meta_path.unlink(missing_ok=True)  # its model is gone: train (or resume) again
        elif final.exists():
            ctx.store.heal(final, "no valid meta.json beside it")
        if last.exists():
            try:
                train.load_checkpoint(last)
            except ValueError as exc:
                ctx.store.heal(last, str(exc).split(". ")[0])
        cfg = train_config(ctx, g)
        ctx.say(f"train  {g.label}  ({cfg.epochs} epochs)")

        def epoch_line(epoch: int, _model, rec: dict[str, float]) -> None:
            if rank() == 0:
                ctx.say(
                    f"train  {g.label}  epoch {epoch}/{cfg.epochs}  loss {rec['loss']:.3f}  "
                    f"train acc {100 * rec['train_acc']:.1f} %  ({rec['seconds']:.1f} s)"
                )

        result = train.train(
            model,
            splits,
            cfg,
            device=ctx.device,
            out_dir=folder,
            resume=True,
            progress=not ctx.quiet,
            on_epoch_end=epoch_line,
        )
        trained = result.model.to("cpu").eval()
        raw = torch_bytes({"model": trained.state_dict(), "config": getattr(trained, "config", {})})
        meta = {
            "group": g.label,
            "history": result.history,
            "seconds": result.seconds,
            "train_config": cfg.to_dict(),
            "model_sha256": hashlib.sha256(raw).hexdigest(),
        }
        if rank() == 0:  # the model first: meta.json is what marks the entry complete
            atomic_write_bytes(final, raw)
            ctx.store.write_json(meta_path, meta)
        return trained, tkey, meta
