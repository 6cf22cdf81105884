"""The timing harness of the bench scripts: contenders interleaved, medians reported."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    """(seconds, result) of one call."""
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def race(
    contenders: dict[str, Callable[[], object]], repeats: int, *, warmup: bool = False
) -> dict[str, tuple[float, object]]:
    """Median seconds and last value per contender, calls interleaved round-robin (so a noisy
    neighbour slows every contender alike); ``warmup`` first calls each once untimed (imports,
    caches)."""
    times: dict[str, list[float]] = {k: [] for k in contenders}
    values: dict[str, object] = {}
    if warmup:
        for fn in contenders.values():
            fn()
    for _ in range(repeats):
        for name, fn in contenders.items():
            dt, values[name] = timed(fn)
            times[name].append(dt)
    return {k: (statistics.median(v), values[k]) for k, v in times.items()}
