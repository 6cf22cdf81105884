"""The row stage's measurement: one result row of a (cell, recalibration method) from its
logits, recalibrated on the fitting split and measured on test with bootstrap intervals and
paired differences (also used by ``quantcal eval`` for logits from outside)."""

from __future__ import annotations

from typing import Any

from quantcal.calibration.recal_splits import FitFn, crossfit_folds, fold, recalibrate
from quantcal.findings.rows import RESULT_COLUMNS
from quantcal.study.cells import QuantCell
from quantcal.study.config import REUSE_FP32_TEMPERATURE, StudyConfig
from quantcal.study.keys import CLEAN

__all__ = ["base_row", "recalibrated_clean", "risk_coverage_points", "score", "thresholds"]

#: Points kept of a row's risk–coverage curve (details.json), on an even coverage grid.
CURVE_POINTS = 50


def thresholds(method: str, lg: dict, fp32: dict, target_risk: float) -> tuple[float, float]:
    """The deployer's abstention thresholds for recalibrator ``method``
    (:mod:`quantcal.findings.threshold`): (the fp32 model's, set on its validation logits
    recalibrated by ``method``; the quantized model's own, re-set on its recalibrated
    validation logits), each the lowest confidence whose selective risk there is at most
    ``target_risk`` (``inf`` when none is)."""
    from quantcal.calibration import selective

    def on_val(d: dict) -> dict:
        return {**d, "test_logits": d["val_logits"], "test_labels": d["val_labels"]}

    fp32_val = on_val(fp32)
    z_fp32, _ = recalibrate(method, fp32_val, fp32_val)
    z_own, _ = (z_fp32, None) if lg is fp32 else recalibrate(method, on_val(lg), fp32_val)
    return (
        selective.threshold_for_risk(z_fp32, fp32["val_labels"], risk=target_risk),
        selective.threshold_for_risk(z_own, lg["val_labels"], risk=target_risk),
    )


def _folds(method: str, labels, recal_fit: str, seed: int) -> list[tuple[Any, Any]] | None:
    """The cross-fit halves of test when recalibrators are fitted on it, else None."""
    if recal_fit == "test_crossfit" and method != "none":
        return crossfit_folds(labels, seed)
    return None


def recalibrated_clean(
    method: str, lg: dict, fp32: dict, recal_fit: str, seed: int
) -> tuple[Any, Any]:
    """(this cell's, the fp32 cell's) clean test logits recalibrated by ``method`` as
    :func:`score` recalibrates them: the clean terms of a shifted row's interaction, the same
    for every shift (fitted once per cell and method by the rows stage)."""
    folds = _folds(method, lg["test_labels"], recal_fit, seed)
    zq, _ = recalibrate(method, lg, fp32, [], None, folds)
    zf = zq if lg is fp32 else recalibrate(method, fp32, fp32, [], None, folds)[0]
    return zq, zf


