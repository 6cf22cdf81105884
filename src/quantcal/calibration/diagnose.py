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
from collections.abc import Sequence
from typing import Any

import torch

__all__ = [
    "CONFIDENCE_GROUPS",
    "bn_input_mismatch",
    "confidence_histogram",
    "diagnose",
    "flips_by_confidence",
    "gap_decomposition",
    "input_statistics_notes",
    "nll_vs_temperature",
    "prediction_notes",
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


# --------------------------------------------------------------------------------------------
# Sanity notes on a model's predictions (every path that scores a given model)
# --------------------------------------------------------------------------------------------
#: A fitted temperature outside this range suggests inputs the model did not expect.
PLAUSIBLE_TEMPERATURE = (0.2, 5.0)
#: Recalibrators with parameters per class, and the fewest images of each class they should be
#: fitted on: vector scaling fits 2 numbers per class, matrix scaling C + 1; below ~20 images of a
#: class its parameters follow those few images (Guo et al. 2017 fit them on 5,000 images).
PER_CLASS_RECALIBRATORS = ("vector", "matrix")
MIN_PER_CLASS = 20


def prediction_notes(
    val_logits: torch.Tensor,
    val_labels: torch.Tensor,
    test_logits: torch.Tensor | None = None,
    test_labels: torch.Tensor | None = None,
    *,
    temperature: float | None = None,
    methods: Sequence[str] = (),
    recal_fit: str = "val",
    subject: str = "the model",
    preprocessing: str = "--mean/--std or --transform",
) -> list[str]:
    """Notes a person should read beside a model's scores, from its logits (never an error):

    - near chance on val (accuracy below 1.5 / K): usually inputs the model did not expect;
    - a temperature ``temperature`` (fitted on val when None) outside
      ``PLAUSIBLE_TEMPERATURE``: the same suspicion;
    - a per-class recalibrator of ``methods`` (``PER_CLASS_RECALIBRATORS``) fitted on fewer than
      ``MIN_PER_CLASS`` images of some class in the recalibration split (val, or half of test
      when ``recal_fit`` is ``"test_crossfit"``);
    - the same logits given as val and test (with ``recal_fit="val"``): recalibration fitted on
      the test set, so its ECE is optimistic.

    ``subject`` names the model in the notes; ``preprocessing`` says where its inputs are set."""
    import warnings

    from quantcal.calibration import recal

    notes: list[str] = []
    k = int(val_logits.shape[1]) if val_logits.dim() == 2 else 0
    if not len(val_labels) or k < 2:
        return notes
    acc = float((val_logits.argmax(1) == val_labels).double().mean())
    if acc < 1.5 / k:
        notes.append(
            f"{subject} is near chance on validation (accuracy {100 * acc:.1f} %, chance "
            f"{100 / k:.1f} %): check the preprocessing ({preprocessing}) and that the model "
            "fits this data"
        )
    if temperature is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a bound is itself extreme and said below
            temperature = float(recal.get("temperature")().fit(val_logits, val_labels).temperature)
    lo, hi = PLAUSIBLE_TEMPERATURE
    if not lo <= temperature <= hi:
        notes.append(
            f"{subject}'s validation temperature T = {temperature:.3g} is extreme (outside "
            f"[{lo:g}, {hi:g}]): check the preprocessing ({preprocessing})"
        )
    notes.extend(_few_per_class(val_labels, test_labels, k, methods, recal_fit))
    if (
        recal_fit == "val"
        and test_logits is not None
        and test_logits.shape == val_logits.shape
        and torch.equal(test_logits, val_logits)
    ):
        notes.append(
            "the val and test logits are identical: the recalibrators were fitted on the test "
            "set itself, so their ECE is optimistic; give logits of held-out validation images "
            "(or recalibrate with cross-fitting on test)"
        )
    return notes


def _few_per_class(
    val_labels: torch.Tensor,
    test_labels: torch.Tensor | None,
    k: int,
    methods: Sequence[str],
    recal_fit: str,
) -> list[str]:
    """The note of :func:`prediction_notes` on per-class recalibrators fitted on few images."""
    per_class = [m for m in methods if m in PER_CLASS_RECALIBRATORS]
    if not per_class:
        return []
    if recal_fit == "test_crossfit" and test_labels is not None:
        counts = torch.bincount(test_labels.long().cpu(), minlength=k) // 2
        where = "each half of test (cross-fitted)"
    else:
        counts = torch.bincount(val_labels.long().cpu(), minlength=k)
        where = "val"
    fewest = int(counts.min())
    if fewest >= MIN_PER_CLASS:
        return []
    few = int((counts < MIN_PER_CLASS).sum())
    return [
        f"{', '.join(per_class)} fit parameters per class, but {few} of {k} classes have fewer "
        f"than {MIN_PER_CLASS} images in {where} (the fewest: {fewest}, class "
        f"{int(counts.argmin())}): their fit follows those few images; prefer temperature "
        "scaling or a larger recalibration split"
    ]


#: Thresholds of :func:`input_statistics_notes`: |the median over channels of log(variance
#: ratio)| (log 4: a standard deviation off by 2x) and of the mean shift in running standard
#: deviations. A correctly fed model sits well inside both (augmentation and zero padding move
#: them by a few tenths); inputs scaled x / 255 instead of standardised move the variance ~10x.
BN_LOG_VARIANCE_LIMIT = math.log(4.0)
BN_SHIFT_LIMIT = 1.0


@torch.no_grad()
def bn_input_mismatch(
    model: torch.nn.Module, inputs: torch.Tensor
) -> tuple[str, float, float] | None:
    """How far ``inputs`` are from what ``model`` was trained on, read from its first
    BatchNorm (in execution order; eval mode): ``(layer name, median log(var / running_var),
    median |mean - running_mean| / running_std)`` over its channels, on that layer's input. None
    when the model has no BatchNorm (a folded or BN-free model: nothing to compare with).

    A BatchNorm's running statistics are the moments of its input during training (Ioffe &
    Szegedy, 2015), so a preprocessing other than the training one shows there first."""
    bns = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
        and m.track_running_stats
        and m.running_mean is not None
    ]
    if not bns or inputs.numel() == 0:
        return None
    seen: list[tuple[str, torch.Tensor]] = []

    def hook(name):
        def record(_module, args):
            if not seen:
                seen.append((name, args[0].detach()))

        return record

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in bns]
    was_training = model.training
    try:
        model.eval()
        model(inputs)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    if not seen:
        return None
    name, x = seen[0]
    bn = dict(bns)[name]
    dims = [d for d in range(x.dim()) if d != 1]
    mean = x.double().mean(dim=dims)
    var = x.double().var(dim=dims, unbiased=False)
    rvar = bn.running_var.double().to(var.device)
    rmean = bn.running_mean.double().to(mean.device)
    keep = (rvar > 1e-8) & (var > 1e-12)
    if not bool(keep.any()):
        return None
    log_ratio = torch.quantile((var[keep] / rvar[keep]).log(), 0.5)
    shift = torch.quantile((mean[keep] - rmean[keep]).abs() / rvar[keep].sqrt(), 0.5)
    return name, float(log_ratio), float(shift)


