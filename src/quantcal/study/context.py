"""What every stage of one study run shares: the configuration, the run folder and its cache,
the device, the progress log, the failures so far, and memos that outlive one training group
(a dataset's splits, the recalibrators' fp32 fits).

It also answers, for a finished run's assembly and for the contrasts of the ablation and repair
families, where a group's cached entries are (:meth:`train_key`, :meth:`cached_logits`,
:meth:`attribution_path`) and which images its stages read (:meth:`stage_images`,
:meth:`recal_fit`, :meth:`report_fold`), by asking the stage that owns each.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from quantcal.store.cache import Cache
from quantcal.store.digest import FileDigests
from quantcal.study.cells import Group, QuantCell
from quantcal.study.config import StudyConfig

__all__ = ["Context"]


class Context:
    """State shared by a study run's stages (thin: the stages compute, this remembers)."""

    def __init__(
        self,
        config: StudyConfig,
        out_dir: Path,
        device: str,
        quiet: bool,
        log: Callable[[str], None],
        *,
        assembling: bool = False,
    ):
        self.config = config
        self.out = out_dir
        self.cache = out_dir / "cache"
        self.device = device
        self.quiet = quiet
        self.log = log
        #: When only assembling cached rows, a data file or checkpoint that has since moved away
        #: is identified by the digest recorded when it was used.
        self.assembling = assembling
        self.store = Cache(self.cache, log)
        self.digests = FileDigests(self.cache / "digests.json")
        self.failures: list[dict[str, Any]] = []
        self.attribution_errors: list[dict[str, str]] = []
        self.scored = 0  # rows computed (not read from the cache) by this run
        #: Notes for every row when the study's pinned instruction set did not hold.
        self.isa_notes: list[str] = []
        self._t0 = time.perf_counter()
        self._memos: dict[str, dict[Any, Any]] = {}

    def say(self, message: str) -> None:
        """A progress line with the run's elapsed time (stderr; one line, no terminal needed)."""
        s = int(time.perf_counter() - self._t0)
        self.log(f"[{s // 60:>3}:{s % 60:02d}] {message}")

    def memo(self, name: str) -> dict[Any, Any]:
        """A memo named ``name`` that lives as long as the run (a stage's, across groups)."""
        return self._memos.setdefault(name, {})

    def file_digest(self, path: str) -> str:
        """SHA-256 of a file (memoised by size and mtime); when assembling, the digest last
        recorded for a file that is gone."""
        try:
            return self.digests(path)
        except FileNotFoundError:
            known = self.digests.last_known(path) if self.assembling else None
            if known is None:
                raise
            return known

    # -- where a group's entries are, asked of the stage that owns each -----------------------
    def train_key(self, g: Group) -> str:
        from quantcal.study.stages import train

        return train.key(self, g)

    def stage_images(self, g: Group):
        from quantcal.study.stages import data

        return data.stage_images(self, g)

    def recal_fit(self, g: Group) -> tuple[str, list[str]]:
        from quantcal.study.stages import data

        return data.recal_fit(self, g)

    def report_fold(self, cell: QuantCell, labels) -> tuple[Any, Any] | None:
        from quantcal.study.stages import data

        return data.report_fold(self, cell, labels)

    def cached_logits(self, cell: QuantCell, train_key: str) -> dict | None:
        from quantcal.study.stages import logits

        return logits.cached(self, cell, train_key)

    def attribution_path(self, cell: QuantCell, train_key: str) -> Path:
        from quantcal.study.stages import attribution

        return attribution.path(self, cell, train_key)