def risk_coverage_points(z, labels, n: int = CURVE_POINTS) -> dict[str, list[float]]:
    """The risk–coverage curve at ``n`` even coverages (each the risk of accepting the most
    confident ``ceil(coverage · N)`` samples, ties to the end of their block) for plotting."""
    from quantcal.calibration import selective

    curve = selective.risk_coverage(z, labels)
    cov = [(i + 1) / n for i in range(n)]
    out = []
    for c in cov:
        need = -(-round(c * curve.n * 1e9) // round(1e9))  # ceil without float error
        j = int((curve.accepted >= need).nonzero()[0])
        out.append(float(curve.risk[j]))
    return {"coverage": cov, "risk": out}


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
        shift=CLEAN,
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
    shift: str = CLEAN,
    clean: tuple[Any, Any] | None = None,
    threshold_pair: tuple[float, float] | None = None,
) -> dict[str, Any]:
    """One result row of (cell, method); ``notes`` (e.g. the data's) start its notes column.
    ``recal_fit`` is ``val`` or ``test_crossfit``
    (:func:`quantcal.calibration.recal_splits.crossfit_folds`, seeded by the group's seed; the
    bootstrap then resamples test images with their out-of-fold recalibrated logits, so the
    intervals hold the test sampling but not the variability of the half-size fits).
    ``report_on`` (search half, report half) of test: the row is scored on the report half
    only, every recalibrator fitted on the search half (a plan searched on that half).

    ``shift`` names the test images of ``lg`` and ``fp32`` (their validation logits are the
    clean ones: recalibrators are fitted on clean images, as a deployer would); ``clean``
    (this cell's and the fp32 cell's recalibrated clean test logits, :func:`recalibrated_clean`)
    adds the paired interaction of quantization and the shift. ``threshold_pair``
    (:func:`thresholds`) adds the threshold-transfer columns.
    """
    from quantcal.calibration import metrics, recal, selective
    from quantcal.findings.threshold import judge

    fit_column = recal_fit
    if report_on is not None:
        lg, fp32 = fold(lg, *report_on), fold(fp32, *report_on)
        recal_fit, fp32_fit = "val", None  # fitted on the search half, the folds' "val"
    labels = lg["test_labels"]
    notes = list(notes or [])
    folds = _folds(method, labels, recal_fit, cell.group.seed)
    if folds is not None:
        fp32_fit = None  # the memoised fits are on val
    z, temperature = recalibrate(method, lg, fp32, notes, fp32_fit, folds)

    rep = metrics.calibration_report(z, labels, n_bins=config.n_bins)
    row = base_row(config, cell, method)
    row.update({k: float(v) for k, v in rep.items() if k in row})
    row["n_test"] = int(labels.shape[0])
    row["recal_fit"] = fit_column
    row["shift"] = shift
    row["temperature"] = temperature
    row["aurc"] = selective.aurc(z, labels)
    row["excess_aurc"] = selective.excess_aurc(z, labels)
    row["failure_auroc"] = selective.failure_auroc(z, labels)
    row["failure_fpr95"] = selective.failure_fpr_at_tpr(z, labels)
    if threshold_pair is not None and folds is None and report_on is None:
        t_fp32, t_own = threshold_pair
        kept = selective.accepted_risk(z, labels, t_fp32)
        reset = selective.accepted_risk(z, labels, t_own)
        row["threshold"] = t_fp32
        row["threshold_risk"], row["threshold_coverage"] = kept
        row["threshold_reset_risk"], row["threshold_reset_coverage"] = reset
        row["threshold_outcome"] = judge(kept, t_own, reset, config.target_risk)
    elif folds is not None:
        notes.append(
            "no threshold transfer: the recalibrators are cross-fitted on test (no validation "
            "split to set a threshold on)"
        )
    boot = {"n_resamples": config.bootstrap, "level": config.level, "seed": cell.group.seed}
    if config.bootstrap > 0:
        row["aurc_lo"], row["aurc_hi"] = metrics.bootstrap_ci("aurc", z, labels, **boot)
        row["ece_lo"], row["ece_hi"] = metrics.bootstrap_ci("ece", z, labels, **boot)
        row["accuracy_lo"], row["accuracy_hi"] = metrics.bootstrap_ci("accuracy", z, labels, **boot)
        z_fp32, _ = recalibrate(method, fp32, fp32, [], fp32_fit, folds)
        d = metrics.paired_bootstrap_diff("ece", z, z_fp32, labels, **boot)
        row["ece_diff_vs_fp32"], row["ece_diff_vs_fp32_lo"], row["ece_diff_vs_fp32_hi"] = d
        d = metrics.paired_bootstrap_diff("ece", z, lg["test_logits"], labels, **boot)
        row["ece_diff_vs_none"], row["ece_diff_vs_none_lo"], row["ece_diff_vs_none_hi"] = d
        d = metrics.paired_bootstrap_diff("excess_aurc", z, z_fp32, labels, **boot)
        (
            row["excess_aurc_diff_vs_fp32"],
            row["excess_aurc_diff_vs_fp32_lo"],
            row["excess_aurc_diff_vs_fp32_hi"],
        ) = d
        if clean is not None and not cell.is_fp32:
            # [m(q, shift) − m(q, clean)] − [m(fp32, shift) − m(fp32, clean)], same images
            quad = [z, clean[0], z_fp32, clean[1]]
            for name in ("ece", "aurc"):
                c = metrics.paired_bootstrap_contrast(name, quad, [1, -1, -1, 1], labels, **boot)
                col = f"{name}_shift_interaction"
                row[col], row[f"{col}_lo"], row[f"{col}_hi"] = c
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
    row["risk_coverage"] = risk_coverage_points(z, labels)
    row["reliability"] = {
        "edges": [float(x) for x in rel.edges],
        "count": [int(x) for x in rel.count],
        "confidence": [None if x != x else float(x) for x in rel.confidence],
        "accuracy": [None if x != x else float(x) for x in rel.accuracy],
    }
    return {k: (float(v) if hasattr(v, "item") else v) for k, v in row.items()}
