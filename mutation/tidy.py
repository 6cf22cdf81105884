"""Bring ``survivors/GROUP.toml`` up to date after a re-run of the group.

Usage: ``python mutation/tidy.py GROUP``

* an entry whose mutant is killed now is dropped;
* an entry whose mutant was renumbered (a source edit earlier in the same function) moves to
  the new number when exactly one unexplained survivor of that function makes the same change;
* an entry whose function moved to another module (or lost its leading underscore when it
  became public) follows it: the survivors of a function of that name that make the same change
  (identifiers compared without their leading underscores), paired in mutant-number order when
  their count equals the stale entries' count;
* the survivors still unexplained are printed with their changes, to kill or list by hand.

The reasons are kept as written: read the moved entries (``git diff``) before committing.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # mutation/run.py


def _norm(text: str) -> str:
    return " ".join(text.split())


def _public(text: str) -> str:
    """``text`` with identifiers' leading underscores dropped (``_bin_mass`` -> ``bin_mass``)."""
    return re.sub(r"(?<![\w.])_+(?=[A-Za-z])", "", _norm(text))


def _base(mutant: str) -> str:
    return mutant.rsplit("__mutmut_", 1)[0]


def _number(mutant: str) -> int:
    return int(mutant.rsplit("__mutmut_", 1)[1])


def _function(mutant: str) -> str:
    """The mutated function's name without its module (``x_bin_mass``, ``xǁClassǁmethod``)."""
    leaf = _base(mutant).rsplit(".", 1)[-1]
    return _public(leaf[2:]) if leaf.startswith("x_") else _public(leaf)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    groups = run.load_groups()
    if len(argv) != 1 or argv[0] not in groups:
        print(f"usage: python mutation/tidy.py GROUP (one of {list(groups)})", file=sys.stderr)
        return 2
    group = argv[0]
    path = run.HERE / "survivors" / f"{group}.toml"
    listed = run.load_survivors(group)
    st = run.statuses(group)
    survivors = sorted(m for m, s in st.items() if s in run.SURVIVED)
    diffs = run.changes(group, groups[group], survivors)

    def describes(entry: dict, mutant: str) -> bool:
        return _norm(entry.get("change", "")) == _norm(diffs.get(mutant, ""))

    keep = {m: e for m, e in listed.items() if m in diffs and describes(e, m)}
    stale = [m for m in listed if m not in keep]
    unexplained = [m for m in survivors if m not in keep]
    moved = 0
    for m in unexplained:
        same = [s for s in stale if _base(s) == _base(m) and describes(listed[s], m)]
        if len(same) == 1:
            keep[m] = listed[same[0]]
            stale.remove(same[0])
            moved += 1
    # Moved to another module, or made public: the same function name and the same change. A
    # function with several identical changes (k sites of ``stacklevel=2``) pairs its k stale
    # entries with its k survivors in mutant-number order; any other count is left to a person.
    left = [m for m in unexplained if m not in keep]

    def moved_key(mutant: str, change: str) -> tuple[str, str]:
        return _function(mutant), _public(change)

    for m in left:
        if m in keep:
            continue
        k = moved_key(m, diffs.get(m, ""))
        olds = sorted(
            (s for s in stale if moved_key(s, listed[s].get("change", "")) == k), key=_number
        )
        news = sorted((n for n in left if moved_key(n, diffs.get(n, "")) == k), key=_number)
        if olds and len(olds) == len(news):
            for old, new in zip(olds, news, strict=True):
                keep[new] = listed[old]
                stale.remove(old)
                moved += 1
    head = [
        line
        for line in (path.read_text().splitlines() if path.exists() else [])
        if line.startswith("#")
    ]
    blocks = [
        f"[{json.dumps(m, ensure_ascii=False)}]\n"
        f"kind = {json.dumps(e['kind'])}\n"
        f"reason = {json.dumps(e['reason'], ensure_ascii=False)}\n"
        f"change = {json.dumps(diffs[m], ensure_ascii=False)}\n"
        for m, e in sorted(keep.items())
    ]
    path.write_text("\n".join(head) + ("\n\n" if head else "") + "\n".join(blocks))
    left = [m for m in unexplained if m not in keep]
    print(f"{path}: {moved} moved to a new number, {len(stale)} dropped, {len(left)} unexplained")
    for m in left:
        print(f"  {m}\n    " + diffs[m].replace("\n", "\n    "))
    return 0 if not left else 1


if __name__ == "__main__":
    sys.exit(main())
