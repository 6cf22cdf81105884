"""The reliability diagram: per-bin counts, mean confidence and accuracy
(:class:`Reliability`, equal-width bins) and its matplotlib drawing (:func:`plot_reliability`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from quantcal.calibration.binning import bin_sums, bin_width
from quantcal.calibration.checks import ArrayLike, check_n_bins, validate
from quantcal.calibration.rows import top_label
from quantcal.calibration.scores import ece

__all__ = ["Reliability", "plot_reliability", "reliability"]


@dataclass(frozen=True)
class Reliability:
    """Data behind a reliability diagram (equal-width bins, module conventions).

    ``edges`` (B+1,) are ``i/B``; ``count`` (B,) samples per bin; ``confidence`` and
    ``accuracy`` (B,) the bin means (NaN for empty bins).
    """

    edges: np.ndarray
    count: np.ndarray
    confidence: np.ndarray
    accuracy: np.ndarray

    @property
    def n_bins(self) -> int:
        return int(self.count.shape[0])


def reliability(logits: ArrayLike, labels: ArrayLike, *, n_bins: int = 15) -> Reliability:
    """Per-bin counts, mean confidence and accuracy for a reliability diagram."""
    n_bins = check_n_bins(n_bins)
    z, y = validate(logits, labels)
    conf, correct = top_label(z, y)
    sums = bin_sums(bin_width(conf, n_bins), conf, correct, n_bins).cpu().numpy()
    count = sums[0]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.where(count > 0, sums[1] / count, np.nan)
        mean_acc = np.where(count > 0, sums[2] / count, np.nan)
    edges = np.arange(n_bins + 1, dtype=np.float64) / n_bins
    return Reliability(edges, count.astype(np.int64), mean_conf, mean_acc)


def plot_reliability(
    logits: ArrayLike,
    labels: ArrayLike,
    ax: Any = None,
    *,
    n_bins: int = 15,
    title: str | None = None,
    legend: bool = True,
) -> Any:
    """Draw the reliability diagram of ``logits`` on a matplotlib ``ax`` (a new figure's when
    None) and return the axes: per-bin accuracy bars, the gap to the bin's mean confidence in
    red (over-confident) or blue (under-confident), each bin's share of the images as a dotted
    step, axis labels and a legend. The title defaults to the ECE. Bins as :func:`reliability`."""
    from quantcal.report.plots import draw_reliability

    rel = reliability(logits, labels, n_bins=n_bins)
    if ax is None:
        import matplotlib.pyplot as plt

        _, ax = plt.subplots(figsize=(3.6, 3.4), constrained_layout=True)
    if title is None:
        title = f"ECE {100 * ece(logits, labels, n_bins=n_bins):.2f} %"
    acc = [None if a != a else float(a) for a in rel.accuracy]
    conf = [None if c != c else float(c) for c in rel.confidence]
    return draw_reliability(
        ax, list(rel.edges), list(rel.count), conf, acc, title=title, legend=legend
    )
