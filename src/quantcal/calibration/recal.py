"""Post-hoc recalibration: maps from validation logits to better-calibrated logits.

The contract (``Recalibrator``)
-------------------------------
* ``fit(logits, labels) -> self`` on the **val** split only (logits ``(N, C)``, labels ``(N,)``).
* ``__call__(logits) -> logits``: the output is always *logits* whose softmax is the
  recalibrated class distribution, with the input's shape and device, float64 for float64
  input and float32 otherwise, and a numpy array when a numpy array came in. Logit maps
  (temperature, vector, matrix scaling) return the mapped logits. Top-label methods
  (histogram binning, isotonic regression) recalibrate only the top-label confidence ``q``
  and return log-probabilities (shifted so the top class is exactly 0) such that

  - the argmax is the original one and ``max softmax == q`` (up to output-dtype rounding);
  - the remaining mass ``1 − q`` goes to the other classes in proportion to their original
    probabilities, *water-filled* so that none exceeds ``q·(1 − 1e-6)`` (the capped ones sit
    exactly at that cap; keeping them strictly below ``q`` keeps the argmax unique);
  - ``q`` is clipped to ``[1/(1 + (C − 1)(1 − 1e-6)), 1 − 1e-6]``: below 1/C no distribution
    has ``q`` as its maximum, and ``q = 1`` would need ``log 0 = −inf`` logits, which the
    metrics reject.
* ``state_dict()`` returns plain JSON-able data (``name``, parameters, fit diagnostics) and
  ``from_state_dict(d)`` rebuilds an identical recalibrator; ``recal.from_state_dict(d)``
  dispatches on ``d["name"]``.
* class attributes ``name`` (the registry key) and ``preserves_argmax`` (whether the top-1
  prediction, hence accuracy, is guaranteed unchanged).

When a fit can be trusted
-------------------------
:func:`fit_notes` says, for a result row, when a recalibrator's fit should not be taken at its
word: fitted on fewer than :func:`min_fit_images` images (at least ``MIN_FIT_IMAGES`` = 500, and
``MIN_FIT_PER_PARAMETER`` = 50 per fitted parameter: temperature 1, vector scaling 2·C, matrix
scaling C² + C, histogram binning its 15 bins, isotonic regression counted as 15 like histogram
binning), or its held-out ECE measurably above no recalibration (the paired interval of
``ece_diff_vs_none`` above 0). Temperature scaling on a few hundred images of a model that makes
few errors is the common case: the NLL then favours a small T and sharpens an already
calibrated model.

References: Guo et al. 2017 "On Calibration of Modern Neural Networks" (temperature, vector and
matrix scaling); Zadrozny & Elkan 2001 (histogram binning) and 2002 (isotonic regression).

Where the code lives (this module re-exports the public names): the registry, the protocol and
the shared base class in :mod:`~quantcal.calibration.recal_base`, lookup by name in
:mod:`~quantcal.calibration.recal_registry`, the logit maps in
:mod:`~quantcal.calibration.recal_scaling`, the top-label maps in
:mod:`~quantcal.calibration.recal_toplabel` and the fit notes in
:mod:`~quantcal.calibration.recal_notes`.
"""

from __future__ import annotations

from quantcal.calibration.recal_base import NotFittedError, Recalibrator, register
from quantcal.calibration.recal_notes import (
    MIN_FIT_IMAGES,
    MIN_FIT_PER_PARAMETER,
    fit_notes,
    fit_parameters,
    keeps_predictions,
    min_fit_images,
)
from quantcal.calibration.recal_registry import available, from_state_dict, get
from quantcal.calibration.recal_scaling import (
    T_MAX,
    T_MIN,
    Identity,
    MatrixScaling,
    TemperatureScaling,
    VectorScaling,
)
from quantcal.calibration.recal_toplabel import HistogramBinning, IsotonicRegression

__all__ = [
    "MIN_FIT_IMAGES",
    "MIN_FIT_PER_PARAMETER",
    "T_MAX",
    "T_MIN",
    "HistogramBinning",
    "Identity",
    "IsotonicRegression",
    "MatrixScaling",
    "NotFittedError",
    "Recalibrator",
    "TemperatureScaling",
    "VectorScaling",
    "available",
    "fit_notes",
    "fit_parameters",
    "from_state_dict",
    "get",
    "keeps_predictions",
    "min_fit_images",
    "register",
]
