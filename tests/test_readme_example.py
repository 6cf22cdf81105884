"""The README's "Python API in ten lines" runs as written (the public names it uses are the
stable API that the package layout must keep: ``quantcal.data``, ``metrics``, ``models``,
``quant``, ``recal``, ``train``)."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _example() -> str:
    text = README.read_text(encoding="utf-8")
    section = text.split("## Python API in ten lines", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "the README's Python API section has no python block"
    return match.group(1)


def test_the_readme_python_example_runs_as_written():
    code = _example()
    assert len([ln for ln in code.splitlines() if ln.strip()]) <= 13  # "ten lines", give or take
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(README), "exec"), {"__name__": "readme_example"})
    first, second = out.getvalue().strip().splitlines()
    ece, ece_ts, temperature = (float(x) for x in first.split())
    assert 0 <= ece <= 1 and 0 <= ece_ts <= 1 and temperature > 0
    estimate, lo, hi = (float(x) for x in second.strip("()").split(","))
    assert lo <= estimate <= hi
