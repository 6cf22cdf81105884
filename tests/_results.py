"""Hand-made result rows written to a run folder, shared by the report and table tests."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from quantcal.findings.rows import RESULT_COLUMNS
from quantcal.report import html as report


def result_row(arch, precision, recal, ece, diff, lo, hi, acc=0.9, **kw) -> dict:
    """One results.csv row on digits: the given ECE (interval ±0.01), difference vs fp32 with
    its interval, accuracy (±0.02); any other column by keyword."""
    r = dict.fromkeys(RESULT_COLUMNS, "")
    r.update(
        dataset="digits",
        arch=arch,
        width=0.25,
        objective="ce",
        seed=0,
        precision=precision,
        observer="-" if precision == "fp32" else "minmax",
        ptq_sample=-1 if precision == "fp32" else 0,
        recal=recal,
        recal_fit="val",
        status="ok",
        accuracy=acc,
        accuracy_lo=acc - 0.02,
        accuracy_hi=acc + 0.02,
        ece=ece,
        ece_lo=ece - 0.01,
        ece_hi=ece + 0.01,
        debiased_ece=ece / 2,
        nll=0.3 + ece,
        ece_diff_vs_fp32=diff,
        ece_diff_vs_fp32_lo=lo,
        ece_diff_vs_fp32_hi=hi,
        n_test=360,
        n_bins=15,
        params=1000,
        weight_bytes=500,
        row_id=f"{arch}-{precision}-{recal}",
    )
    r.update(kw)
    return r


def write_results(folder: Path, rows: list[dict]) -> list[dict]:
    """results.csv and an empty details.json in ``folder``; the rows as the report reads them."""
    with open(folder / "results.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(RESULT_COLUMNS))
        w.writeheader()
        w.writerows(rows)
    (folder / "details.json").write_text(json.dumps({"reliability": {}, "inspect": []}))
    return report.load_rows(folder)


def hand_row(precision, method, acc, ece, *, half=0.005, **kw) -> dict:
    """One result row as verdicts and claims read it (dataset "d", arch "net"): accuracy with a
    ±0.02 interval, ECE with ±``half``; any other column by keyword."""
    r = {
        "status": "ok",
        "dataset": "d",
        "arch": "net",
        "width": 1.0,
        "objective": "ce",
        "seed": 0,
        "precision": precision,
        "observer": "-" if precision == "fp32" else "minmax",
        "ptq_sample": -1 if precision == "fp32" else 0,
        "recal": method,
        "recal_fit": "val",
        "accuracy": acc,
        "accuracy_lo": acc - 0.02,
        "accuracy_hi": acc + 0.02,
        "ece": ece,
        "ece_lo": ece - half,
        "ece_hi": ece + half,
        "n_test": 10000,
    }
    r.update(kw)
    return r


def paired(d, lo, hi, key="ece_diff_vs_fp32") -> dict:
    """A row's paired difference and its interval, e.g. ``ece_diff_vs_fp32`` and its ends."""
    return {key: d, f"{key}_lo": lo, f"{key}_hi": hi}
