"""When a recalibrator's fit can be trusted: the parameters it fits, the fewest images its fit
is trusted on and the notes a result row gets (see "When a fit can be trusted" in
:mod:`quantcal.calibration.recal`).
"""

from __future__ import annotations

from quantcal.calibration.recal_registry import get

__all__ = [
    "MIN_FIT_IMAGES",
    "MIN_FIT_PER_PARAMETER",
    "REUSE_FP32_TEMPERATURE",
    "fit_notes",
    "fit_parameters",
    "keeps_predictions",
    "min_fit_images",
]

#: The fewest images any recalibrator's fit is trusted on (see "When a fit can be trusted").
MIN_FIT_IMAGES = 500
#: The fewest images per fitted parameter.
MIN_FIT_PER_PARAMETER = 50
#: The ``[recal] methods`` entry that applies the fp32 model's temperature, fitted on the fp32
#: model's own validation logits, to a quantized cell (the deployer who calibrates once).
REUSE_FP32_TEMPERATURE = "temperature_fp32"


def fit_parameters(name: str, n_classes: int | None = None) -> int | None:
    """How many numbers ``name`` fits: none 0, temperature (and the fp32 model's temperature
    reused) 1, vector 2·C, matrix C² + C, histogram and isotonic 15; None when it depends on an
    unknown C or the name is not a recalibrator."""
    if name == REUSE_FP32_TEMPERATURE:
        return 1
    try:
        cls = get(name)
    except ValueError:
        return None
    return cls.fit_parameters(n_classes)


def min_fit_images(name: str, n_classes: int | None = None) -> int:
    """``max(MIN_FIT_IMAGES, MIN_FIT_PER_PARAMETER · fit_parameters)`` (``MIN_FIT_IMAGES`` when
    the count is unknown); 0 for ``none``."""
    k = fit_parameters(name, n_classes)
    if k == 0:
        return 0
    return max(MIN_FIT_IMAGES, MIN_FIT_PER_PARAMETER * (k or 0))


def keeps_predictions(name: str) -> bool:
    """Whether ``name`` keeps every top-1 prediction (``preserves_argmax``); False when it is
    not a known recalibrator."""
    if name == REUSE_FP32_TEMPERATURE:
        return True
    try:
        return bool(get(name).preserves_argmax)
    except ValueError:
        return False


def fit_notes(
    name: str,
    n_fit: int | None = None,
    n_classes: int | None = None,
    ece_diff_vs_none: tuple[float | None, float | None, float | None] | None = None,
) -> list[str]:
    """The notes on one result row's recalibrator (see "When a fit can be trusted"): a fit on
    ``n_fit`` images, fewer than :func:`min_fit_images`; a held-out ECE change vs no
    recalibration ``(value, lo, hi)`` whose paired interval lies above 0. Empty for ``none``."""
    if name == "none":
        return []
    notes = []
    need = min_fit_images(name, n_classes)
    if n_fit is not None and n_fit < need:
        k = fit_parameters(name, n_classes)
        what = f"{k} parameter{'s' if k != 1 else ''}" if k is not None else "parameters"
        notes.append(
            f"{name} was fitted on {n_fit} images, fewer than the {need} this report trusts (at "
            f"least {MIN_FIT_IMAGES}, and {MIN_FIT_PER_PARAMETER} per fitted parameter; it fits "
            f"{what}): its fit may not reproduce on another sample, a larger recalibration "
            "split settles it (data.val_size; when cross-fitted on test, a larger test split)"
        )
    d, lo, hi = ece_diff_vs_none or (None, None, None)
    if d is not None and lo is not None and hi is not None and lo > 0:
        notes.append(
            f"{name} raised the held-out ECE by {100 * d:+.2f} [{100 * lo:+.2f}, "
            f"{100 * hi:+.2f}] points vs no recalibration (paired): its fit does not carry "
            "over to the test images, and no verdict counts it as a repair"
        )
    return notes
