"""The decisions axes of a study end to end on digits (issue #25): the selective-prediction and
threshold-transfer columns, the ``shift`` axis (corrupted test copies, cached, recalibrated on
clean validation images), unknown-input sets (ood.csv), their claims and report section, and
bad input refused before anything is computed."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from _studies import tiny
from quantcal import cli, study
from quantcal.calibration import metrics, selective
from quantcal.study.runner import open_run

SHIFTS = ["gaussian_noise:3", "contrast:5"]


def _study_file(tmp: Path, **changes) -> Path:
    cfg = tiny(
        **{
            "quant.precisions": ["fp32", "W4A4"],
            "data.shifts": SHIFTS,
            "data.ood": ["gaussian_noise"],
            "train.epochs": 8,
            "model": [{"arch": "shufflenetv2", "width": 0.25}],
            **changes,
        }
    )
    path = tmp / "decisions.toml"
    path.write_text(study.load_study(cfg).to_toml())
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("decisions")
    out = tmp / "run"
    assert cli.main(["run", str(_study_file(tmp)), "--out", str(out), "--quiet"]) == 0
    with open(out / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return tmp, out, rows


def _f(x: str) -> float:
    return float(x) if x not in ("", None) else math.nan


def test_every_cell_is_scored_on_clean_test_and_on_each_shift(run):
    rows = run[2]
    assert len(rows) == 2 * 2 * 3  # cells x recalibrators x (clean + 2 shifts)
    assert {r["shift"] for r in rows} == {"clean", *SHIFTS}
    assert all(r["status"] == "ok" for r in rows)
    by = {(r["precision"], r["recal"], r["shift"]): r for r in rows}
    # recalibrated on clean validation images: the same temperature on every test copy
    for p in ("fp32", "W4A4"):
        t = {by[(p, "temperature", s)]["temperature"] for s in ("clean", *SHIFTS)}
        assert len(t) == 1, t
    # contrast at severity 5 leaves less to see than clean test
    assert _f(by[("fp32", "none", "contrast:5")]["accuracy"]) < _f(
        by[("fp32", "none", "clean")]["accuracy"]
    )
    # the interaction of quantization and shift: on quantized shifted rows only
    assert by[("W4A4", "none", "contrast:5")]["ece_shift_interaction"] != ""
    assert by[("fp32", "none", "contrast:5")]["ece_shift_interaction"] == ""
    assert by[("W4A4", "none", "clean")]["ece_shift_interaction"] == ""


def test_the_shift_interaction_is_the_difference_of_the_four_eces(run):
    _, out, rows = run
    ctx, plan = open_run(out)
    ((g, cells),) = plan
    fp32_cell, q_cell = cells
    tkey = ctx.train_key(g)
    from quantcal.study.stages.shift import cached_shift_logits

    f_clean = ctx.cached_logits(fp32_cell, tkey)
    q_clean = ctx.cached_logits(q_cell, tkey)
    y = q_clean["test_labels"]
    shift = "contrast:5"
    f_s = cached_shift_logits(ctx, fp32_cell, tkey, shift)
    q_s = cached_shift_logits(ctx, q_cell, tkey, shift)
    assert f_s is not None and q_s is not None and f_s.shape == q_clean["test_logits"].shape
    by_hand = (
        metrics.ece(q_s, y)
        - metrics.ece(q_clean["test_logits"], y)
        - metrics.ece(f_s, y)
        + metrics.ece(f_clean["test_logits"], y)
    )
    row = next(
        r for r in rows if r["precision"] == "W4A4" and r["recal"] == "none" and r["shift"] == shift
    )
    assert _f(row["ece_shift_interaction"]) == pytest.approx(by_hand, abs=1e-9)
    assert _f(row["aurc"]) == pytest.approx(selective.aurc(q_s, y), abs=1e-12)
    lo, hi = _f(row["ece_shift_interaction_lo"]), _f(row["ece_shift_interaction_hi"])
    assert lo <= hi


def test_threshold_columns_follow_the_rule_on_the_cached_logits(run):
    _, out, rows = run
    ctx, plan = open_run(out)
    ((g, cells),) = plan
    tkey = ctx.train_key(g)
    f = ctx.cached_logits(cells[0], tkey)
    q = ctx.cached_logits(cells[1], tkey)
    target = ctx.config.target_risk
    t = selective.threshold_for_risk(f["val_logits"], f["val_labels"], risk=target)
    t_own = selective.threshold_for_risk(q["val_logits"], q["val_labels"], risk=target)
    row = next(
        r
        for r in rows
        if r["precision"] == "W4A4" and r["recal"] == "none" and r["shift"] == "clean"
    )
    assert _f(row["threshold"]) == pytest.approx(t)
    risk, coverage = selective.accepted_risk(q["test_logits"], q["test_labels"], t)
    assert _f(row["threshold_coverage"]) == pytest.approx(coverage)
    assert (math.isnan(risk) and row["threshold_risk"] in ("", "nan")) or _f(
        row["threshold_risk"]
    ) == pytest.approx(risk)
    reset = selective.accepted_risk(q["test_logits"], q["test_labels"], t_own)
    assert _f(row["threshold_reset_coverage"]) == pytest.approx(reset[1])
    from quantcal.findings.threshold import judge

    assert row["threshold_outcome"] == judge((risk, coverage), t_own, reset, target)


def test_shift_and_ood_entries_are_cached_and_reused(run, capsys):
    tmp, out, _ = run
    assert len(list((out / "cache" / "shift_logits").glob("*.pt"))) == 2 * 2
    assert len(list((out / "cache" / "ood_logits").glob("*.pt"))) == 2
    capsys.readouterr()
    assert cli.main(["run", str(_study_file(tmp)), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    for stage in ("train ", "eval ", "shift ", "score "):
        assert f"] {stage}" not in err, err


def test_ood_csv_scores_each_cell_recalibrator_and_score(run):
    _, out, _ = run
    with open(out / "ood.csv", newline="") as fh:
        recs = list(csv.DictReader(fh))
    assert len(recs) == 2 * 2 * 1 * 3
    assert {r["score"] for r in recs} == {"msp", "max_logit", "energy"}
    assert {r["ood_set"] for r in recs} == {"synthetic:gaussian_noise"}
    for r in recs:
        assert 0.0 <= _f(r["auroc"]) <= 1.0 and _f(r["auroc_lo"]) <= _f(r["auroc_hi"])
    fp32 = [r for r in recs if r["precision"] == "fp32"]
    assert all(_f(r["auroc_diff_vs_fp32"]) == 0.0 for r in fp32)
    # max logit ranks like its temperature-scaled self: the same AUROC
    ml = {
        r["recal"]: _f(r["auroc"])
        for r in recs
        if r["precision"] == "W4A4" and r["score"] == "max_logit"
    }
    assert ml["none"] == pytest.approx(ml["temperature"], abs=1e-12)


def test_report_has_the_decisions_section_and_claims(run):
    _, out, _ = run
    page = (out / "report.html").read_text()
    assert "Decisions: abstaining, corrupted inputs, unknown inputs" in page
    assert "The abstention threshold, carried from fp32" in page
    assert "Unknown inputs" in page
    assert "fp32&#x27;s abstention threshold" in page or "fp32's abstention threshold" in page
    for claim in (
        "Quantization and corruption compound",
        "A temperature fitted on clean data holds under shift",
        "Quantization hurts failure detection",
        "OOD detection moves with calibration",
    ):
        assert claim in page, claim
    assert list((out / "figures").glob("severity_*.png"))
    assert list((out / "figures").glob("risk_coverage_*.png"))
    details = json.loads((out / "details.json").read_text())
    assert len(details["risk_coverage"]) == 12 and details["ood"]


def test_the_clean_tables_read_only_clean_rows(run):
    from quantcal.report import load_rows

    _, out, _ = run
    assert {r["shift"] for r in load_rows(out)} == {"clean"}
    assert len(load_rows(out, shifted=True)) == 12


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ('["fog:7"]', "1..5"),
        ('["fog:0"]', "1..5"),
        ('["glare:2"]', "gaussian_noise"),  # the valid names are listed
    ],
)
def test_bad_shifts_exit_2_before_anything_is_computed(tmp_path, capsys, value, message):
    out = tmp_path / "run"
    code = cli.main(
        ["run", str(_study_file(tmp_path)), "--out", str(out), "--set", f"data.shifts={value}"]
    )
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (out / "cache").exists()


def test_an_ood_file_of_another_image_shape_exits_2(tmp_path, capsys):
    bad = tmp_path / "svhn.npz"
    np.savez(bad, images=np.zeros((10, 32, 32, 3), dtype=np.uint8))
    out = tmp_path / "run"
    code = cli.main(
        [
            "run",
            str(_study_file(tmp_path)),
            "--out",
            str(out),
            "--set",
            f'data.ood=["npz:{bad}"]',
        ]
    )
    err = capsys.readouterr().err
    assert code == 2, err
    assert "(C, H, W)" in err and "resize" in err
    assert not (out / "cache" / "train").exists()


def test_an_ood_npz_of_the_right_shape_is_scored(tmp_path):
    from quantcal.training import data
    from quantcal.training.ood_sets import load_ood_npz

    test = data.load_dataset("digits").test
    path = tmp_path / "other.npz"
    imgs = np.random.default_rng(0).integers(0, 256, (7, 8, 8), dtype=np.uint8)
    np.savez(path, images=imgs)
    split = load_ood_npz(str(path), test)
    assert split.images.shape == (7, 1, 8, 8) and bool((split.labels == -1).all())
    assert torch.equal(split.images[:, 0], torch.from_numpy(imgs))
    with pytest.raises(ValueError, match="no image array"):
        np.savez(tmp_path / "empty.npz", labels=np.zeros(3))
        load_ood_npz(str(tmp_path / "empty.npz"), test)


def test_a_failed_unknown_input_scoring_is_named_and_exits_1(tmp_path, capsys, monkeypatch):
    from quantcal.training import ood_sets

    def broken(spec, reference, *, seed=0):
        raise RuntimeError("the unknown images could not be made")

    monkeypatch.setattr(ood_sets, "ood_split", broken)
    path = tmp_path / "s.toml"
    cfg = tiny(**{"quant.precisions": ["fp32", "W8A8"], "data.ood": ["blurred"]})
    path.write_text(study.load_study(cfg).to_toml())
    out = tmp_path / "run"
    assert cli.main(["run", str(path), "--out", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "unknown-input scoring" in err and "could not be made" in err
    assert (out / "results.csv").exists()  # everything else was computed and written
    details = json.loads((out / "details.json").read_text())
    assert {r["precision"] for r in details["ood"] if "error" in r} == {"fp32", "W8A8"}


def test_a_corruption_that_fails_gives_error_rows_and_exits_1(tmp_path, capsys, monkeypatch):
    from quantcal.training import corruptions

    def broken(images, name, severity, **kw):
        raise RuntimeError(f"{name} could not be applied")

    monkeypatch.setattr(corruptions, "corrupt", broken)
    path = tmp_path / "s.toml"
    cfg = tiny(**{"quant.precisions": ["fp32", "W8A8"], "data.shifts": ["fog:2"]})
    path.write_text(study.load_study(cfg).to_toml())
    out = tmp_path / "run"
    assert cli.main(["run", str(path), "--out", str(out), "--quiet"]) == 1
    assert "fog could not be applied" in capsys.readouterr().err
    with open(out / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["status"] for r in rows if r["shift"] == "clean"} == {"ok"}
    shifted = [r for r in rows if r["shift"] == "fog:2"]
    assert len(shifted) == 4 and all(r["status"] == "error" for r in shifted)


def test_cross_fitted_rows_say_why_they_have_no_threshold():
    from quantcal.study.cells import Group, QuantCell
    from quantcal.study.score import score

    config = study.load_study(tiny())
    cell = QuantCell(Group("digits", config.models[0], 0), "fp32", None, None)
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (200,), generator=g)
    z = torch.randn(200, 4, generator=g) + 3 * torch.nn.functional.one_hot(y, 4)
    lg = {"val_logits": z[:0], "val_labels": y[:0], "test_logits": z, "test_labels": y}
    row = score(config, cell, "temperature", lg, lg, recal_fit="test_crossfit")
    assert row["threshold_outcome"] is None and row["threshold_risk"] is None
    assert "no threshold transfer" in row["notes"]
