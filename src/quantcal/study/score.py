"""The row stage's measurement: one result row of a (cell, recalibration method) from its
logits, recalibrated on the fitting split and measured on test with bootstrap intervals and
paired differences (also used by ``quantcal eval`` for logits from outside)."""

from __future__ import annotations

from typing import Any

from quantcal.calibration.recal_splits import FitFn, crossfit_folds, fold, recalibrate
from quantcal.findings.rows import RESULT_COLUMNS
from quantcal.study.cells import QuantCell
from quantcal.study.config import REUSE_FP32_TEMPERATURE, StudyConfig

__all__ = ["base_row", "score"]


def base_row(config: StudyConfig, cell: QuantCell, method: str) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(RESULT_COLUMNS)
    row.update(
        dataset=cell.group.dataset,
        arch=cell.group.model.arch,
        width=cell.group.model.width,
        objective=cell.group.objective,
        seed=cell.group.seed,
        precision=cell.precision,
        observer=cell.observer or "-",
        method="-" if cell.is_fp32 else cell.method,
        ptq_sample=-1 if cell.sample is None else cell.sample,
        recal=method,
        recal_fit=config.recal_fit,
        status="ok",
        error="",
        n_bins=config.n_bins,
    )
    return row


def score(
    config: StudyConfig,
    cell: QuantCell,
    method: str,
    lg: dict,
    fp32: dict,
    fp32_fit: FitFn | None = None,
    notes: list[str] | None = None,
    recal_fit: str = "val",
    report_on: tuple[Any, Any] | None = None,
) -> dict[str, Any]:
    """One result row of (cell, method); ``notes`` (e.g. the data's) start its notes column.
    ``recal_fit`` is ``val`` or ``test_crossfit``
    (:func:`quantcal.calibration.recal_splits.crossfit_folds`, seeded by the group's seed; the
    bootstrap then resamples test images with their out-of-fold recalibrated logits, so the
    intervals hold the test sampling but not the variability of the half-size fits).
    ``report_on`` (search half, report half) of test: the row is scored on the report half
    only, every recalibrator fitted on the search half (a plan searched on that half)."""
    from quantcal.calibration import metrics, recal

    fit_column = recal_fit
    if report_on is not None:
        lg, fp32 = fold(lg, *report_on), fold(fp32, *report_on)
        recal_fit, fp32_fit = "val", None  # fitted on the search half, the folds' "val"
    labels = lg["test_labels"]
    notes = list(notes or [])
    folds = None
    if recal_fit == "test_crossfit" and method != "none":
        folds = crossfit_folds(labels, cell.group.seed)
        fp32_fit = None  # the memoised fits are on val
    z, temperature = recalibrate(method, lg, fp32, notes, fp32_fit, folds)

    rep = metrics.calibration_report(z, labels, n_bins=config.n_bins)
    row = base_row(config, cell, method)
    row.update({k: float(v) for k, v in rep.items() if k in row})
    row["n_test"] = int(labels.shape[0])
    row["recal_fit"] = fit_column
    row["temperature"] = temperature
    boot = {"n_resamples": config.bootstrap, "level": config.level, "seed": cell.group.seed}
    if config.bootstrap > 0:
        row["ece_lo"], row["ece_hi"] = metrics.bootstrap_ci("ece", z, labels, **boot)
        row["accuracy_lo"], row["accuracy_hi"] = metrics.bootstrap_ci("accuracy", z, labels, **boot)
        z_fp32, _ = recalibrate(method, fp32, fp32, [], fp32_fit, folds)
        d = metrics.paired_bootstrap_diff("ece", z, z_fp32, labels, **boot)
        row["ece_diff_vs_fp32"], row["ece_diff_vs_fp32_lo"], row["ece_diff_vs_fp32_hi"] = d
        d = metrics.paired_bootstrap_diff("ece", z, lg["test_logits"], labels, **boot)
        row["ece_diff_vs_none"], row["ece_diff_vs_none_lo"], row["ece_diff_vs_none_hi"] = d
    row["n_classes"] = int(lg["test_logits"].shape[1])
    if method == "none":
        row["n_fit"] = None
    elif folds is not None:
        row["n_fit"] = min(len(fit_idx) for fit_idx, _ in folds)
    else:  # the fp32 model's temperature (reused) was fitted on its own val split
        fit_on = fp32 if method == REUSE_FP32_TEMPERATURE else lg
        row["n_fit"] = int(fit_on["val_labels"].shape[0])
    diff = tuple(row.get(f"ece_diff_vs_none{s}") for s in ("", "_lo", "_hi"))
    for note in recal.fit_notes(method, row["n_fit"], row["n_classes"], diff):
        if note not in notes:
            notes.append(note)
    row["notes"] = " | ".join(notes)
    rel = metrics.reliability(z, labels, n_bins=config.n_bins)
    row["reliability"] = {
        "edges": [float(x) for x in rel.edges],
        "count": [int(x) for x in rel.count],
        "confidence": [None if x != x else float(x) for x in rel.confidence],
        "accuracy": [None if x != x else float(x) for x in rel.accuracy],
    }
    return {k: (float(v) if hasattr(v, "item") else v) for k, v in row.items()}
