"""``quantcal compare RUN_A RUN_B``: two runs side by side, paired where they share test images.

Cells are matched by identity (dataset, arch, width, objective, seed, precision, range estimator,
range-calibration sample 0, recalibrator). Each run's recalibrated test logits are rebuilt from
its cache (:func:`quantcal.study.recalibrated_test_logits`). Where both cells scored the same
test images (equal label vectors), the difference B − A of each metric comes with a **paired**
bootstrap interval (one set of resampled images scores both, so the shared sampling noise
cancels; :func:`quantcal.metrics.paired_bootstrap_diff`). Otherwise the two were measured on
different images, and the difference's interval combines the two bootstrap intervals as if
independent (half-widths added in quadrature), and says so.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

__all__ = ["compare_runs", "format_comparison"]


def _identity() -> tuple[str, ...]:
    """The leading columns of results.csv that name a cell and its recalibrator (clean test:
    the compared logits are the cells' clean test logits, so ``shift`` is not among them)."""
    from quantcal.findings.rows import RESULT_COLUMNS

    return tuple(c for c in RESULT_COLUMNS[: RESULT_COLUMNS.index("recal") + 1] if c != "shift")


METRICS = ("ece", "accuracy", "nll", "brier")


def _recalibrated(run: str | Path) -> dict[tuple, tuple[Any, Any]]:
    """A run's recalibrated test logits by cell identity: from its cache (a study, an eval of
    a checkpoint) or from the predictions an eval of given logits or ONNX keeps."""
    from quantcal.study import evaluate
    from quantcal.study import runner as study

    if (Path(run) / evaluate.GIVEN_FILE).is_file():
        return evaluate.recalibrated_given_logits(run)
    return study.recalibrated_test_logits(run)


def _interval(metric: str, z, y, n_resamples: int, seed: int, n_bins: int):
    from quantcal.calibration import metrics

    value = metrics.calibration_report(z, y, n_bins=n_bins)[metric]
    lo, hi = metrics.bootstrap_ci(metric, z, y, n_resamples=n_resamples, seed=seed, n_bins=n_bins)
    return value, lo, hi


def compare_runs(
    run_a: str | Path,
    run_b: str | Path,
    *,
    metric: str = "ece",
    n_resamples: int = 1000,
    seed: int = 0,
    n_bins: int = 15,
) -> dict[str, Any]:
    """``{"rows": [...], "only_a": [identity], "only_b": [identity]}``; each row holds the
    identity, ``a`` and ``b`` (the metric of each run), ``diff`` = b − a with ``lo`` and ``hi``,
    ``paired`` (True when both scored the same test images) and ``n_test``."""
    from quantcal.calibration import metrics

    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    a, b = _recalibrated(run_a), _recalibrated(run_b)
    if not a or not b:
        empty = run_a if not a else run_b
        raise ValueError(f"{empty} has no cached logits to compare (is it a finished run?)")
    identity = _identity()
    rows = []
    for key in [k for k in a if k in b]:
        (za, ya), (zb, yb) = a[key], b[key]
        paired = ya.shape == yb.shape and bool((ya == yb).all())
        va, lo_a, hi_a = _interval(metric, za, ya, n_resamples, seed, n_bins)
        vb, lo_b, hi_b = _interval(metric, zb, yb, n_resamples, seed, n_bins)
        if paired:
            diff, lo, hi = metrics.paired_bootstrap_diff(
                metric, zb, za, ya, n_resamples=n_resamples, seed=seed, n_bins=n_bins
            )
        else:
            diff = vb - va
            half = math.hypot((hi_a - lo_a) / 2, (hi_b - lo_b) / 2)
            lo, hi = diff - half, diff + half
        rows.append(
            {
                **dict(zip(identity, key)),
                "a": va,
                "a_lo": lo_a,
                "a_hi": hi_a,
                "b": vb,
                "b_lo": lo_b,
                "b_hi": hi_b,
                "diff": diff,
                "lo": lo,
                "hi": hi,
                "paired": paired,
                "n_test": int(ya.shape[0]),
            }
        )
    return {
        "metric": metric,
        "rows": rows,
        "only_a": [dict(zip(identity, k)) for k in a if k not in b],
        "only_b": [dict(zip(identity, k)) for k in b if k not in a],
    }


def _label(r: dict[str, Any]) -> str:
    from quantcal.findings.rows import dataset_label, model_label

    cell = f"{dataset_label(r['dataset'])} / {model_label(r)} {r['precision']}"
    if r["observer"] != "-":
        cell += f" {r['observer']}"
    if r.get("method") not in (None, "-", "ptq"):
        cell += f" {r['method']}"
    return cell + (f" seed {r['seed']}" if r["seed"] else "")


def format_comparison(result: dict[str, Any], name_a: str = "A", name_b: str = "B") -> str:
    """A plain-text table: one line per matched cell and recalibrator; ``*`` marks a difference
    whose interval excludes 0; cells only in one run are listed after it."""
    metric = result["metric"]
    scale = 100.0 if metric in ("ece", "accuracy") else 1.0
    unit = " %" if scale == 100.0 else ""
    lines = [
        f"{metric}{unit}: {name_b} − {name_a}, 95 % interval "
        "(paired over the same test images where marked 'paired')",
        f"{'cell':44s} {'recal':17s} {name_a[:9]:>9s} {name_b[:9]:>9s} {'B − A':>8s} "
        f"{'interval':>19s}",
    ]
    for r in result["rows"]:
        sig = "*" if r["lo"] > 0 or r["hi"] < 0 else " "
        lines.append(
            f"{_label(r)[:44]:44s} {r['recal'][:17]:17s} {scale * r['a']:9.2f} "
            f"{scale * r['b']:9.2f} {scale * r['diff']:+8.2f} "
            f"[{scale * r['lo']:+7.2f}, {scale * r['hi']:+7.2f}]{sig} "
            f"{'paired' if r['paired'] else 'unpaired'}"
        )
    for side, name in (("only_a", name_a), ("only_b", name_b)):
        cells = sorted({f"{_label(r)} {r['recal']}" for r in result[side]})
        if cells:
            lines.append(f"only in {name} ({len(cells)}): " + "; ".join(cells))
    return "\n".join(lines) + "\n"
