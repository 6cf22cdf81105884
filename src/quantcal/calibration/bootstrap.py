"""Bootstrap intervals of the metrics over the test samples (Efron & Tibshirani 1993).

:func:`bootstrap_ci` gives a percentile interval of one model's metric;
:func:`paired_bootstrap_diff` and :func:`paired_bootstrap_contrast` score several models on the
same resampled rows, so the shared sampling noise of the test set cancels. Named metrics
(:func:`bootstrap_metric_names`) are reduced once to per-sample data and scored on many
resamples at once; any ``callable(logits, labels)`` runs in a loop over the same resamples.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch

from quantcal._registry import unknown_name_message
from quantcal.calibration.binning import (
    bin_width,
    ce_from_sums,
    conf_groups,
    debiased_sq_from_sums,
    mass_bins_of_groups,
)
from quantcal.calibration.checks import ArrayLike, check_n_bins, validate
from quantcal.calibration.rows import softmax_rows, top_label
from quantcal.calibration.scores import classwise_ece

MetricFn = Callable[[torch.Tensor, torch.Tensor], float]

__all__ = [
    "MetricFn",
    "bootstrap_ci",
    "bootstrap_metric_names",
    "paired_bootstrap_contrast",
    "paired_bootstrap_diff",
]


def _index_blocks(n: int, n_resamples: int, seed: int) -> Iterator[np.ndarray]:
    """Resample row indices, ``(b, n)`` int64 blocks; same (n, n_resamples, seed), same rows.

    Drawn from one ``numpy.random.default_rng(seed)`` block after block (about 2**22 indices a
    block, so memory stays bounded whatever N is). The named fast path and the callable loop
    use the same blocks, so both see identical resamples.
    """
    rng = np.random.default_rng(int(seed))
    block = max(1, min(n_resamples, (1 << 22) // n))
    done = 0
    while done < n_resamples:
        b = min(block, n_resamples - done)
        yield rng.integers(0, n, size=(b, n), dtype=np.int64)
        done += b


def _bootstrap_indices(n: int, n_resamples: int, seed: int) -> np.ndarray:
    """All resample indices ``(n_resamples, n)`` at once (for tests and small inputs)."""
    return np.concatenate(list(_index_blocks(n, n_resamples, seed)))


class _FastMetric:
    """A named metric reduced once to per-sample numpy data, then scored on many resamples.

    ``mean`` metrics (accuracy, mean_confidence, nll, brier) average a per-sample value;
    width-binned ones (ece, mce, ece_l2, debiased_ece) keep each sample's ``2·bin + hit`` code
    and confidence, so a block of resamples costs two gathers and two ``np.bincount`` calls;
    ``adaptive_ece`` keeps each sample's tie-group and re-forms the equal-mass bins per resample.
    """

    def __init__(self, name: str, z: torch.Tensor, y: torch.Tensor, n_bins: int) -> None:
        self.name = name
        self.n_bins = n_bins
        self.n = int(y.shape[0])
        self.values: np.ndarray | None = None
        if name in ("nll", "brier"):
            rows = softmax_rows(z, y, None)
            self.values = (rows.nll if name == "nll" else rows.brier).cpu().numpy()
            return
        conf, correct = top_label(z, y)
        if name in ("accuracy", "mean_confidence"):
            chosen = correct if name == "accuracy" else conf
            self.values = chosen.double().cpu().numpy()
        elif name in ("aurc", "excess_aurc"):
            group, counts = conf_groups(conf)
            self.n_groups = int(counts.shape[0])
            rank = (self.n_groups - 1 - group).cpu().numpy()  # tie block, most confident 0
            self.code = rank * 2 + (~correct).long().cpu().numpy()  # 2·block + wrong
            self.harmonic = np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, self.n + 1))])
        elif name == "adaptive_ece":
            group, counts = conf_groups(conf)
            self.n_groups = int(counts.shape[0])
            self.code = (group * 2 + correct.long()).cpu().numpy()
            group_conf = torch.zeros(self.n_groups, dtype=torch.float64, device=z.device)
            group_conf[group] = conf.double()
            self.group_conf = group_conf.cpu().numpy()
        else:
            self.code = (bin_width(conf, n_bins) * 2 + correct.long()).cpu().numpy()
            self.conf = conf.double().cpu().numpy()

    def full(self) -> float:
        return float(self.on(np.arange(self.n)[None, :])[0])

    def on(self, idx: np.ndarray) -> np.ndarray:
        """Metric value for every resample row of ``idx`` ``(R, N)``: ``(R,)`` float64."""
        if self.values is not None:
            return self.values[idx].mean(axis=1)
        if self.name == "adaptive_ece":
            return self._adaptive(idx)
        if self.name in ("aurc", "excess_aurc"):
            return self._aurc(idx)
        r, b = idx.shape[0], self.n_bins
        key = self.code[idx]
        key += (np.arange(r, dtype=np.int64) * (2 * b))[:, None]
        by_hit = np.bincount(key.ravel(), minlength=2 * r * b).reshape(r, b, 2)
        count = torch.from_numpy(by_hit.sum(axis=2).astype(np.float64))
        s_hit = torch.from_numpy(by_hit[:, :, 1].astype(np.float64))
        key >>= 1  # (row·2B + 2·bin + hit) // 2 = row·B + bin
        s_conf = np.bincount(key.ravel(), weights=self.conf[idx].ravel(), minlength=r * b)
        s_conf = torch.from_numpy(s_conf.reshape(r, b))
        if self.name == "debiased_ece":
            out = debiased_sq_from_sums(count, s_conf, s_hit).clamp(min=0.0).sqrt()
        else:
            norm = {"ece": "l1", "mce": "max", "ece_l2": "l2"}[self.name]
            out = ce_from_sums(count, s_conf, s_hit, norm)
        return out.numpy()

    def _aurc(self, idx: np.ndarray) -> np.ndarray:
        """AURC with ties averaged (``quantcal.calibration.selective.aurc``) of every resample.

        A resample repeats samples, and repeats are ties, so it is the full data's tie blocks
        with counts ``w_b`` and errors ``e_b``: with ``C_b`` samples up to block b and ``E_b``
        errors, block b adds ``Σ_{k=C_{b-1}+1}^{C_b} (E_{b-1} + e_b (k - C_{b-1}) / w_b) / k
        = E_{b-1} ΔH + (e_b / w_b)(w_b - C_{b-1} ΔH)``, ``ΔH = H(C_b) - H(C_{b-1})`` from
        harmonic numbers. ``excess_aurc`` subtracts the perfect ranking's
        ``((N - R) - R (H(N) - H(R))) / N`` with R right predictions in the resample."""
        r, g, n = idx.shape[0], self.n_groups, self.n
        key = self.code[idx]
        key += (np.arange(r, dtype=np.int64) * (2 * g))[:, None]
        both = np.bincount(key.ravel(), minlength=2 * r * g).reshape(r, g, 2)
        e = both[:, :, 1]
        w = both[:, :, 0] + e
        upto = np.cumsum(w, axis=1)
        before = upto - w
        dh = self.harmonic[upto] - self.harmonic[before]
        errors_before = np.cumsum(e, axis=1) - e
        # Σ_b [E_{b-1} ΔH + e_b − (e_b / w_b) C_{b-1} ΔH]; an empty block adds nothing
        frac = e / np.maximum(w, 1)
        wrong = e.sum(axis=1)
        out = ((errors_before - frac * before) * dh).sum(axis=1) + wrong
        out /= n
        if self.name == "excess_aurc":
            right = n - wrong
            out -= ((n - right) - right * (self.harmonic[n] - self.harmonic[right])) / n
        return out

    def _adaptive(self, idx: np.ndarray) -> np.ndarray:
        r, g, b = idx.shape[0], self.n_groups, self.n_bins
        key = self.code[idx]
        key += (np.arange(r, dtype=np.int64) * (2 * g))[:, None]
        by_hit = np.bincount(key.ravel(), minlength=2 * r * g).reshape(r, g, 2)
        g_count = by_hit.sum(axis=2).astype(np.float64)
        bins = mass_bins_of_groups(torch.from_numpy(g_count), b).numpy()  # (R, G)
        bkey = (bins + (np.arange(r, dtype=np.int64) * b)[:, None]).ravel()
        count = np.bincount(bkey, weights=g_count.ravel(), minlength=r * b)
        s_conf = np.bincount(bkey, weights=(g_count * self.group_conf).ravel(), minlength=r * b)
        s_hit = np.bincount(bkey, weights=by_hit[:, :, 1].ravel(), minlength=r * b)
        sums = [torch.from_numpy(a.reshape(r, b)) for a in (count, s_conf, s_hit)]
        return ce_from_sums(*sums, "l1").numpy()


_FAST_NAMES = (
    "accuracy",
    "adaptive_ece",
    "aurc",
    "brier",
    "debiased_ece",
    "ece",
    "ece_l2",
    "excess_aurc",
    "mce",
    "mean_confidence",
    "nll",
)
_LOOP_NAMES = {"classwise_ece": classwise_ece}


def bootstrap_metric_names() -> list[str]:
    """Metric names accepted by ``bootstrap_ci`` / ``paired_bootstrap_diff``."""
    return sorted((*_FAST_NAMES, *_LOOP_NAMES))


def _resolve_metric(metric: str | MetricFn, n_bins: int) -> tuple[str | None, MetricFn | None]:
    if callable(metric):
        return None, metric
    if not isinstance(metric, str):
        raise TypeError(f"metric must be a name or a callable(logits, labels), got {metric!r}.")
    if metric in _FAST_NAMES:
        return metric, None
    if metric in _LOOP_NAMES:
        fn = _LOOP_NAMES[metric]
        return None, lambda z, y: fn(z, y, n_bins=n_bins)
    raise ValueError(unknown_name_message("metric", metric, bootstrap_metric_names()))


def _check_bootstrap_args(n_resamples: int, level: float) -> None:
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, (int, np.integer)):
        raise TypeError(f"n_resamples must be an int >= 1, got {n_resamples!r}.")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}; 1000 is typical.")
    if not 0.0 < float(level) < 1.0:
        raise ValueError(f"level must lie strictly between 0 and 1, got {level}; e.g. 0.95.")


def _replicates(
    metric: str | MetricFn,
    logits_list: list[torch.Tensor],
    y: torch.Tensor,
    n_resamples: int,
    seed: int,
    n_bins: int,
) -> tuple[list[float], np.ndarray]:
    """Point estimates and ``(R, len(logits_list))`` replicates on shared resample indices."""
    name, fn = _resolve_metric(metric, n_bins)
    n = y.shape[0]
    if name is not None:
        fast = [_FastMetric(name, z, y, n_bins) for z in logits_list]
        points = [f.full() for f in fast]
        reps = [
            np.stack([f.on(idx) for f in fast], axis=1)
            for idx in _index_blocks(n, n_resamples, seed)
        ]
        return points, np.concatenate(reps)
    points = [float(fn(z, y)) for z in logits_list]
    out = np.empty((n_resamples, len(logits_list)), dtype=np.float64)
    row = 0
    for block in _index_blocks(n, n_resamples, seed):
        for idx in torch.from_numpy(block).to(y.device):
            out[row] = [float(fn(z[idx], y[idx])) for z in logits_list]
            row += 1
    return points, out


def _percentile(values: np.ndarray, level: float) -> tuple[float, float]:
    alpha = (1.0 - float(level)) / 2.0
    lo, hi = np.quantile(values, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def bootstrap_ci(
    metric: str | MetricFn,
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    n_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    n_bins: int = 15,
) -> tuple[float, float]:
    """Percentile bootstrap interval (Efron & Tibshirani 1993) of ``metric`` over test samples.

    ``metric`` is a name from ``bootstrap_metric_names()`` (vectorised: per-sample bins,
    confidences and hits are computed once, each resample is a batched bincount; equal-mass bins
    are re-formed on every resample) or any ``callable(logits, labels) -> float`` (a loop over
    the same resample indices). Returns the ``(1 − level)/2`` and ``(1 + level)/2`` quantiles.
    Note: binned ECE is biased upward, so for a nearly calibrated model the interval can sit
    above the point estimate; see ``debiased_ece``.
    """
    _check_bootstrap_args(n_resamples, level)
    n_bins = check_n_bins(n_bins)
    z, y = validate(logits, labels)
    _, reps = _replicates(metric, [z], y, int(n_resamples), seed, n_bins)
    return _percentile(reps[:, 0], level)


def paired_bootstrap_diff(
    metric: str | MetricFn,
    logits_a: ArrayLike,
    logits_b: ArrayLike,
    labels: ArrayLike,
    *,
    n_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    n_bins: int = 15,
) -> tuple[float, float, float]:
    """Paired bootstrap of ``metric(a) − metric(b)`` for two models scored on the same samples.

    Every resample draws one set of row indices and scores both models on it, so the shared
    sampling noise of the test set cancels. Returns ``(estimate, lo, hi)``: the difference on
    the full data and the percentile interval of the resampled differences (exactly
    ``(0, 0, 0)`` when ``logits_a`` and ``logits_b`` are equal).
    """
    return paired_bootstrap_contrast(
        metric,
        [logits_a, logits_b],
        [1.0, -1.0],
        labels,
        n_resamples=n_resamples,
        level=level,
        seed=seed,
        n_bins=n_bins,
    )


def paired_bootstrap_contrast(
    metric: str | MetricFn,
    logits: list[ArrayLike],
    weights: list[float],
    labels: ArrayLike,
    *,
    n_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    n_bins: int = 15,
) -> tuple[float, float, float]:
    """Paired bootstrap of the contrast ``Σ_k w_k · metric(logits_k)`` over models scored on the
    same samples, e.g. a difference of differences ``[ECE(vq) − ECE(vf)] − [ECE(bq) − ECE(bf)]``
    (weights ``[1, -1, -1, 1]``): how much more variant v's ECE rises under quantization than
    base b's. One set of resampled rows scores every model, so the shared sampling noise of the
    test set cancels (Efron & Tibshirani 1993, ch. 16). Returns ``(estimate, lo, hi)``: the
    contrast on the full data and the percentile interval of the resampled contrasts."""
    _check_bootstrap_args(n_resamples, level)
    n_bins = check_n_bins(n_bins)
    if len(logits) != len(weights) or not logits:
        raise ValueError(
            f"need one weight per logits tensor, got {len(logits)} logits and {len(weights)} "
            "weights"
        )
    first, y = validate(logits[0], labels)
    zs = [first]
    for i, z in enumerate(logits[1:], start=1):
        zi, _ = validate(z, labels)
        if zi.shape != first.shape:
            raise ValueError(
                f"every logits tensor must have the same shape (same samples, same classes); "
                f"logits[0] is {tuple(first.shape)}, logits[{i}] is {tuple(zi.shape)}."
            )
        zs.append(zi.to(first.device))
    w = np.asarray(weights, dtype=np.float64)
    points, reps = _replicates(metric, zs, y, int(n_resamples), seed, n_bins)
    lo, hi = _percentile(reps @ w, level)
    return float(np.dot(points, w)), lo, hi