def input_statistics_notes(
    model: torch.nn.Module,
    inputs: torch.Tensor,
    *,
    subject: str = "the fp32 model",
    preprocessing: str = "mean/std",
) -> list[str]:
    """A note when ``inputs`` (already preprocessed, e.g. 256 validation images) do not look
    like what ``model`` was trained on (:func:`bn_input_mismatch` beyond
    ``BN_LOG_VARIANCE_LIMIT`` or ``BN_SHIFT_LIMIT``); else none. This catches a wrong
    normalisation that leaves the model far from chance and its temperature plausible (e.g. a
    CIFAR-100 ResNet-20 fed x / 255: 22.5 % accuracy, T = 3.1)."""
    try:
        found = bn_input_mismatch(model, inputs)
    except Exception as exc:  # a check beside the numbers: name it, never fail the cell for it
        return [
            f"the preprocessing check at {subject}'s first BatchNorm could not run "
            f"({type(exc).__name__}: {exc}): its inputs were not checked against its training "
            "statistics"
        ]
    if found is None:
        return []
    name, log_ratio, shift = found
    if abs(log_ratio) <= BN_LOG_VARIANCE_LIMIT and shift <= BN_SHIFT_LIMIT:
        return []
    return [
        f"the inputs do not look like {subject}'s training inputs: at its first BatchNorm "
        f"({name}) their variance is {math.exp(log_ratio):.2g}x the running variance and "
        f"their mean {shift:.2g} running standard deviations away (median over channels): "
        f"check the preprocessing ({preprocessing})"
    ]
