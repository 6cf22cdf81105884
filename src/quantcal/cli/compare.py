"""``quantcal compare``: two finished runs side by side, paired where they share test images."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class CompareRequest:
    run_a: Path
    run_b: Path
    metric: str
    format: str
    bootstrap: int


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "compare",
        help="two finished runs or evals side by side, paired where they share test images",
        description="Match the cells of two runs (dataset, model, objective, seed, precision, "
        "range estimator, recalibrator; range-calibration sample 0) and print a metric of each "
        "with the difference B - A and its 95 % interval: a paired bootstrap over the test "
        "images where both runs scored the same ones, else the two intervals combined as if "
        "independent. Cells found in one run only are listed. Rebuilt from each run's cache.",
        epilog="examples:\n  quantcal compare runs/before runs/after\n  quantcal compare "
        "runs/a runs/b --metric accuracy --format json > diff.json\n\nexit status: 0 the "
        "shared cells compared, 2 a folder is not a finished run or eval, or the two share no "
        "cell",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run_a")
    p.add_argument("run_b")
    p.add_argument("--metric", default="ece", choices=("ece", "accuracy", "nll", "brier"))
    p.add_argument("--format", default="text", choices=("text", "json"))
    p.add_argument("--bootstrap", type=int, default=1000, help="resamples per interval")


def _check_run(d: Path) -> Path:
    if not d.exists():
        raise FileNotFoundError(f"{d} does not exist: give the output folder of a run")
    if not d.is_dir():
        raise ValueError(f"{d} is a file; give the output folder of a run")
    if not (d / "config.toml").is_file():
        raise ValueError(f"{d} is not a quantcal run folder (no config.toml)")
    from quantcal.study.evaluate import GIVEN_FILE

    if not (d / "cache").is_dir() and not (d / GIVEN_FILE).is_file():
        raise ValueError(
            f"{d} has neither cache/ nor {GIVEN_FILE}: compare rebuilds each cell from the "
            "logits a run or an eval keeps (re-run `quantcal run` or `quantcal eval` into it)"
        )
    return d


def resolve(args: argparse.Namespace) -> CompareRequest:
    from quantcal._inputs import check_number

    check_number(args.bootstrap, "--bootstrap", integer=True, minimum=10)
    a, b = _check_run(Path(args.run_a)), _check_run(Path(args.run_b))
    return CompareRequest(a, b, args.metric, args.format, args.bootstrap)


def execute(req: CompareRequest) -> int:
    from quantcal.findings.compare import compare_runs, format_comparison

    result = compare_runs(req.run_a, req.run_b, metric=req.metric, n_resamples=req.bootstrap)
    if not result["rows"]:
        print(
            "quantcal compare: error: the two runs share no cell (dataset, model, seed, "
            "precision, range estimator, recalibrator): nothing to compare",
            file=sys.stderr,
        )
        return 2
    if req.format == "json":
        print(json.dumps(result, indent=1))
    else:
        sys.stdout.write(format_comparison(result, req.run_a.name, req.run_b.name))
    return 0
