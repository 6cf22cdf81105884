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

from collections.abc import Callable

import torch

from quantcal.calibration import separation
from quantcal.calibration.checks import ArrayLike, check_choice, check_finite, validate_logits

__all__ = ["OOD_SCORES", "ood_auroc", "ood_fpr_at_tpr", "ood_score"]


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
