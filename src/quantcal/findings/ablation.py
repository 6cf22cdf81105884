"""The ablation's numbers: how much more (or less) each variant loses under quantization than the
base, with paired intervals.

A study that lists ``ablation_base`` and variants of the ablation family
(:data:`quantcal.models.ablation.ABLATION_VARIANTS`, one property changed at matched parameters
and MACs) is scored here, per dataset, width, objective, seed, quantized precision and
recalibrator (``none`` and ``temperature`` where the study has them), from the cached logits:

    ECE-rise contrast = [ECE(v, q) − ECE(v, fp32)] − [ECE(b, q) − ECE(b, fp32)]

(and the same for the accuracy drop, ``[acc(v, fp32) − acc(v, q)] − [acc(b, fp32) − acc(b, q)]``),
where ``v`` is the variant and ``b`` the base. All four models are scored on the same test
images, so one paired bootstrap over the images (:func:`quantcal.metrics.paired_bootstrap_contrast`)
gives the interval with the test set's sampling noise cancelled. A positive ECE-rise contrast
means the property makes calibration more fragile under quantization. The interval holds the
test-image noise of one training run; across seeds each contrast is given per seed (training
variance is visible only with several seeds).
"""

from __future__ import annotations

from typing import Any

__all__ = ["RECALS", "contrasts"]

#: The recalibrators the ablation is scored with (those the study has).
RECALS = ("none", "temperature")


def _estimate(t: tuple[float, float, float]) -> dict[str, float]:
    return {"value": float(t[0]), "lo": float(t[1]), "hi": float(t[2])}


def contrasts(runner: Any, plan: list) -> list[dict[str, Any]]:
    """One record per (dataset, width, objective, seed, variant, precision, recalibrator) of a
    study's ablation models whose cells are cached; ``[]`` when the study has no
    ``ablation_base`` beside a variant. Each record holds ``ece_rise`` and ``accuracy_drop``
    (``variant``, ``base`` and ``contrast``, each ``{"value", "lo", "hi"}``), ``property``,
    ``value`` and ``n_test``."""
    from quantcal.calibration import metrics
    from quantcal.calibration.recal_splits import crossfit_folds, recalibrate
    from quantcal.models.ablation import ABLATION_BASE, ABLATION_VARIANTS, BASE_PROPERTIES

    cfg = runner.config
    recals = [m for m in RECALS if m in cfg.recal]
    groups: dict[tuple, dict[str, tuple]] = {}
    for g, cells in plan:
        arch = g.model.arch.lower()
        if arch not in ABLATION_VARIANTS:
            continue
        ident = (g.dataset, float(g.model.width), g.objective, g.seed)
        groups.setdefault(ident, {})[arch] = (g, cells)
    out: list[dict[str, Any]] = []
    for (dataset, width, objective, seed), members in groups.items():
        if ABLATION_BASE not in members or len(members) < 2:
            continue
        logits: dict[str, dict[tuple[str, str], Any]] = {}
        labels: dict[str, Any] = {}
        for arch, (g, cells) in members.items():
            tkey = runner.train_key(g)
            fp32 = runner.cached_logits(cells[0], tkey)
            if fp32 is None:
                continue
            fit = runner.recal_fit(g)[0]
            per: dict[str, Any] = {}
            for cell in cells:
                if cell.precision.startswith("plan:") or cell.sample not in (None, 0):
                    continue
                if not cell.is_fp32 and (
                    cell.observer != cfg.observers[0] or cell.method != cfg.quant_methods[0]
                ):
                    continue
                lg = fp32 if cell.is_fp32 else runner.cached_logits(cell, tkey)
                if lg is None:
                    continue
                for method in recals:
                    folds = None
                    if fit == "test_crossfit" and method != "none":
                        folds = crossfit_folds(lg["test_labels"], g.seed)
                    z, _ = recalibrate(method, lg, fp32, [], None, folds)
                    per[(cell.precision, method)] = z
            logits[arch] = per
            labels[arch] = fp32["test_labels"]
        where = f"{dataset} width {width:g} seed {seed}"
        for arch in members:
            if arch not in logits:  # its fp32 cell failed: its rows are error rows already
                runner.say(f"note   ablation ({where}): {arch} has no fp32 logits; not compared")
        base = logits.get(ABLATION_BASE)
        if base is None:
            continue
        y = labels[ABLATION_BASE]
        for arch, per in logits.items():
            if arch == ABLATION_BASE:
                continue
            if labels[arch].shape != y.shape or not bool((labels[arch] == y).all()):
                runner.say(
                    f"note   ablation ({where}): {arch} was scored on other test images than "
                    f"{ABLATION_BASE}; no paired contrast"
                )
                continue
            prop, value = ABLATION_VARIANTS[arch]
            for (precision, method), zq in per.items():
                if precision == "fp32" or (precision, method) not in base:
                    continue
                vf, bq, bf = (
                    per[("fp32", method)],
                    base[(precision, method)],
                    base[("fp32", method)],
                )
                quad = [zq, vf, bq, bf]
                kw = {"n_resamples": max(cfg.bootstrap, 10), "level": cfg.level, "seed": seed}
                ece = {
                    "variant": _estimate(
                        metrics.paired_bootstrap_contrast("ece", quad[:2], [1, -1], y, **kw)
                    ),
                    "base": _estimate(
                        metrics.paired_bootstrap_contrast("ece", quad[2:], [1, -1], y, **kw)
                    ),
                    "contrast": _estimate(
                        metrics.paired_bootstrap_contrast("ece", quad, [1, -1, -1, 1], y, **kw)
                    ),
                }
                acc = {
                    "variant": _estimate(
                        metrics.paired_bootstrap_contrast("accuracy", quad[:2], [-1, 1], y, **kw)
                    ),
                    "base": _estimate(
                        metrics.paired_bootstrap_contrast("accuracy", quad[2:], [-1, 1], y, **kw)
                    ),
                    "contrast": _estimate(
                        metrics.paired_bootstrap_contrast("accuracy", quad, [-1, 1, 1, -1], y, **kw)
                    ),
                }
                out.append(
                    {
                        "dataset": dataset,
                        "width": width,
                        "objective": objective,
                        "seed": seed,
                        "variant": arch,
                        "property": prop,
                        "value": value,
                        "base_value": BASE_PROPERTIES.get(prop, "-"),
                        "precision": precision,
                        "recal": method,
                        "ece_rise": ece,
                        "accuracy_drop": acc,
                        "n_test": int(y.shape[0]),
                    }
                )
    return out
