"""``quantcal run``: run (or resume) a study."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantcal.cli._common import (
    EXIT_STUDY,
    Common,
    add_common,
    add_force,
    common,
    finish,
    parse_set,
)

_EPILOG = """examples:
  quantcal run                                   the embedded demo (digits, 3 architectures)
  quantcal run cifar100_small --dataset npz:/data/cifar100.npz --out runs/c100
  quantcal run my_study.toml --set train.epochs=5 --set quant.observers='["minmax","mse"]'
  quantcal run paper_cifar100 --shard 0/4 --out /shared/paper   # shard 0 of 4 machines
  quantcal run repair --dataset npz:/data/cifar100.npz   # PTQ, CLE+BC, AdaRound, QAT

Re-running the same command resumes: finished stages are read from OUT/cache.
OUT must be new, empty or made by quantcal for the same study (--force adopts another folder,
or replaces another study's results there)."""


@dataclass(frozen=True)
class RunRequest:
    config: Any  # studyconfig.StudyConfig
    out: Path
    shard: tuple[int, int]
    resume: bool
    force: bool
    common: Common


def add_parser(sub: Any) -> None:
    from quantcal.study.config import builtin_studies

    p = sub.add_parser(
        "run",
        help="run (or resume) a study and write results.csv and report.html",
        description="Run a study: train each model, quantize it at each precision, recalibrate, "
        "measure, and write OUT/results.csv, OUT/report.html and OUT/figures/. Without STUDY "
        "the embedded demo runs (scikit-learn digits, offline, a few minutes on 2 CPU cores).",
        epilog=_EPILOG + "\n\n" + EXIT_STUDY,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "study",
        nargs="?",
        default=None,
        help="a .toml study file or a built-in name ("
        + ", ".join(sorted(builtin_studies()))
        + "); default: demo",
    )
    p.add_argument("--out", default=None, help="output folder (default: runs/STUDY_NAME)")
    p.add_argument(
        "--shard",
        default="0/1",
        help="I/N: compute only the I-th of N shares of "
        "the training groups (N machines sharing one --out folder)",
    )
    p.add_argument(
        "--dataset",
        action="append",
        default=None,
        metavar="NAME",
        help="replace the study's datasets (repeatable), e.g. npz:/path/data.npz",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a study key, e.g. train.epochs=5 (value parsed as TOML)",
    )
    p.add_argument(
        "--fresh",
        action="store_true",
        help="discard the cache entries quantcal wrote in OUT/cache and start over",
    )
    add_force(p)
    add_common(p)


def resolve(args: argparse.Namespace) -> RunRequest:
    from quantcal.study import runner as study

    overrides = parse_set(args.set)
    if args.dataset:
        overrides["data.datasets"] = list(args.dataset)
    if args.threads is not None:
        overrides["threads"] = args.threads
    shard = study.parse_shard(args.shard)
    config = study.load_study(args.study, overrides)
    out = Path(args.out) if args.out else Path("runs") / config.name
    return RunRequest(config, out, shard, not args.fresh, bool(args.force), common(args))


def execute(req: RunRequest) -> int:
    from quantcal.study import runner as study

    t0 = time.perf_counter()
    study.run_study(
        req.config,
        req.out,
        resume=req.resume,
        shard=req.shard,
        device=req.common.device,
        quiet=req.common.quiet,
        force=req.force,
        identity={"command": "run", "study": req.config.name},
    )
    return finish(req.out, t0, req.common.quiet)
