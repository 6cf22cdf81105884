"""Drawing helpers shared by the public plotting functions and the report (matplotlib, imported
when called, never at import time)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["FULL_COUNT", "MIN_ALPHA", "bin_alpha", "draw_reliability"]

OVER = "tab:red"  # confidence above accuracy
UNDER = "tab:blue"  # confidence below accuracy
#: A reliability bin is drawn fully opaque from this many images; below, its opacity falls with
#: its count (``count / FULL_COUNT``), down to :data:`MIN_ALPHA` for a bin of one or two images.
FULL_COUNT = 20
MIN_ALPHA = 0.15


def bin_alpha(count: float, full: float = FULL_COUNT) -> float:
    """The opacity of a reliability bin of ``count`` images: ``count / full`` clipped to
    ``[MIN_ALPHA, 1]`` (0 for an empty bin), so a bin whose gap hardly counts in ECE does not
    look like one that does."""
    if not count or count <= 0:
        return 0.0
    return min(1.0, max(MIN_ALPHA, float(count) / full))


def draw_reliability(
    ax: Any,
    edges: Sequence[float],
    count: Sequence[float],
    confidence: Sequence[float | None],
    accuracy: Sequence[float | None],
    *,
    title: str | None = None,
    legend: bool = True,
    full_count: float = FULL_COUNT,
) -> Any:
    """A reliability diagram on ``ax`` from binned data (see ``metrics.Reliability``).

    Grey bars: each bin's accuracy. From the top of each bar to the bin's mean confidence, a red
    band where the model is over-confident (confidence above accuracy) and a blue one where it
    is under-confident. A bin is drawn as opaque as its weight allows: fully from
    ``full_count`` images (:data:`FULL_COUNT`), fainter below (:func:`bin_alpha`), so a bin of
    one or two images, whose gap hardly counts in ECE, is barely visible. The number at the
    foot of each bin is its image count, and the dotted step line each bin's share of the
    images. Empty bins are left blank."""
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
    alpha = [bin_alpha(count[i], full_count) for i in have]
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--", label="perfect calibration")
    bars = ax.bar(
        left, acc, width=w, align="edge", color="0.75", edgecolor="k", lw=0.3, label="accuracy"
    )
    for bar, a in zip(bars, alpha):
        bar.set_alpha(a)
    for sign, color, name in ((1, OVER, "over-confident gap"), (-1, UNDER, "under-confident gap")):
        idx = [k for k in range(len(have)) if sign * (conf[k] - acc[k]) > 0]
        gaps = ax.bar(
            [left[k] for k in idx],
            [conf[k] - acc[k] for k in idx],
            bottom=[acc[k] for k in idx],
            width=[w[k] for k in idx],
            align="edge",
            color=color,
            alpha=0.45,
            label=name,
        )
        for bar, k in zip(gaps, idx):
            bar.set_alpha(0.45 * alpha[k])
    ax.step(
        list(edges),
        [c / total for c in count] + [0.0],
        where="post",
        color="black",
        lw=0.9,
        ls=":",
        label="share of images",
    )
    if n <= 30:  # the count of each non-empty bin at its foot
        for i in range(n):
            if count[i]:
                ax.text(
                    edges[i] + width[i] / 2,
                    0.015,
                    f"{int(count[i])}",
                    rotation=90,
                    ha="center",
                    va="bottom",
                    fontsize=5,
                    color="0.25" if count[i] >= full_count else "tab:purple",
                    gid="bin-count",
                )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence", fontsize=8)
    ax.set_ylabel("accuracy / share of images", fontsize=8)
    ax.tick_params(labelsize=7)
    if title:
        ax.set_title(title, fontsize=8)
    if legend:
        leg = ax.legend(fontsize=6, loc="upper left", frameon=False)
        for handle, text in zip(leg.legend_handles, leg.get_texts()):
            if text.get_text().endswith("gap"):  # a faint first bin must not fade its key
                handle.set_alpha(0.45)
            elif text.get_text() == "accuracy":
                handle.set_alpha(1.0)
    return ax
