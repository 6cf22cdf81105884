"""Does a test kill a mutant? Run some tests against mutants of the last ``run.py`` of a group.

Usage (from the repository root)::

    python mutation/check.py GROUP TESTS... [--mutant NAME ...]

``TESTS`` are pytest arguments (files, ``file::test``, ``-k EXPR``) taken from the working tree,
so a test written a minute ago can be tried without re-running the group. Without ``--mutant``
every survivor of the last run that ``survivors/GROUP.toml`` does not list is tried. Prints
``killed`` or ``survived`` per mutant, with the mutated lines. The mutated sources are those of
the last ``run.py GROUP``: after a change to a core module, run the group again.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("group")
    ap.add_argument("tests", nargs="+", help="pytest arguments: test files, -k EXPR, ...")
    ap.add_argument("--mutant", action="append", default=[],
                    help="a mutant's name (repeatable); default: the unexplained survivors")
    args = ap.parse_args(argv)
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
        names = sorted(m for m, s in run.statuses(args.group).items()
                       if s in run.SURVIVED and m not in listed)
    diffs = run.changes(args.group, groups[args.group], names)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(mutants_dir / "src"))
    survived = 0
    for name in names:
        env["MUTANT_UNDER_TEST"] = name
        rc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:randomly",
                             "-p", "no:cacheprovider", *args.tests], cwd=run.ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
        outcome = "killed" if rc not in (0, 5) else "survived"
        survived += outcome == "survived"
        print(f"{outcome:8s} {name}\n    " + diffs.get(name, "?").replace("\n", "\n    "),
              flush=True)
    print(f"{len(names) - survived} of {len(names)} killed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
