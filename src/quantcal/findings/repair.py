"""The repair's numbers: what each quantization method gives back over min-max PTQ, for
accuracy and for calibration, with paired intervals.

A study with ``[quant] methods = ["ptq", "cle_bc", "adaround", "qat"]`` scores here, per model,
quantized precision, range estimator and recalibrator (``none`` and ``temperature`` where the
study has them), from the cached logits of range-calibration sample 0:

    ece_gap       = ECE(method, q) − ECE(fp32)           (what is still lost, vs fp32)
    accuracy_gap  = acc(fp32) − acc(method, q)
    ece_vs_ptq    = ECE(method, q) − ECE(ptq, q)         (what the method changed)
    accuracy_vs_ptq = acc(method, q) − acc(ptq, q)

Every model is scored on the same test images, so one paired bootstrap over the images
(:func:`quantcal.metrics.paired_bootstrap_contrast`) gives each interval with the test set's
sampling noise cancelled. The question it answers (the ``repair_restores`` finding): does
better quantization restore calibration, or only accuracy? ECE must be read beside accuracy:
a collapsed model can be "calibrated" at chance.
"""

from __future__ import annotations

from typing import Any

__all__ = ["BASELINE", "RECALS", "contrasts"]

RECALS = ("none", "temperature")
#: The method every other is compared with.
BASELINE = "ptq"


def _estimate(t: tuple[float, float, float]) -> dict[str, float]:
    return {"value": float(t[0]), "lo": float(t[1]), "hi": float(t[2])}


def contrasts(runner: Any, plan: list) -> list[dict[str, Any]]:
    """One record per (dataset, model, objective, seed, precision, observer, method,
    recalibrator) of the cached cells; ``[]`` when the study has one method. Each record holds
    ``accuracy``, ``ece``, ``ece_gap`` and ``accuracy_gap`` (vs fp32) and, for methods other
    than ``ptq`` when the study has it, ``ece_vs_ptq`` and ``accuracy_vs_ptq``, each interval
    as ``{"value", "lo", "hi"}``."""
    from quantcal.calibration import metrics
    from quantcal.calibration.recal_splits import crossfit_folds, recalibrate

    cfg = runner.config
    if len(cfg.quant_methods) < 2:
        return []
    recals = [m for m in RECALS if m in cfg.recal]
    kw = {"n_resamples": max(cfg.bootstrap, 10), "level": cfg.level}
    out: list[dict[str, Any]] = []
    for g, cells in plan:
        tkey = runner.train_key(g)
        fp32 = runner.cached_logits(cells[0], tkey)
        if fp32 is None:
            continue
        y = fp32["test_labels"]
        fit = runner.recal_fit(g)[0]
        folds = crossfit_folds(y, g.seed) if fit == "test_crossfit" else None

        def recalibrated(lg: dict, recal: str, fp32=fp32, folds=folds) -> Any:
            z, _ = recalibrate(recal, lg, fp32, [], None, None if recal == "none" else folds)
            return z

        ref = {r: recalibrated(fp32, r) for r in recals}
        per: dict[tuple[str, str, str], dict] = {}
        for cell in cells:
            if cell.is_fp32 or cell.sample != 0 or cell.precision.startswith("plan:"):
                continue
            lg = runner.cached_logits(cell, tkey)
            if lg is not None:
                per[(cell.precision, cell.observer, cell.method)] = lg
        for (precision, observer, method), lg in per.items():
            base = per.get((precision, observer, BASELINE)) if method != BASELINE else None
            for recal in recals:
                z = recalibrated(lg, recal)
                zf = ref[recal]
                s = {**kw, "seed": g.seed}
                rec: dict[str, Any] = {
                    "dataset": g.dataset,
                    "arch": g.model.arch,
                    "width": float(g.model.width),
                    "objective": g.objective,
                    "seed": g.seed,
                    "precision": precision,
                    "observer": observer,
                    "method": method,
                    "recal": recal,
                    "accuracy": metrics.accuracy(z, y),
                    "ece": metrics.ece(z, y, n_bins=cfg.n_bins),
                    "fp32_accuracy": metrics.accuracy(zf, y),
                    "fp32_ece": metrics.ece(zf, y, n_bins=cfg.n_bins),
                    "ece_gap": _estimate(
                        metrics.paired_bootstrap_contrast("ece", [z, zf], [1, -1], y, **s)
                    ),
                    "accuracy_gap": _estimate(
                        metrics.paired_bootstrap_contrast("accuracy", [zf, z], [1, -1], y, **s)
                    ),
                    "n_test": int(y.shape[0]),
                }
                if base is not None:
                    zb = recalibrated(base, recal)
                    rec["ece_vs_ptq"] = _estimate(
                        metrics.paired_bootstrap_contrast("ece", [z, zb], [1, -1], y, **s)
                    )
                    rec["accuracy_vs_ptq"] = _estimate(
                        metrics.paired_bootstrap_contrast("accuracy", [z, zb], [1, -1], y, **s)
                    )
                out.append(rec)
    return out
