"""Mutation testing of quantcal's core: each core module mutated against its own tests.

Usage (from the repository root, after the README's set-up; ``make mutation`` does both)::

    python mutation/run.py                 # every group in mutation/groups.toml
    python mutation/run.py metrics recal   # some groups
    python mutation/run.py --report        # re-read the last results without running

For each group of ``groups.toml`` (modules, and the test files that are their own tests) it
prepares ``build/mutation/GROUP/`` (a copy of ``src/``, ``tests/`` and ``pyproject.toml``
whose ``[tool.mutmut]`` names that group), runs ``mutmut run`` there and reads the outcome of
every mutant. A mutant is *killed* when a test fails (or times out) on it and *survives* when
every test passes. Each survivor must be listed, with the reason, in
``mutation/survivors/GROUP.toml``: either a mutant that cannot change behaviour (equivalent) or
one whose change no test can observe for a stated reason. The listing records the mutated lines,
so an entry that no longer describes its mutant (the source changed and mutmut renumbered) is
reported as stale instead of silently excusing another mutant.

Scores printed per group and overall:

* ``raw``   = killed / tested mutants (mutmut's own score);
* ``score`` = killed / (tested − listed equivalent), the mutation score of the literature,
  which leaves out mutants that no test could ever kill.

Exit status 0 when every survivor is listed and the overall score is at least ``--min-score``
(default 95), 1 otherwise. Not part of CI: a full run takes about 15 minutes on two cores.
Results are written to ``build/mutation/summary.json``.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

try:
    from tomllib import loads as toml_loads
except ModuleNotFoundError:  # Python 3.10
    from tomli import loads as toml_loads

ROOT = Path(__file__).resolve().parent.parent
HERE = ROOT / "mutation"
WORK = ROOT / "build" / "mutation"
# a crash of the test process is a detected fault too
KILLED = {"killed", "timeout", "segfault"}
# mutmut statuses that count as a surviving mutant (untested code survives too)
SURVIVED = {"survived", "no tests"}


def load_groups() -> dict[str, dict]:
    """``groups.toml``: ``[group.NAME] modules = [...]; tests = [...]``."""
    data = toml_loads((HERE / "groups.toml").read_text())
    groups = data["group"]
    for name, g in groups.items():
        for path in g["modules"] + g["tests"]:
            if not (ROOT / path).is_file():
                raise SystemExit(
                    f"mutation/groups.toml: group {name!r} names {path}, which does "
                    "not exist; fix the path"
                )
    return groups


def load_survivors(group: str) -> dict[str, dict]:
    """``survivors/GROUP.toml``: ``["MUTANT"] reason = "..."; kind = "equivalent"|"unobservable";
    change = "the mutated lines"``."""
    path = HERE / "survivors" / f"{group}.toml"
    if not path.exists():
        return {}
    data = toml_loads(path.read_text())
    for name, entry in data.items():
        if entry.get("kind") not in ("equivalent", "unobservable") or not entry.get("reason"):
            raise SystemExit(
                f'{path}: {name} needs kind = "equivalent" or "unobservable" and a reason'
            )
    return data


def _pyproject(group: dict) -> str:
    """The repository's pyproject.toml with a ``[tool.mutmut]`` for this group."""
    text = (ROOT / "pyproject.toml").read_text()
    text = text.split("\n[tool.mutmut]")[0]
    quoted = ", ".join(json.dumps(m) for m in group["modules"])
    tests = ", ".join(json.dumps(t) for t in group["tests"])
    return text + (
        "\n[tool.mutmut]\n"
        'source_paths = ["src"]\n'
        f"only_mutate = [{quoted}]\n"
        f"pytest_add_cli_args_test_selection = [{tests}]\n"
        'pytest_add_cli_args = ["-p", "no:randomly", "-q"]\n'
        'process_isolation = "fork"\n'
    )


