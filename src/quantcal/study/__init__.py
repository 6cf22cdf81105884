"""The study: configuration, cells, the pipeline of stages, their keys and the runner.

``run_study(config_or_path, out_dir)`` runs (or finishes) a study; ``docs/architecture.md``
draws the stages and says where each kind of extension goes. Importing this package does no
work: the runner's public names (``quantcal.study.runner.__all__``) load on first access, so a
module that needs only ``quantcal.study.config`` or ``quantcal.study.keys`` does not import the
runner and everything it orders.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: The names this package gives, each from ``quantcal.study.runner``.
__all__ = [
    "RESULT_COLUMNS",
    "Group",
    "QuantCell",
    "StudyConfig",
    "assemble",
    "build_model",
    "environment_record",
    "expand_cells",
    "failed_attributions",
    "failed_rows",
    "import_factory",
    "iter_rows",
    "load_study",
    "load_weights",
    "open_run",
    "parse_shard",
    "recalibrated_test_logits",
    "resolve_device",
    "run_group",
    "run_study",
]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from quantcal.study.runner import *  # noqa: F403

# ruff: noqa: F405 - the names of __all__ are the runner's (loaded on first access)


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("quantcal.study.runner"), name)
    raise AttributeError(f"module 'quantcal.study' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
