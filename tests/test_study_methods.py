"""The quantization-method axis of a study: ``[quant] methods``, the ``method`` column, the
repair contrasts and finding, and the failures a method can meet (unknown name, not
applicable to the model)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from quantcal import study
from quantcal.calibration import metrics
from quantcal.findings import claims
from quantcal.report import html as report
from quantcal.study import keys
from quantcal.study.config import from_toml_dict

# A model without an equalizable pair (sigmoid is not positively homogeneous) beside ReLU nets.
_NO_PAIRS = """
import torch
from torch import nn


def build(num_classes, image_size, in_chans, width):
    return nn.Sequential(
        nn.Conv2d(in_chans, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Sigmoid(),
        nn.Conv2d(8, 8, 3, padding=1), nn.Sigmoid(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes),
    )
"""


def _study(tmp_path: Path, **quant) -> dict:
    return {
        "name": "methods",
        "seeds": [0],
        "data": {"datasets": ["digits"]},
        "model": [{"arch": "resnet20", "width": 0.25}],
        "train": {"epochs": 2, "batch_size": 64, "lr": 0.1, "schedule": "cosine"},
        "quant": {
            "precisions": ["fp32", "W4A4"],
            "observers": ["minmax"],
            "methods": ["ptq", "cle_bc", "adaround", "qat"],
            "method_options": {"adaround": {"iterations": 20}, "qat": {"epochs": 1}},
            **quant,
        },
        "recal": {"methods": ["none", "temperature"]},
        "metrics": {"bootstrap": 30},
    }


def _rows(out: Path) -> list[dict]:
    with open(out / "results.csv", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("methods")
    study.run_study(_study(out), out, quiet=True)
    return out


def test_every_method_is_a_cell_with_a_method_column(run):
    rows = _rows(run)
    assert "method" in rows[0]
    q = [r for r in rows if r["precision"] == "W4A4"]
    assert sorted({r["method"] for r in q}) == ["adaround", "cle_bc", "ptq", "qat"]
    assert {r["method"] for r in rows if r["precision"] == "fp32"} == {"-"}
    assert all(r["status"] == "ok" for r in rows) and len(rows) == 2 * (1 + 4)
    # the methods really differ: not one model scored four times
    assert len({r["accuracy"] + r["ece"] for r in q if r["recal"] == "none"}) >= 3


def test_repair_contrasts_are_recomputed_from_cached_logits(run):
    details = json.loads((run / "details.json").read_text())
    recs = details["repair"]
    assert {r["method"] for r in recs} == {"ptq", "cle_bc", "adaround", "qat"}
    logits = study.recalibrated_test_logits(run)

    def z(method: str, precision: str = "W4A4", recal: str = "none"):
        return next(
            v for k, v in logits.items() if k[5] == precision and k[7] == method and k[9] == recal
        )

    rec = next(r for r in recs if r["method"] == "qat" and r["recal"] == "none")
    (zq, y), (zp, _), (zf, _) = z("qat"), z("ptq"), z("-", "fp32")
    assert rec["accuracy_vs_ptq"]["value"] == pytest.approx(
        metrics.accuracy(zq, y) - metrics.accuracy(zp, y), abs=1e-12
    )
    assert rec["ece_gap"]["value"] == pytest.approx(
        metrics.ece(zq, y) - metrics.ece(zf, y), abs=1e-12
    )
    lo, hi = rec["ece_gap"]["lo"], rec["ece_gap"]["hi"]
    assert lo <= hi


def test_the_finding_and_the_report_answer_the_repair_question(run):
    rows = report.load_rows(run)
    details = json.loads((run / "details.json").read_text())
    by_key = {c.key: c for c in claims.evaluate(rows, details)}
    c = by_key["repair_restores"]
    assert c.tested and len(c.evidence) == 3  # cle_bc, adaround, qat vs ptq at W4A4
    assert all("over ptq" in e for e in c.evidence)
    html = (run / "report.html").read_text()
    assert "does better quantization restore calibration" in html
    summary = report.summary_table(rows)
    assert "adaround" in summary and "qat" in summary


def test_ptq_cells_keep_their_cache_keys(tmp_path):
    base = from_toml_dict(_study(tmp_path, methods=["ptq"], method_options={}))
    more = from_toml_dict(_study(tmp_path))
    g = study.expand_cells(base)[0][1][1]
    h = next(c for c in study.expand_cells(more)[0][1] if c.method == "ptq" and not c.is_fp32)
    assert keys.logits_key(base, g, "t") == keys.logits_key(more, h, "t")
    a = next(c for c in study.expand_cells(more)[0][1] if c.method == "adaround")
    assert keys.logits_key(more, a, "t") != keys.logits_key(more, h, "t")


def test_an_unknown_method_lists_the_valid_ones(tmp_path):
    with pytest.raises(ValueError, match=r"adaround.*cle_bc.*ptq.*qat"):
        from_toml_dict(_study(tmp_path, methods=["ptq", "adarond"]))
    with pytest.raises(ValueError, match="no option 'iters'"):
        from_toml_dict(
            _study(tmp_path, methods=["adaround"], method_options={"adaround": {"iters": 3}})
        )
    from quantcal import cli

    path = tmp_path / "bad.toml"
    path.write_text(
        'name = "bad"\n[data]\ndatasets = ["digits"]\n[[model]]\narch = "resnet20"\n'
        '[quant]\nmethods = ["cle"]\n'
    )
    assert cli.main(["run", str(path), "--out", str(tmp_path / "o"), "--quiet"]) == 2


def test_a_method_that_cannot_apply_is_an_error_row_not_a_crash(tmp_path, monkeypatch, capsys):
    (tmp_path / "nopairs.py").write_text(_NO_PAIRS)
    monkeypatch.chdir(tmp_path)
    cfg = _study(tmp_path, methods=["ptq", "cle_bc"], method_options={})
    cfg["model"] = [{"arch": "nopairs.py:build"}]
    out = tmp_path / "out"
    study.run_study(cfg, out, quiet=True)
    rows = _rows(out)
    bad = [r for r in rows if r["status"] != "ok"]
    assert {r["method"] for r in bad} == {"cle_bc"} and len(bad) == 2
    assert all("no equalizable layer pair" in r["error"] for r in bad)
    good = [r for r in rows if r["status"] == "ok" and r["precision"] == "W4A4"]
    assert {r["method"] for r in good} == {"ptq"}


def test_sequential_ranges_and_per_tensor_weights_reach_the_cells(tmp_path):
    plain = from_toml_dict(_study(tmp_path, methods=["ptq"], method_options={}))
    seq = from_toml_dict(
        _study(
            tmp_path,
            methods=["ptq"],
            method_options={},
            sequential=True,
            weight_granularity="tensor",
        )
    )
    c = study.expand_cells(seq)[0][1][1]
    qc = keys.quant_config(seq, c)
    assert qc.sequential and qc.weight_granularity == "tensor" and qc.name == "W4A4+pt"
    assert keys.logits_key(seq, c, "t") != keys.logits_key(plain, c, "t")
    assert "sequential = true" in seq.to_toml()
    with pytest.raises(ValueError, match="weight_granularity"):
        from_toml_dict(_study(tmp_path, weight_granularity="row"))
