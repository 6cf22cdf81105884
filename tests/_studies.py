"""The smallest real study: one tiny ShuffleNetV2 trained one epoch on digits, fp32 and W8A8,
twenty bootstrap resamples. Tests that need a finished run build on it."""

from __future__ import annotations

from typing import Any

TINY: dict[str, Any] = {
    "name": "tiny",
    "seeds": [0],
    "threads": 1,
    "data": {"datasets": ["digits"]},
    "model": [{"arch": "shufflenetv2", "width": 0.1}],
    "train": {"epochs": 1, "batch_size": 128, "lr": 0.05},
    "quant": {"precisions": ["fp32", "W8A8"], "observers": ["minmax"]},
    "recal": {"methods": ["none", "temperature"]},
    "metrics": {"bootstrap": 20},
}


def tiny(**changes: Any) -> dict[str, Any]:
    """A copy of :data:`TINY` with dotted keys changed (``tiny(**{"quant.precisions": [...]})``,
    ``tiny(name="other")``)."""
    cfg = {k: (dict(v) if isinstance(v, dict) else v) for k, v in TINY.items()}
    for dotted, value in changes.items():
        section, _, key = dotted.rpartition(".")
        (cfg[section] if section else cfg)[key] = value
    return cfg
