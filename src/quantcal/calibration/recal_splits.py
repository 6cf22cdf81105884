"""Which images a recalibrator is fitted on, and applying it: the study's recalibration splits.

A normal study fits every recalibrator on the cell's own validation logits and applies it to its
test logits (``fit_and_apply``). ``temperature_fp32`` (:data:`REUSE_FP32_TEMPERATURE`) applies
the fp32 model's validation temperature to the quantized model instead. With a test-only source
(``recal_fit = "test_crossfit"``) the test split is cut in two stratified, seeded halves
(:func:`crossfit_folds`): each half is recalibrated by a fit on the other, so no test image is
ever measured with a fit that saw it.

Used by the study runner, the ablation and repair contrasts, and ``quantcal eval``; it imports
nothing of theirs.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

from quantcal.calibration.recal_notes import REUSE_FP32_TEMPERATURE
from quantcal.training import images as _images

__all__ = [
    "REUSE_FP32_TEMPERATURE",
    "FitFn",
    "crossfit_folds",
    "fit_and_apply",
    "fold",
    "recalibrate",
]

FitFn = Callable[[str, dict], tuple[Any, "float | None"]]


def fit_and_apply(method: str, fit_on: dict, apply_to: dict) -> tuple[Any, float | None]:
    """Fit ``method`` on ``fit_on``'s validation logits and apply it to ``apply_to``'s test
    logits; returns (test logits, temperature or None)."""
    from quantcal.calibration import recal

    r = recal.get(method)().fit(fit_on["val_logits"], fit_on["val_labels"])
    temp = getattr(r, "temperature", None)
    return r(apply_to["test_logits"]), (None if temp is None else float(temp))


def crossfit_folds(labels, seed: int) -> list[tuple[Any, Any]]:
    """Two stratified halves (A, B) of the test positions, seeded: [(fit A, apply B), (fit B,
    apply A)]. Each test image is recalibrated by a fit that never saw it. (A, B) are
    ``_images.test_halves``: a plan searched on A is scored on B."""
    a, b = _images.test_halves(labels, seed)
    return [(a, b), (b, a)]


def fold(d: dict, fit_idx, apply_idx) -> dict:
    """A logits dict whose val is ``test[fit_idx]`` and whose test is ``test[apply_idx]``."""
    return {
        "val_logits": d["test_logits"][fit_idx],
        "val_labels": d["test_labels"][fit_idx],
        "test_logits": d["test_logits"][apply_idx],
        "test_labels": d["test_labels"][apply_idx],
    }


def recalibrate(
    method: str,
    lg: dict,
    fp32: dict,
    notes: list[str] | None = None,
    fp32_fit: FitFn | None = None,
    folds: list[tuple[Any, Any]] | None = None,
):
    """Fit ``method`` on this cell's validation logits; return (test logits, temperature).

    ``temperature_fp32`` applies the fp32 model's temperature instead. ``fp32_fit(method,
    fp32)`` returns the fp32 model's fit (the runner memoises it per group); by default it is
    refitted. Warnings of the fit (a temperature at its bound, say) are appended to ``notes``.
    With ``folds`` (see :func:`crossfit_folds`) every recalibrator is fitted on one part of the
    test split and applied to the other, and the parts are put back in order; the temperature
    returned is the folds' mean."""
    from quantcal.calibration import recal

    if folds is not None:
        z, temps = None, []
        for fit_idx, apply_idx in folds:
            lg_f = fold(lg, fit_idx, apply_idx)
            fp32_f = lg_f if lg is fp32 else fold(fp32, fit_idx, apply_idx)
            zf, tf = recalibrate(method, lg_f, fp32_f, notes)
            if z is None:
                z = zf.new_empty((lg["test_logits"].shape[0], zf.shape[1]))
            z[apply_idx] = zf
            temps.append(tf)
        return z, (None if None in temps else sum(temps) / len(temps))

    fp32_fit = fp32_fit or (lambda m, f: fit_and_apply(m, f, f))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if method == REUSE_FP32_TEMPERATURE:
            _, t_fp32 = fp32_fit("temperature", fp32)
            fixed = recal.get("temperature").fixed(t_fp32)
            out = fixed(lg["test_logits"]), float(t_fp32)
        elif lg is fp32:
            out = fp32_fit(method, fp32)
        else:
            out = fit_and_apply(method, lg, lg)
    if notes is not None:
        notes.extend(str(w.message) for w in caught if str(w.message) not in notes)
    return out
