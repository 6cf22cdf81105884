"""Result rows: selection, labels, formatting, and the one way seeds are aggregated.

The rows are those of ``results.csv`` as :func:`quantcal.report.load_rows` reads them (numbers
parsed, empty cells None). The report, the claims and the verdicts all select and aggregate rows
through these functions, so that a study with several seeds is treated the same everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import PurePath
from statistics import NormalDist

__all__ = [
    "RESULT_COLUMNS",
    "Estimate",
    "aggregate",
    "clean_rows",
    "dataset_label",
    "groups",
    "is_clean",
    "main_rows",
    "model_label",
    "ok",
    "pct",
    "pick",
    "prec_key",
    "shifted_rows",
]

#: Columns of results.csv, in order (one row per dataset, arch, width, training objective, seed,
#: precision, observer, quantization method, range-calibration sample, test shift ("clean" or a
#: corruption "name:severity") and recalibration method).
RESULT_COLUMNS = (
    "dataset",
    "arch",
    "width",
    "objective",
    "seed",
    "precision",
    "observer",
    "method",
    "ptq_sample",
    "shift",
    "recal",
    "recal_fit",
    "status",
    "error",
    "notes",
    "accuracy",
    "accuracy_lo",
    "accuracy_hi",
    "ece",
    "ece_lo",
    "ece_hi",
    "mce",
    "adaptive_ece",
    "classwise_ece",
    "debiased_ece",
    "ece_l2",
    "smooth_ece",
    "nll",
    "brier",
    "mean_confidence",
    "temperature",
    "ece_diff_vs_fp32",
    "ece_diff_vs_fp32_lo",
    "ece_diff_vs_fp32_hi",
    "ece_diff_vs_none",
    "ece_diff_vs_none_lo",
    "ece_diff_vs_none_hi",
    "aurc",
    "aurc_lo",
    "aurc_hi",
    "excess_aurc",
    "excess_aurc_diff_vs_fp32",
    "excess_aurc_diff_vs_fp32_lo",
    "excess_aurc_diff_vs_fp32_hi",
    "failure_auroc",
    "failure_fpr95",
    "threshold_outcome",
    "threshold",
    "threshold_risk",
    "threshold_coverage",
    "threshold_reset_risk",
    "threshold_reset_coverage",
    "ece_shift_interaction",
    "ece_shift_interaction_lo",
    "ece_shift_interaction_hi",
    "aurc_shift_interaction",
    "aurc_shift_interaction_lo",
    "aurc_shift_interaction_hi",
    "params",
    "macs",
    "weight_bytes",
    "bops",
    "quantized_layers",
    "n_test",
    "n_fit",
    "n_classes",
    "n_bins",
    "row_id",
)

_PREC_ORDER = {"fp32": 0, "W8A8": 1, "W4A8": 2, "W4A4": 3}


def prec_key(p: str) -> tuple:
    """Sort key: fp32, W8A8, W4A8, W4A4, other precisions from most to fewest bits, then the
    mixed-precision plans (plan:calib, plan:accuracy)."""
    if p in _PREC_ORDER:
        return (_PREC_ORDER[p], p)
    if p.startswith("plan:"):  # mixed-precision plans after the uniform precisions
        kinds = ("plan:calib", "plan:accuracy")
        return (50, kinds.index(p) if p in kinds else len(kinds), p)
    w, _, a = p.upper().lstrip("W").partition("A")
    try:
        return (10, -int(w), -int(a))
    except ValueError:
        return (99, p)


def ok(rows: Iterable[dict]) -> list[dict]:
    """The rows whose cell computed."""
    return [r for r in rows if r.get("status") == "ok"]


def is_clean(r: dict) -> bool:
    """Whether a row was scored on the clean test split (a results.csv from before the
    ``shift`` column has only such rows)."""
    return (r.get("shift") or "clean") == "clean"


def clean_rows(rows: Iterable[dict]) -> list[dict]:
    """The rows scored on the clean test split."""
    return [r for r in rows if is_clean(r)]


def shifted_rows(rows: Iterable[dict]) -> list[dict]:
    """The rows scored on a corrupted copy of test (``shift`` = "name:severity")."""
    return [r for r in rows if not is_clean(r)]


def main_rows(rows: list[dict]) -> list[dict]:
    """One row per (dataset, arch, width, objective, seed, precision, recal): the first range
    estimator, quantization method and range-calibration sample (fp32 rows have none)."""
    obs = [r.get("observer", "-") for r in rows if r.get("observer", "-") != "-"]
    first_obs = obs[0] if obs else "-"
    meths = [r.get("method") or "-" for r in rows if (r.get("method") or "-") != "-"]
    first_meth = meths[0] if meths else "-"
    return [
        r
        for r in ok(rows)
        if r.get("observer", "-") in ("-", first_obs)
        and (r.get("method") or "-") in ("-", first_meth)
        and r.get("ptq_sample", -1) in (-1, 0, None)
    ]


def model_label(r: dict) -> str:
    """``arch@width``, with the training objective when it is not plain cross-entropy."""
    obj = r.get("objective") or "ce"
    return f"{r['arch']}@{r['width']:g}" + ("" if obj == "ce" else f" {obj}")


def groups(rows: list[dict]) -> list[tuple[str, str]]:
    """The (dataset, model label) pairs of the rows, in order of appearance."""
    seen: dict[tuple[str, str], None] = {}
    for r in rows:
        seen.setdefault((r["dataset"], model_label(r)), None)
    return list(seen)


def pick(rows: list[dict], **eq) -> list[dict]:
    """The rows equal to ``eq`` on each key (``model`` compares :func:`model_label`), sorted by
    precision then seed."""
    out = [
        r
        for r in rows
        if all((model_label(r) if k == "model" else r.get(k)) == v for k, v in eq.items())
    ]
    return sorted(out, key=lambda r: (prec_key(r["precision"]), r.get("seed") or 0))


def dataset_label(ds: str) -> str:
    """``npz:/long/path/cifar100.npz`` -> ``npz:cifar100.npz`` for narrow tables."""
    return f"npz:{PurePath(ds[4:]).name}" if ds.startswith("npz:") else ds


def pct(x: float | None, digits: int = 1) -> str:
    """``x`` in percent (or points), ``–`` when missing."""
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.{digits}f}"


@dataclass(frozen=True)
class Estimate:
    """A quantity over one or more seeds: its mean, an interval, and how many seeds."""

    value: float | None
    lo: float | None
    hi: float | None
    n_seeds: int

    def text(self, digits: int = 1, sign: bool = False) -> str:
        """``"12.3 [11.0, 13.6]"`` in percent (points), or ``–``."""
        if self.value is None:
            return "–"
        v = f"{100 * self.value:+.{digits}f}" if sign else pct(self.value, digits)
        if self.lo is None or self.hi is None:
            return v
        return f"{v} [{pct(self.lo, digits)}, {pct(self.hi, digits)}]"

    @property
    def decided(self) -> bool:
        return self.lo is not None and self.hi is not None


def aggregate(rows: list[dict], key: str, level: float = 0.95) -> Estimate:
    """``key`` over the rows of one cell's seeds (one row per seed; rows of the same seed, such
    as several range-calibration samples, are averaged first).

    One seed: its value and its own interval (``key_lo``, ``key_hi``: a bootstrap over test
    images, paired where the column is a difference). Several seeds: the mean of the per-seed
    values; its interval is mean ± z·sqrt(mean(se_s²)/S + s²/S), where se_s is each seed's
    half-interval / z (the test-image variance within a seed) and s² the sample variance of the
    per-seed values (the training variance between seeds), z the normal quantile of ``level``.
    """
    per_seed: dict[object, list[dict]] = {}
    for r in rows:
        if r.get(key) is not None and not (isinstance(r[key], float) and math.isnan(r[key])):
            per_seed.setdefault(r.get("seed"), []).append(r)
    if not per_seed:
        return Estimate(None, None, None, 0)
    z = NormalDist().inv_cdf(0.5 + level / 2)
    values, ses = [], []
    for rs in per_seed.values():
        values.append(sum(r[key] for r in rs) / len(rs))
        halves = [
            (r[f"{key}_hi"] - r[f"{key}_lo"]) / 2
            for r in rs
            if r.get(f"{key}_lo") is not None and r.get(f"{key}_hi") is not None
        ]
        ses.append(sum(halves) / len(halves) / z if halves else None)
    s = len(values)
    mean = sum(values) / s
    if s == 1:
        rs = next(iter(per_seed.values()))
        los = [r.get(f"{key}_lo") for r in rs]
        his = [r.get(f"{key}_hi") for r in rs]
        if None in los or None in his:
            return Estimate(mean, None, None, 1)
        return Estimate(mean, sum(los) / len(los), sum(his) / len(his), 1)
    if None in ses:
        return Estimate(mean, None, None, s)
    between = sum((v - mean) ** 2 for v in values) / (s - 1)
    within = sum(se**2 for se in ses) / s
    half = z * math.sqrt(within / s + between / s)
    return Estimate(mean, mean - half, mean + half, s)