def prepare(name: str, group: dict) -> Path:
    """A fresh work folder for one group (mutmut writes ``mutants/`` beside the sources)."""
    work = WORK / name
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    shutil.copytree(
        ROOT / "src", work / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
    )
    shutil.copytree(ROOT / "tests", work / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    (work / "pyproject.toml").write_text(_pyproject(group))
    return work


def run_group(name: str, group: dict, jobs: int) -> None:
    work = prepare(name, group)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    t0 = time.monotonic()
    with open(work / "mutmut.log", "wb") as log:
        rc = subprocess.run(
            [sys.executable, "-m", "mutmut", "run", "--max-children", str(jobs)],
            cwd=work,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        ).returncode
    (work / "wall_s").write_text(f"{time.monotonic() - t0:.0f}\n")
    if rc != 0:
        tail = (work / "mutmut.log").read_bytes()[-2000:].decode(errors="replace")
        raise SystemExit(
            f"mutmut failed for group {name!r} (exit {rc}); the end of "
            f"{work / 'mutmut.log'}:\n{tail}"
        )


def statuses(name: str) -> dict[str, str]:
    """Every mutant of a group and its outcome, from ``mutmut results --all true``."""
    work = WORK / name
    out = subprocess.run(
        [sys.executable, "-m", "mutmut", "results", "--all", "true"],
        cwd=work,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    result = {}
    for line in out.splitlines():
        m = re.match(r"\s*(\S+__mutmut_\d+): (.+)$", line)
        if m:
            result[m.group(1)] = m.group(2).strip()
    return result


def _functions(path: Path) -> dict[str, str]:
    """Source of every function in a mutated file, by name (mutants are ``NAME__mutmut_K``)."""
    text = path.read_text()
    lines = text.splitlines()
    found = {}
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found[node.name] = "\n".join(lines[node.lineno - 1 : node.end_lineno])
    return found


def changes(name: str, group: dict, mutants: list[str]) -> dict[str, str]:
    """The lines each mutant changes, as ``- old`` / ``+ new`` (blank lines and the name
    dropped), read from mutmut's mutated copy of the module."""
    work = WORK / name / "mutants"
    sources: dict[str, dict[str, str]] = {}
    for module in group["modules"]:
        dotted = module.removeprefix("src/").removesuffix(".py").replace("/", ".")
        sources[dotted] = _functions(work / module)
    out = {}
    for mutant in mutants:
        module = next(
            m for m in sorted(sources, key=len, reverse=True) if mutant.startswith(m + ".")
        )
        func = mutant[len(module) + 1 :]
        base = func.rsplit("__mutmut_", 1)[0]
        orig = sources[module].get(base + "__mutmut_orig", "").splitlines()
        new = sources[module].get(func, "").splitlines()
        orig = [line.replace(base + "__mutmut_orig", "F") for line in orig]
        new = [line.replace(func, "F") for line in new]
        diff = [
            d
            for d in difflib.unified_diff(orig, new, lineterm="", n=0)
            if d[:1] in "+-" and not d.startswith(("+++", "---"))
        ]
        out[mutant] = "\n".join(" ".join(d.split()) for d in diff)
    return out


def summarize(names: list[str], groups: dict[str, dict], min_score: float) -> int:
    total = {"killed": 0, "tested": 0, "equivalent": 0}
    report: dict[str, dict] = {}
    problems = []
    for name in names:
        if not (WORK / name / "mutants").exists():
            problems.append(f"{name}: no results; run `python mutation/run.py {name}`")
            continue
        st = statuses(name)
        listed = load_survivors(name)
        survivors = sorted(m for m, s in st.items() if s in SURVIVED)
        diffs = changes(name, groups[name], survivors + [m for m in listed if m in st])
        unexplained, stale = [], []
        for m in survivors:
            entry = listed.get(m)
            if entry is None:
                unexplained.append(m)
            elif " ".join(entry.get("change", "").split()) != " ".join(diffs[m].split()):
                stale.append(m)
        for m in listed:
            if m not in st:
                stale.append(m)
            elif st[m] in KILLED:
                stale.append(m)  # a test kills it now: take it off the list
        killed = sum(s in KILLED for s in st.values())
        tested = sum(s in KILLED | SURVIVED for s in st.values())
        other = {
            s: n
            for s in set(st.values()) - KILLED - SURVIVED
            if (n := sum(v == s for v in st.values()))
        }
        equivalent = sum(
            1
            for m in survivors
            if m in listed and m not in stale and listed[m]["kind"] == "equivalent"
        )
        raw = 100.0 * killed / tested if tested else 100.0
        score = 100.0 * killed / (tested - equivalent) if tested > equivalent else 100.0
        wall = (
            (WORK / name / "wall_s").read_text().strip()
            if (WORK / name / "wall_s").exists()
            else "?"
        )
        report[name] = {
            "mutants": len(st),
            "killed": killed,
            "tested": tested,
            "survived": len(survivors),
            "equivalent": equivalent,
            "unobservable": len(survivors)
            - equivalent
            - len(unexplained)
            - len([m for m in stale if m in survivors]),
            "unexplained": unexplained,
            "stale": sorted(set(stale)),
            "other": other,
            "raw": round(raw, 2),
            "score": round(score, 2),
            "wall_s": wall,
        }
        for k in total:
            total[k] += report[name][k]
        print(
            f"{name:14s} {len(st):5d} mutants  {killed:5d} killed  {len(survivors):4d} survived"
            f" ({equivalent} equivalent)  raw {raw:5.1f}%  score {score:5.1f}%  {wall} s"
            + (f"  other: {other}" if other else "")
        )
        if other:
            problems.append(
                f"{name}: mutants with no verdict {other} (not checked: the run "
                "stopped or no test covers the group; suspicious: a flaky test); "
                f"see {WORK / name / 'mutmut.log'}"
            )
        for m in unexplained:
            problems.append(
                f"{name}: unexplained survivor {m}\n    " + diffs[m].replace("\n", "\n    ")
            )
        for m in sorted(set(stale)):
            why = (
                "is killed now"
                if st.get(m) in KILLED
                else ("no longer exists" if m not in st else "changed")
            )
            problems.append(
                f"{name}: survivors/{name}.toml entry {m} {why}"
                + (
                    f"; the mutant now reads:\n    {diffs[m]}"
                    if m in diffs and st.get(m) in SURVIVED
                    else ""
                )
            )
    raw = 100.0 * total["killed"] / total["tested"] if total["tested"] else 100.0
    denom = total["tested"] - total["equivalent"]
    score = 100.0 * total["killed"] / denom if denom else 100.0
    print(
        f"{'all':14s} {total['tested']:5d} tested   {total['killed']:5d} killed  "
        f"raw {raw:5.1f}%  score {score:5.1f}% (equivalent mutants left out: "
        f"{total['equivalent']})"
    )
    WORK.mkdir(parents=True, exist_ok=True)
    (WORK / "summary.json").write_text(
        json.dumps(
            {"groups": report, "raw": round(raw, 2), "score": round(score, 2), **total}, indent=1
        )
    )
    for p in problems:
        print(p)
    if score < min_score:
        print(f"score {score:.1f}% is below {min_score}%")
    return 0 if not problems and score >= min_score else 1


def main(argv: list[str] | None = None) -> int:
    if hasattr(signal, "SIGPIPE"):  # `run.py --report | head` ends quietly
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("groups", nargs="*", help="groups of mutation/groups.toml (default: all)")
    ap.add_argument(
        "--jobs",
        type=int,
        default=os.cpu_count() or 1,
        help="mutants tested at once (default: the CPU count)",
    )
    ap.add_argument("--report", action="store_true", help="only read the results of the last run")
    ap.add_argument("--min-score", type=float, default=95.0)
    args = ap.parse_args(argv)
    groups = load_groups()
    names = args.groups or list(groups)
    unknown = [n for n in names if n not in groups]
    if unknown:
        ap.error(f"unknown group(s) {unknown}; the groups are {list(groups)}")
    if not args.report:
        for name in names:
            print(f"mutation: {name} ...", flush=True)
            run_group(name, groups[name], args.jobs)
    return summarize(names, groups, args.min_score)


if __name__ == "__main__":
    sys.exit(main())
