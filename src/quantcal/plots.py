"""Drawing helpers shared by the public plotting functions and the report (matplotlib, imported
when called, never at import time)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["draw_reliability"]

OVER = "tab:red"  # confidence above accuracy
UNDER = "tab:blue"  # confidence below accuracy


def draw_reliability(
    ax: Any,
    edges: Sequence[float],
    count: Sequence[float],
    confidence: Sequence[float | None],
    accuracy: Sequence[float | None],
    *,
    title: str | None = None,
    legend: bool = True,
) -> Any:
    """A reliability diagram on ``ax`` from binned data (see ``metrics.Reliability``).

    Grey bars: each bin's accuracy. From the top of each bar to the bin's mean confidence, a red
    band where the model is over-confident (confidence above accuracy) and a blue one where it
    is under-confident. The dotted step line is each bin's share of the images (a near-empty bin
    can show a large gap that hardly counts in ECE). Empty bins are left blank."""
    n = len(count)
    width = [edges[i + 1] - edges[i] for i in range(n)]
    total = max(1.0, float(sum(count)))
    have = [
        i for i in range(n) if count[i] and accuracy[i] is not None and accuracy[i] == accuracy[i]
    ]
    acc = [float(accuracy[i]) for i in have]
    conf = [float(confidence[i]) for i in have]
    left = [edges[i] for i in have]
    w = [width[i] for i in have]
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--", label="perfect calibration")
    ax.bar(left, acc, width=w, align="edge", color="0.75", edgecolor="k", lw=0.3, label="accuracy")
    for sign, color, name in ((1, OVER, "over-confident gap"), (-1, UNDER, "under-confident gap")):
        idx = [k for k in range(len(have)) if sign * (conf[k] - acc[k]) > 0]
        ax.bar(
            [left[k] for k in idx],
            [conf[k] - acc[k] for k in idx],
            bottom=[acc[k] for k in idx],
            width=[w[k] for k in idx],
            align="edge",
            color=color,
            alpha=0.45,
            label=name,
        )
    ax.step(
        list(edges),
        [c / total for c in count] + [0.0],
        where="post",
        color="black",
        lw=0.9,
        ls=":",
        label="share of images",
    )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence", fontsize=8)
    ax.set_ylabel("accuracy / share of images", fontsize=8)
    ax.tick_params(labelsize=7)
    if title:
        ax.set_title(title, fontsize=8)
    if legend:
        ax.legend(fontsize=6, loc="upper left", frameon=False)
    return ax
