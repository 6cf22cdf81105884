"""quantcal: calibration error of quantized efficient CNNs.

When I quantize this network, can I still trust its confidence, and how do I repair it if not?
Reproduces and extends Kuang & Wong, "On Calibration of Modern Quantized Efficient Neural
Networks" (arXiv 2309.13866).

Importing this package does no work: the sub-modules load on first attribute access, so
``import quantcal`` is cheap and ``from quantcal import metrics`` loads only the metrics.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_SUBMODULES = ("data", "metrics", "models", "quant", "recal", "report", "study", "train")
#: Functions at the top level, each loaded from its module on first access.
_FUNCTIONS = {"verdict": "quantcal.study.evaluate"}
__all__ = ["__version__", *_SUBMODULES, *_FUNCTIONS]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from quantcal import data, metrics, models, quant, recal, report, study, train  # noqa: F401
    from quantcal.study.evaluate import verdict  # noqa: F401


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"quantcal.{name}")
    if name in _FUNCTIONS:
        return getattr(importlib.import_module(_FUNCTIONS[name]), name)
    raise AttributeError(f"module 'quantcal' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
