"""The ablation preset end to end on digits (tiny widths): paired contrasts of every property
against the base, their verdicts in the report, and the per-layer attribution, cached."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from quantcal import study
from quantcal.calibration import metrics
from quantcal.findings import claims
from quantcal.models.ablation import ABLATION_VARIANTS
from quantcal.report import html as report

#: The preset, made cheaper: fewer epochs and resamples, one quantized precision.
FAST = {
    "train.epochs": 4,
    "metrics.bootstrap": 60,
    "quant.precisions": ["fp32", "W4A4"],
}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ablation_digits")
    study.run_study("ablation_digits", out, quiet=True, overrides=FAST)
    return out


def _details(run: Path) -> dict:
    return json.loads((run / "details.json").read_text())


def test_every_property_gets_a_paired_contrast_and_a_verdict(run):
    rows = report.load_rows(run)
    assert rows and all(r["status"] == "ok" for r in rows)
    records = _details(run)["ablation"]
    variants = {v for v in ABLATION_VARIANTS if v != "ablation_base"}
    assert {r["variant"] for r in records} == variants
    assert {(r["precision"], r["recal"]) for r in records} == {
        ("W4A4", "none"),
        ("W4A4", "temperature"),
    }
    for r in records:
        for key in ("ece_rise", "accuracy_drop"):
            assert r[key]["contrast"]["lo"] <= r[key]["contrast"]["hi"]
            assert r[key]["contrast"]["value"] == pytest.approx(
                r[key]["variant"]["value"] - r[key]["base"]["value"], abs=1e-12
            )
    html = (run / "report.html").read_text()
    assert "Ablation: which property makes a net fragile" in html
    by_key = {c.key: c for c in claims.evaluate(rows, _details(run))}
    props = by_key["ablation_properties"]
    assert props.tested and len(props.evidence) == len(variants)
    for e in props.evidence:
        assert any(v in e for v in ("more fragile", "less fragile", "no measurable difference"))
    mech = by_key["separable_mechanism"]
    assert mech.tested
    assert mech.verdict.split(" (")[0] in ("supported", "contradicted", "undecided")
    assert "Depthwise-separable convolutions lose more calibration" in html
    att = by_key["attention_keeps_calibration"]
    assert att.tested and att.source.startswith("Minderer")
    assert att.verdict.split(" (")[0] in ("supported", "contradicted", "undecided")
    assert len(att.evidence) == 1 and "after temperature scaling" in att.evidence[0]
    assert {n["recal"] for n in att.rows} == {"none", "temperature"}
    assert "Self-attention loses less calibration under quantization" in html


def test_contrast_is_recomputed_from_the_cached_logits(run):
    logits = study.recalibrated_test_logits(run)
    rec = next(r for r in _details(run)["ablation"] if r["variant"] == "ablation_separable")

    def z(arch: str, precision: str):
        key = next(k for k in logits if k[1] == arch and k[5] == precision and k[9] == rec["recal"])
        return logits[key]

    (vq, y), (vf, _), (bq, _), (bf, _) = (
        z("ablation_separable", "W4A4"),
        z("ablation_separable", "fp32"),
        z("ablation_base", "W4A4"),
        z("ablation_base", "fp32"),
    )
    by_hand = metrics.ece(vq, y) - metrics.ece(vf, y) - metrics.ece(bq, y) + metrics.ece(bf, y)
    assert rec["ece_rise"]["contrast"]["value"] == pytest.approx(by_hand, abs=1e-12)


def test_attribution_is_in_details_and_identical_from_cache(run, monkeypatch):
    from quantcal import quant

    before = _details(run)["attribution"]
    assert len(before) == len(ABLATION_VARIANTS)  # one per model, at W4A4 only
    for rec in before:
        assert rec["precision"] == "W4A4" and rec["n_samples"] > 0
        assert len(rec["groups"]) >= 19 and {"alone_nll", "recovery_nll"} <= set(rec["groups"][0])

    def boom(*a, **k):
        raise AssertionError("a cached attribution must not be recomputed")

    monkeypatch.setattr(quant, "attribute_layers", boom)
    monkeypatch.setattr(quant, "quantize", boom)
    study.run_study("ablation_digits", run, quiet=True, overrides=FAST)
    assert _details(run)["attribution"] == before
    html = (run / "report.html").read_text()
    assert "Which layers decide calibration" in html
    assert (run / "figures" / "attribution.png").is_file()
    assert (run / "figures" / "ablation.png").is_file()


def test_a_failed_attribution_is_recorded_and_the_run_exits_non_zero(tmp_path, monkeypatch):
    from quantcal import cli, quant

    cfg = {
        "name": "attr_fail",
        "data": {"datasets": ["digits"]},
        "model": [{"arch": "ablation_base", "width": 0.25}],
        "train": {"epochs": 1, "augment": False},
        "quant": {"precisions": ["fp32", "W4A4"], "attribution": True},
        "recal": {"methods": ["none"]},
        "metrics": {"bootstrap": 20},
    }
    path = tmp_path / "s.toml"
    from quantcal.study import config as studyconfig

    path.write_text(studyconfig.from_toml_dict(cfg).to_toml())

    def broken(*a, **k):
        raise RuntimeError("replay exploded")

    monkeypatch.setattr(quant, "attribute_layers", broken)
    code = cli.main(["run", str(path), "--out", str(tmp_path / "out"), "--quiet"])
    assert code == 1
    recs = _details(tmp_path / "out")["attribution"]
    assert recs and "replay exploded" in recs[0]["error"]
    assert "failed: RuntimeError: replay exploded" in (tmp_path / "out" / "report.html").read_text()


def test_a_variant_without_logits_is_named_not_dropped_silently(run):
    from quantcal.findings import ablation

    said = []
    runner, plan = study.open_run(run, said.append)
    real = runner.cached_logits

    def missing_se(cell, tkey):
        return None if cell.group.model.arch == "ablation_se" else real(cell, tkey)

    runner.cached_logits = missing_se
    records = ablation.contrasts(runner, plan)
    assert "ablation_se" not in {r["variant"] for r in records}
    assert len({r["variant"] for r in records}) == len(ABLATION_VARIANTS) - 2
    assert any("ablation_se has no fp32 logits" in line for line in said)
