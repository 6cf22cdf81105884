"""The ``quantcal`` command: thin argparse sub-commands over the library, one module each.

Examples::

    quantcal run                                  # the embedded demo study (digits, offline)
    quantcal run cifar100_small --dataset npz:/data/cifar100.npz --out runs/c100
    quantcal run paper_cifar100 --shard 3/8 --out /shared/runs/paper   # one of 8 machines
    quantcal report runs/demo
    quantcal eval --checkpoint model.pt --model shufflenetv2 --width 0.5 --dataset cifar100
    quantcal train --model ghostnet_vgg16 --width 0.25 --dataset digits --epochs 30
    quantcal data download cifar100
    quantcal list

Each command first resolves its arguments into a request (every value checked, options that
do not apply to the chosen path refused, output folders checked for ownership; no work done),
then executes it. :func:`resolve` gives the request without executing, for tests and tools.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from quantcal.cli import compare, eval, eval_parser, misc, plan, report, run, train
from quantcal.cli._common import report_failed_attributions, report_failures, report_notes

__all__ = [
    "build_parser",
    "main",
    "report_failed_attributions",
    "report_failures",
    "report_notes",
    "resolve",
]

#: command -> (resolve(args) -> request, execute(request) -> exit status)
_COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], Any], Callable[[Any], int]]] = {
    "run": (run.resolve, run.execute),
    "train": (train.resolve, train.execute),
    "eval": (eval.resolve, eval.execute),
    "report": (report.resolve, report.execute),
    "compare": (compare.resolve, compare.execute),
    "plan": (plan.resolve, plan.execute),
    "data": (misc.resolve_data, misc.execute_data),
    "list": (misc.resolve_list, misc.execute_list),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="quantcal",
        description="Calibration error of quantized efficient CNNs: train or load a model, "
        "simulate post-training quantization (fp32, W8A8, W4A8, W4A4, ...), measure accuracy "
        "and calibration error with bootstrap intervals, repair confidence with temperature "
        "scaling and other recalibrators, and write a report.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `quantcal COMMAND --help` for the options and exit statuses of each command."
        "\n\nexit status (every command): 0 done, 1 computed but some cells failed (or a file "
        "could not be written), 2 bad input (nothing computed), 130 interrupted",
    )
    from quantcal import __version__

    parser.add_argument("--version", action="version", version=f"quantcal {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    run.add_parser(sub)
    train.add_parser(sub)
    eval_parser.add_parser(sub)
    report.add_parser(sub)
    plan.add_parser(sub)
    compare.add_parser(sub)
    misc.add_parsers(sub)
    return parser


def resolve(argv: Sequence[str]) -> Any:
    """The request ``quantcal ARGV`` would execute: every value checked, nothing computed or
    written. Raises ValueError / FileNotFoundError for bad input (what ``main`` prints with
    exit status 2)."""
    args = build_parser().parse_args(list(argv))
    if args.command is None:
        raise ValueError("no command given")
    return _COMMANDS[args.command][0](args)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``quantcal`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    resolver, executor = _COMMANDS[args.command]
    try:
        request = resolver(args)
        threads = getattr(args, "threads", None)
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        return executor(request)
    except (ValueError, FileNotFoundError) as exc:
        print(f"quantcal {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk, a permission: what was finished is cached
        print(
            f"quantcal {args.command}: error: {exc}. Finished stages are cached; fix the cause "
            "and re-run the same command to resume",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print(
            "\ninterrupted: finished stages are cached; re-run the same command to resume",
            file=sys.stderr,
        )
        return 130
