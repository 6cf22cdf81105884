"""A study's pinned instruction set holds in a fresh process (as ``quantcal run`` starts), is
recorded, enters the cache keys as what ran, and is named in every row when it could not hold."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

from _studies import tiny
from quantcal import _isa, study

TINY = tiny(name="tiny_isa", isa="avx2")
_PINS = set(_isa.environment("avx2"))


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _PINS}
    env.update(OMP_NUM_THREADS="1", **extra)
    return env


def _python(code: str, env: dict[str, str]) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def _best_isa() -> str:
    return _python(
        "import torch; print(torch.backends.cpu.get_cpu_capability().lower())", _clean_env()
    ).strip()


def _run_in_fresh_process(study_file, out, *, torch_first: bool = False, env=None) -> list[dict]:
    first = "import torch; torch.ones(3).sum(); " if torch_first else ""
    code = (
        f"{first}from quantcal import study; "
        f"study.run_study({str(study_file)!r}, {str(out)!r}, quiet=True, report=False)"
    )
    _python(code, env or _clean_env())
    with open(out / "results.csv", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def study_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("isa") / "tiny_isa.toml"
    path.write_text(study.load_study(TINY).to_toml())
    return path


def test_the_pin_holds_in_a_fresh_process_and_equals_a_preset_environment(study_file, tmp_path):
    if _best_isa() not in ("avx2", "avx512"):
        pytest.skip("this processor has no AVX2")
    pinned = _run_in_fresh_process(study_file, tmp_path / "pinned")
    assert json.loads((tmp_path / "pinned" / "env.json").read_text())["cpu_capability"] == "AVX2"
    assert not any("pins isa" in r["notes"] for r in pinned)
    preset = _run_in_fresh_process(
        study_file, tmp_path / "preset", env=_clean_env(**_isa.environment("avx2"))
    )
    assert [r["ece"] for r in pinned] == [r["ece"] for r in preset]
    assert [r["accuracy"] for r in pinned] == [r["accuracy"] for r in preset]


def test_a_pin_that_cannot_hold_is_named_in_every_row(study_file, tmp_path):
    if _best_isa() != "avx512":
        pytest.skip("needs an AVX-512 processor (the kernels then differ from the pin)")
    rows = _run_in_fresh_process(study_file, tmp_path / "late", torch_first=True)
    assert rows and all("pins isa = avx2 but PyTorch runs AVX512" in r["notes"] for r in rows)
    # ... and its cache keys are not the pinned run's: the two never mix.
    pinned = _run_in_fresh_process(study_file, tmp_path / "late")
    assert not any("pins isa" in r["notes"] for r in pinned)


def test_isa_is_validated_and_round_trips():
    with pytest.raises(ValueError, match="isa must be one of avx2, avx512"):
        study.load_study({**TINY, "isa": "sse4"})
    cfg = study.load_study(TINY)
    assert study.load_study(study.load_study(TINY).to_toml_dict()).isa == cfg.isa == "avx2"
    assert study.load_study("demo").isa == "avx2"
