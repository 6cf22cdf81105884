"""Why recalibration fails: what quantization did to a model's predictions and confidences.

Pure functions of an fp32 model's logits and its quantized copy's logits on the same images:

- :func:`gap_decomposition`: the top-label overconfidence ``conf - acc`` of the quantized model
  minus the fp32 model's, split exactly into an *accuracy* term (``acc_fp32 - acc_q``: the gap
  the quantized model would have if its confidences had stayed the fp32 model's) and a
  *confidence* term (``conf_q - conf_fp32``). When accuracy collapses and confidence does not
  follow, the first term dominates; a temperature can only rescale confidence, uniformly.
- :func:`flips_by_confidence`: the images grouped by the fp32 model's confidence, and in each
  group the share whose prediction quantization changed, right to wrong and wrong to right (the
  prediction-flip analysis of Xia et al., 2021): flips concentrated in low-confidence images are
  benign noise; flips among confident images are errors made with confidence.
- :func:`confidence_histogram`: the distribution of top-label confidence.
- :func:`nll_vs_temperature`: NLL of ``softmax(z / T)`` on a grid of T: a flat curve means no
  temperature helps; a sharp optimum far from 1 means a rescale was needed.

:func:`diagnose` gathers them into one JSON-ready dict (``details.json["diagnostics"]``).
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch

__all__ = [
    "CONFIDENCE_GROUPS",
    "confidence_histogram",
    "diagnose",
    "flips_by_confidence",
    "gap_decomposition",
    "nll_vs_temperature",
]

#: Edges of the fp32-confidence groups of :func:`flips_by_confidence`.
CONFIDENCE_GROUPS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
#: The temperature grid of :func:`diagnose` (log-spaced, 0.05 to 20).
TEMPERATURES = tuple(10 ** (math.log10(0.05) + i * math.log10(400.0) / 60) for i in range(61))


def _check(logits: torch.Tensor, labels: torch.Tensor, what: str = "logits") -> None:
    if logits.dim() != 2 or labels.dim() != 1 or logits.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{what} must be (N, C) and labels (N,) with the same N, got "
            f"{tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    if logits.shape[0] == 0:
        raise ValueError(f"{what} is empty: nothing to diagnose")


def _top(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    p = torch.softmax(logits.double(), dim=1)
    conf, pred = p.max(dim=1)
    return conf, pred


def gap_decomposition(
    fp32_logits: torch.Tensor, q_logits: torch.Tensor, labels: torch.Tensor
) -> dict[str, float]:
    """``gap = mean conf - accuracy`` of each model and ``gap_q - gap_fp32 = accuracy_term +
    confidence_term`` with ``accuracy_term = acc_fp32 - acc_q`` and ``confidence_term =
    conf_q - conf_fp32`` (an identity, exact to rounding)."""
    _check(fp32_logits, labels, "fp32 logits")
    _check(q_logits, labels, "quantized logits")
    c32, p32 = _top(fp32_logits)
    cq, pq = _top(q_logits)
    acc32 = float((p32 == labels).double().mean())
    accq = float((pq == labels).double().mean())
    conf32, confq = float(c32.mean()), float(cq.mean())
    return {
        "accuracy_fp32": acc32,
        "accuracy_q": accq,
        "confidence_fp32": conf32,
        "confidence_q": confq,
        "gap_fp32": conf32 - acc32,
        "gap_q": confq - accq,
        "accuracy_term": acc32 - accq,
        "confidence_term": confq - conf32,
    }


def _share(hits: torch.Tensor, k: int) -> float:
    return float(hits.double().sum()) / k if k else math.nan


def flips_by_confidence(
    fp32_logits: torch.Tensor,
    q_logits: torch.Tensor,
    labels: torch.Tensor,
    edges: tuple[float, ...] = CONFIDENCE_GROUPS,
) -> list[dict[str, float]]:
    """Per group of fp32 confidence ``[lo, hi)`` (the last closed): ``n``, ``share`` of the
    images, ``flipped`` (share of the group whose top-1 changed), ``right_to_wrong`` and
    ``wrong_to_right`` (shares of the group)."""
    _check(fp32_logits, labels, "fp32 logits")
    _check(q_logits, labels, "quantized logits")
    c32, p32 = _top(fp32_logits)
    _, pq = _top(q_logits)
    n = labels.shape[0]
    out = []
    for i, (lo, hi) in enumerate(itertools.pairwise(edges)):
        last = i == len(edges) - 2
        mask = (c32 >= lo) & ((c32 <= hi) if last else (c32 < hi))
        k = int(mask.sum())
        right32, rightq = p32[mask] == labels[mask], pq[mask] == labels[mask]
        out.append(
            {
                "lo": lo,
                "hi": hi,
                "n": k,
                "share": k / n,
                "flipped": _share(p32[mask] != pq[mask], k),
                "right_to_wrong": _share(right32 & ~rightq, k),
                "wrong_to_right": _share(~right32 & rightq, k),
            }
        )
    return out


def confidence_histogram(logits: torch.Tensor, n_bins: int = 20) -> list[int]:
    """Counts of top-label confidence in ``n_bins`` equal bins of [0, 1] (1.0 in the last)."""
    if logits.dim() != 2 or logits.shape[0] == 0:
        raise ValueError(f"logits must be a non-empty (N, C) tensor, got {tuple(logits.shape)}")
    conf, _ = _top(logits)
    idx = (conf * n_bins).floor().clamp_(0, n_bins - 1).long()
    return [int(c) for c in torch.bincount(idx, minlength=n_bins)]


def nll_vs_temperature(
    logits: torch.Tensor, labels: torch.Tensor, temperatures: tuple[float, ...] = TEMPERATURES
) -> list[float]:
    """Mean NLL of ``softmax(logits / T)`` for each T (float64)."""
    _check(logits, labels)
    z = logits.double()
    out = []
    for t in temperatures:
        if not t > 0:
            raise ValueError(f"temperatures must be > 0, got {t}")
        out.append(float(torch.nn.functional.cross_entropy(z / t, labels)))
    return out


def diagnose(
    fp32_test: torch.Tensor,
    q_test: torch.Tensor,
    test_labels: torch.Tensor,
    q_fit: torch.Tensor,
    fit_labels: torch.Tensor,
    fit_split: str = "val",
) -> dict[str, Any]:
    """Everything above for one quantized cell: on the test split, the gap decomposition, the
    flips by fp32 confidence and both confidence histograms; on the recalibration split
    (``fit_split``), the quantized model's NLL over ``TEMPERATURES`` with its minimum and how
    sharp it is (the NLL rise at ``T*·1.5`` and ``T*/1.5``)."""
    nll = nll_vs_temperature(q_fit, fit_labels)
    best = min(range(len(nll)), key=nll.__getitem__)
    t_star = TEMPERATURES[best]
    at = nll_vs_temperature(q_fit, fit_labels, (t_star / 1.5, t_star * 1.5))
    return {
        "gap": gap_decomposition(fp32_test, q_test, test_labels),
        "flips": flips_by_confidence(fp32_test, q_test, test_labels),
        "histogram_fp32": confidence_histogram(fp32_test),
        "histogram_q": confidence_histogram(q_test),
        "temperatures": list(TEMPERATURES),
        "nll": nll,
        "fit_split": fit_split,
        "t_star": t_star,
        "nll_star": nll[best],
        "nll_rise_at_1.5x": max(at) - nll[best],
    }
