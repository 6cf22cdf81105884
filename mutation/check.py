"""Does a test kill a mutant? Run some tests against mutants of the last ``run.py`` of a group.

Usage (from the repository root)::

    python mutation/check.py GROUP TESTS... [--mutant NAME ...]

``TESTS`` are pytest arguments (files, ``file::test``, ``-k EXPR``) taken from the working tree,
so a test written a minute ago can be tried without re-running the group. Without ``--mutant``
every survivor of the last run that ``survivors/GROUP.toml`` does not list is tried. Prints
``killed`` or ``survived`` per mutant, with the mutated lines. The mutated sources are those of
the last ``run.py GROUP``: after a change to a core module, run the group again.

PyTorch and the mutated package are imported once; each mutant then runs in a forked child
(as mutmut itself does), so a mutant costs its tests, not an interpreter start.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # mutation/run.py, beside this file; imports nothing of quantcal


def _in_child(name: str, tests: list[str], timeout: float) -> str:
    """Run ``tests`` with mutant ``name`` active in a forked child: killed, survived or
    timeout (a mutant that hangs is detected, as in mutmut)."""
    import pytest

    pid = os.fork()
    if pid == 0:  # the child: quiet, the mutant switched on, pytest, exit with its status
        os.environ["MUTANT_UNDER_TEST"] = name
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.dup2(null, 2)
        try:
            rc = int(
                pytest.main(["-q", "-x", "-p", "no:randomly", "-p", "no:cacheprovider", *tests])
            )
        except BaseException:
            rc = 3
        os._exit(rc)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return "survived" if os.waitstatus_to_exitcode(status) in (0, 5) else "killed"
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return "timeout"
        time.sleep(0.02)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("group")
    ap.add_argument("tests", nargs="+", help="pytest arguments: test files, -k EXPR, ...")
    ap.add_argument(
        "--mutant",
        action="append",
        default=[],
        help="a mutant's name (repeatable); default: the unexplained survivors",
    )
    ap.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        help="seconds before a mutant's run counts as hung (killed by timeout)",
    )
    args, extra = ap.parse_known_args(argv)  # pytest's own options (-k EXPR, -m ...) pass through
    args.tests += extra
    groups = run.load_groups()
    if args.group not in groups:
        ap.error(f"unknown group {args.group!r}; the groups are {list(groups)}")
    mutants_dir = run.WORK / args.group / "mutants"
    if not mutants_dir.exists():
        ap.error(f"no results for {args.group!r}; run `python mutation/run.py {args.group}`")
    if args.mutant:
        names = args.mutant
    else:
        listed = run.load_survivors(args.group)
        names = sorted(
            m for m, s in run.statuses(args.group).items() if s in run.SURVIVED and m not in listed
        )
    diffs = run.changes(args.group, groups[args.group], names)
    # the mutated copy first on the path, then import what every test needs, once
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["PYTHONPATH"] = str(mutants_dir / "src")
    sys.path.insert(0, str(mutants_dir / "src"))
    os.chdir(run.ROOT)
    import torch  # noqa: F401

    import quantcal  # noqa: F401

    survived = 0
    for name in names:
        outcome = _in_child(name, args.tests, args.timeout)
        survived += outcome == "survived"
        print(
            f"{outcome:8s} {name}\n    " + diffs.get(name, "?").replace("\n", "\n    "), flush=True
        )
    print(f"{len(names) - survived} of {len(names)} killed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
