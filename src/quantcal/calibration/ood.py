"""Unknown inputs: how well a model's confidence tells in-distribution images from images of no
known class (issue #25, item 4).

Scores, higher meaning "more in-distribution", from raw logits ``z`` (N, C):

- ``"msp"``: the maximum softmax probability (Hendrycks & Gimpel, ICLR 2017);
- ``"max_logit"``: the largest logit (Hendrycks et al., ICML 2022, "Scaling out-of-distribution
  detection for real-world settings");
- ``"energy"``: ``T · logsumexp(z / T)`` with T = 1, the negative free energy (Liu et al.,
  NeurIPS 2020).

:func:`ood_auroc` is the probability that an in-distribution image scores above an unknown one
(ties count one half), the ROC AUC with in-distribution as positive; :func:`ood_fpr_at_tpr` the
share of unknown images accepted at the largest threshold that keeps ``tpr`` (95 %) of the
in-distribution ones. Both work on any precision's logits, so the same unknown images measure
how quantization moves detection.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from quantcal.calibration import separation
from quantcal.calibration.checks import ArrayLike, check_choice, check_finite, validate_logits

__all__ = ["OOD_SCORES", "ood_auroc", "ood_auroc_contrast", "ood_fpr_at_tpr", "ood_score"]


def _msp(z: torch.Tensor) -> torch.Tensor:
    return torch.softmax(z, 1).max(1).values


def _max_logit(z: torch.Tensor) -> torch.Tensor:
    return z.max(1).values


def _energy(z: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(z, 1)


#: The scores by name, each a function of float64 logits (N, C) -> (N,), higher = known.
OOD_SCORES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "msp": _msp,
    "max_logit": _max_logit,
    "energy": _energy,
}


def ood_score(logits: ArrayLike, score: str = "msp") -> torch.Tensor:
    """Per-image score (float64, higher = more in-distribution) of ``logits`` (N, C)."""
    check_choice(score, tuple(OOD_SCORES), "ood score")
    z = validate_logits(logits).detach().double().cpu()
    check_finite(int((~torch.isfinite(z)).any(1).sum()), z.shape[0])
    return OOD_SCORES[score](z)


def _scores(known: ArrayLike, unknown: ArrayLike, score: str) -> tuple[torch.Tensor, torch.Tensor]:
    return ood_score(known, score), ood_score(unknown, score)  # each refuses N = 0


def ood_auroc(known: ArrayLike, unknown: ArrayLike, score: str = "msp") -> float:
    """P(score of a known image > score of an unknown one) + P(equal) / 2."""
    return separation.auroc(*_scores(known, unknown, score))


def ood_fpr_at_tpr(
    known: ArrayLike, unknown: ArrayLike, score: str = "msp", tpr: float = 0.95
) -> float:
    """Share of unknown images scoring at or above the largest threshold that keeps at least
    ``tpr`` of the known images."""
    if not (isinstance(tpr, (int, float)) and 0 < tpr <= 1):
        raise ValueError(f"tpr must be in (0, 1], got {tpr!r}")
    return separation.fpr_at_tpr(*_scores(known, unknown, score), tpr)


class _ResampledAuroc:
    """AUROC of (known, unknown) scores on resamples given as per-sample counts.

    With each known image's count ``a_i`` and each unknown's ``b_j`` (a bootstrap resample
    repeats images), ``AUROC = Σ_i a_i (Σ_{j: u_j < k_i} b_j + ½ Σ_{j: u_j = k_i} b_j) /
    (Σa Σb)``: the unknown scores are sorted once, each known score's place among them found
    once (``searchsorted``), and a block of resamples costs a cumulative sum and a gather."""

    def __init__(self, known: torch.Tensor, unknown: torch.Tensor):
        u = unknown.double().cpu().numpy()
        self.order = np.argsort(u, kind="stable")
        su = u[self.order]
        k = known.double().cpu().numpy()
        self.lt = np.searchsorted(su, k, side="left")
        self.le = np.searchsorted(su, k, side="right")

    def on(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """``a`` (R, N_known) and ``b`` (R, N_unknown) counts -> (R,) AUROC."""
        cum = np.concatenate(
            [np.zeros((b.shape[0], 1)), np.cumsum(b[:, self.order], axis=1)], axis=1
        )
        below = np.take_along_axis(cum, np.broadcast_to(self.lt, a.shape), axis=1)
        upto = np.take_along_axis(cum, np.broadcast_to(self.le, a.shape), axis=1)
        wins = (a * (below + 0.5 * (upto - below))).sum(axis=1)
        return wins / (a.sum(axis=1) * b.sum(axis=1))


def ood_auroc_contrast(
    pairs: Sequence[tuple[ArrayLike, ArrayLike]],
    weights: Sequence[float],
    score: str = "msp",
    *,
    n_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Paired bootstrap of ``Σ_k w_k · AUROC(known_k, unknown_k)`` over models scored on the
    same known and unknown images (e.g. ``[(q_known, q_unknown), (f_known, f_unknown)]``,
    weights ``[1, -1]``: how much quantization moves detection). Known and unknown images are
    resampled independently (two samples), the same rows for every model. Returns
    ``(estimate, lo, hi)``, the percentile interval at ``level``; a single pair with weight 1
    is the AUROC with its interval."""
    if len(pairs) != len(weights) or not pairs:
        raise ValueError(
            f"need one weight per pair, got {len(pairs)} pairs, {len(weights)} weights"
        )
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, int) or n_resamples < 1:
        raise ValueError(f"n_resamples must be an integer >= 1, got {n_resamples!r}")
    if not 0.0 < float(level) < 1.0:
        raise ValueError(f"level must lie strictly between 0 and 1, got {level}")
    scored = [_scores(k, u, score) for k, u in pairs]
    n_k, n_u = scored[0][0].numel(), scored[0][1].numel()
    for i, (k, u) in enumerate(scored):
        if (k.numel(), u.numel()) != (n_k, n_u):
            raise ValueError(
                f"every pair must score the same images: pair 0 has ({n_k}, {n_u}) known and "
                f"unknown images, pair {i} ({k.numel()}, {u.numel()})"
            )
    w = np.asarray(weights, dtype=np.float64)
    estimate = float(sum(wi * separation.auroc(k, u) for wi, (k, u) in zip(w, scored)))
    fast = [_ResampledAuroc(k, u) for k, u in scored]
    rng = np.random.default_rng(int(seed))
    block = max(1, min(n_resamples, (1 << 21) // max(n_k, n_u)))
    reps, done = [], 0
    while done < n_resamples:
        r = min(block, n_resamples - done)
        a, b = (
            np.bincount(
                (rng.integers(0, n, size=(r, n)) + np.arange(r)[:, None] * n).ravel(),
                minlength=r * n,
            )
            .reshape(r, n)
            .astype(np.float64)
            for n in (n_k, n_u)
        )
        reps.append(sum(wi * f.on(a, b) for wi, f in zip(w, fast)))
        done += r
    alpha = (1.0 - float(level)) / 2.0
    lo, hi = np.quantile(np.concatenate(reps), [alpha, 1.0 - alpha])
    return estimate, float(lo), float(hi)
