"""Independent numpy re-derivations of the calibration metrics, written for clarity, not speed.

They share no code with ``quantcal.metrics``: bins come from ``np.searchsorted`` on the edges
``i/B`` instead of the ceil rule, equal-mass bins from ``np.unique`` and an explicit loop.
"""

from __future__ import annotations

import numpy as np


def softmax(logits) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def top_label(logits) -> tuple[np.ndarray, np.ndarray]:
    p = softmax(logits)
    return p.max(axis=1), p.argmax(axis=1)


def width_bins(conf: np.ndarray, n_bins: int, convention: str = "right") -> np.ndarray:
    """Bin index per confidence.

    ``right``: (lo, hi] bins, 0 in the first (quantcal). ``left``: [lo, hi) bins with 1.0 in the
    last (netcal, via np.histogramdd). ``torchmetrics``: [lo, hi) bins plus a hidden extra bin
    ``B`` that holds exactly 1.0 (torchmetrics issue #3510).
    """
    edges = np.arange(n_bins + 1) / n_bins
    if convention == "right":
        return np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    idx = np.searchsorted(edges, conf, side="right") - 1
    if convention == "left":
        return np.clip(idx, 0, n_bins - 1)
    return idx  # torchmetrics: 1.0 -> n_bins


def mass_bins(conf: np.ndarray, n_bins: int) -> np.ndarray:
    """Tie groups placed by mid-rank: cumulative count S, size n -> bin floor(B(S - n/2)/N)."""
    values, inverse, counts = np.unique(conf, return_inverse=True, return_counts=True)
    n = conf.shape[0]
    group_bin = np.empty(values.shape[0], dtype=np.int64)
    seen = 0
    for g, cnt in enumerate(counts):
        mid = seen + cnt / 2.0
        group_bin[g] = min(n_bins - 1, int(np.floor(n_bins * mid / n)))
        seen += cnt
    return group_bin[inverse.reshape(-1)]


def binned_error(conf, correct, idx, n_bins_total: int, norm: str = "l1") -> float:
    n = conf.shape[0]
    total, worst, sq = 0.0, 0.0, 0.0
    for b in range(n_bins_total):
        m = idx == b
        if not m.any():
            continue
        gap = abs(correct[m].mean() - conf[m].mean())
        total += m.sum() / n * gap
        sq += m.sum() / n * gap**2
        worst = max(worst, gap)
    return {"l1": total, "l2": np.sqrt(sq), "max": worst}[norm]


def ece(logits, labels, n_bins=15, norm="l1", binning="width", convention="right") -> float:
    conf, pred = top_label(logits)
    correct = (pred == np.asarray(labels)).astype(np.float64)
    if binning == "mass":
        idx = mass_bins(conf, n_bins)
    else:
        idx = width_bins(conf, n_bins, convention)
    return binned_error(conf, correct, idx, n_bins + 1, norm)


def debiased_ece_sq(logits, labels, n_bins=15) -> float:
    """Kumar et al. 2019 ``unbiased_l2_ce`` (before its sqrt), on (lo, hi] width bins."""
    conf, pred = top_label(logits)
    correct = (pred == np.asarray(labels)).astype(np.float64)
    return debiased_sq_of_bins(conf, correct, width_bins(conf, n_bins), n_bins)


def debiased_sq_of_bins(conf, correct, idx, n_bins) -> float:
    """``Σ_b (n_b/N)·((conf_b − acc_b)² − acc_b(1 − acc_b)/(n_b − 1))`` over bins of ≥ 2 samples,
    for any bin assignment ``idx`` (Kumar et al. 2019)."""
    n, out = conf.shape[0], 0.0
    for b in range(n_bins):
        m = idx == b
        k = int(m.sum())
        if k < 2:
            continue
        acc = correct[m].mean()
        out += k / n * ((conf[m].mean() - acc) ** 2 - acc * (1 - acc) / (k - 1))
    return out


def classwise_ece(logits, labels, n_bins=15) -> float:
    p = softmax(logits)
    c = p.shape[1]
    labels = np.asarray(labels)
    errs = []
    for k in range(c):
        pk = p[:, k]
        hit = (labels == k).astype(np.float64)
        errs.append(binned_error(pk, hit, width_bins(pk, n_bins), n_bins))
    return float(np.mean(errs))


def nll(logits, labels) -> float:
    p = softmax(logits)
    return float(-np.mean(np.log(p[np.arange(p.shape[0]), np.asarray(labels)])))


def brier(logits, labels) -> float:
    p = softmax(logits)
    onehot = np.eye(p.shape[1])[np.asarray(labels)]
    return float(np.mean(np.sum((p - onehot) ** 2, axis=1)))


def rows_at_confidence(conf: np.ndarray, n_classes: int) -> np.ndarray:
    """float64 logits whose top-label confidence is ``conf`` (needs conf >= 1/n_classes):
    top logit 0, the others all ``log r`` with ``1/(1 + (C-1) r) = conf``."""
    conf = np.asarray(conf, dtype=np.float64)
    r = (1.0 - conf) / (conf * (n_classes - 1))
    rest = np.where(r > 0, np.log(np.maximum(r, 1e-300)), -200.0)
    out = np.repeat(rest[:, None], n_classes, axis=1)
    out[:, 0] = 0.0
    return out


def calibrated_logits(n: int, n_classes: int, *, scale: float = 2.0, seed: int = 0):
    """Logits of a perfectly calibrated generative model: labels ~ Categorical(softmax(z))."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, n_classes)) * scale
    p = softmax(z)
    u = rng.random(n)[:, None]
    y = (p.cumsum(axis=1) < u).sum(axis=1).clip(0, n_classes - 1)
    return z, y


def aurc(logits, labels) -> float:
    """AURC with ties averaged, by the definition: (1/N) Σ_k E[errors among the k most
    confident] / k, a tie block's errors spread evenly over its positions (O(N²))."""
    conf, pred = top_label(logits)
    wrong = (pred != np.asarray(labels)).astype(np.float64)
    c = np.sort(conf)[::-1]
    total = 0.0
    for k in range(1, len(c) + 1):
        above = conf > c[k - 1]
        block = conf == c[k - 1]
        errors = wrong[above].sum() + wrong[block].sum() * (k - above.sum()) / block.sum()
        total += errors / k
    return total / len(c)


def excess_aurc(logits, labels) -> float:
    """``aurc`` minus that of the ranking with every right prediction first."""
    conf, pred = top_label(logits)
    right = int((pred == np.asarray(labels)).sum())
    n = len(conf)
    best = sum(max(0, k - right) / k for k in range(1, n + 1)) / n
    return aurc(logits, labels) - best
