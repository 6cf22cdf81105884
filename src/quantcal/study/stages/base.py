"""A stage of the study pipeline, and the memo through which stages read each other's outputs.

A stage computes one thing for one item, a training group (``scope = "group"``) or a quantized
cell (``scope = "cell"``), and declares:

- ``name``: how other stages ask for its output;
- ``reads``: the stages whose outputs it takes (``need`` refuses any other, so the declared
  inputs are the real ones);
- ``applies(ctx, item)``: whether it runs for this item at all (the optional stages: plans,
  attribution);
- ``eager``: whether the runner asks for it for every item, in the listed order (the stages whose
  results the study keeps: train, logits, rows, attribution), or only a stage that reads it does
  (data, deploy, plan, quantize: a cell whose logits are cached is never quantized again);
- its cached record, where it has one: ``cache`` (the folder under ``out_dir/cache``) and
  ``keys(ctx, item)`` (the keys of the entries it writes there for the item, from
  :mod:`quantcal.study.keys`);
- ``run(ctx, item, need)``: compute (or read from its cache) its output; ``need(name, other)``
  gives the output of a declared stage for this item (or ``other``);
- ``failed(ctx, cells, exc)``: what a failure means for the cells it leaves without a result
  (error rows, a recorded failure) and whether their later stages still run;
- ``prepare(ctx, outputs, group, cells)``: work done for a whole group before its cells (the
  quantize stage trains the cells of a training method with every rank under torchrun).

Outputs are memoised per group in :class:`Outputs`: each stage runs at most once per item, and a
failure is remembered and raised again to every later reader.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:  # pragma: no cover
    from quantcal.study.context import Context

__all__ = ["Need", "Outputs", "Stage"]

#: ``need(name, other=None)``: the output of stage ``name`` for the reader's item (or ``other``).
Need = Callable[..., Any]


class Stage(abc.ABC):
    """One step of the study; subclasses set the class attributes and :meth:`run`."""

    name: ClassVar[str] = ""
    scope: ClassVar[str] = "cell"  # "group" or "cell"
    reads: ClassVar[tuple[str, ...]] = ()
    eager: ClassVar[bool] = False
    cache: ClassVar[str | None] = None  # the folder of its records under out_dir/cache

    def keys(self, ctx: Context, item: Any) -> list[str]:
        """The cache keys of the records it writes for ``item`` (none when not cached)."""
        return []

    def applies(self, ctx: Context, item: Any) -> bool:
        """Whether the stage runs for ``item`` (every item unless a subclass says otherwise)."""
        return True

    @abc.abstractmethod
    def run(self, ctx: Context, item: Any, need: Need) -> Any:
        """The stage's output for ``item`` (a group or a cell), computed or read from its
        cache; ``need(name, other=None)`` gives the output of a stage it ``reads``."""

    def failed(self, ctx: Context, cells: list[Any], exc: BaseException) -> bool:
        """Record a failure of this stage that leaves ``cells`` without its result (one cell, or
        every cell of a group whose shared stage failed); True lets their later stages run.
        By default the failure is not expected: raised to the caller."""
        raise exc

    def prepare(self, ctx: Context, outputs: Outputs, group: Any, cells: list[Any]) -> None:
        """Work for a whole group before its cells' stages run (none by default)."""
        return None


class Outputs:
    """The outputs of one training group's stages, each computed on first need."""

    def __init__(self, ctx: Context, stages: Mapping[str, Stage]):
        self.ctx = ctx
        self.stages = stages
        self._memo: dict[tuple[str, Any], tuple[bool, Any]] = {}

    def _item(self, stage: Stage, item: Any) -> Any:
        return getattr(item, "group", item) if stage.scope == "group" else item

    def get(self, name: str, item: Any, *, reader: Stage | None = None) -> Any:
        """Stage ``name``'s output for ``item`` (a group-scope stage's for the item's group)."""
        if reader is not None and name not in reader.reads:
            raise RuntimeError(
                f"stage {reader.name!r} reads {name!r} but does not declare it in its reads "
                f"{reader.reads}: add it there"
            )
        stage = self.stages[name]
        key = (name, self._item(stage, item))
        if key not in self._memo:
            try:
                value = stage.run(self.ctx, key[1], self._needer(stage, key[1]))
            except Exception as exc:
                self._memo[key] = (False, exc)
                raise
            self._memo[key] = (True, value)
        ok, value = self._memo[key]
        if not ok:
            raise value
        return value

    def put(self, name: str, item: Any, value: Any) -> None:
        """Give stage ``name`` its output for ``item`` computed elsewhere (an exception: its
        failure), e.g. by every rank together under torchrun."""
        ok = not isinstance(value, BaseException)
        self._memo[(name, self._item(self.stages[name], item))] = (ok, value)

    def forget(self, item: Any) -> None:
        """Drop the outputs of a finished cell (its quantized model) to free memory."""
        for key in [k for k in self._memo if k[1] == item]:
            del self._memo[key]

    def _needer(self, stage: Stage, item: Any) -> Need:
        def need(name: str, other: Any = None) -> Any:
            return self.get(name, item if other is None else other, reader=stage)

        return need
