"""End-to-end tests of the study runner: a micro study, resume after kills, shards, errors."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from quantcal import study
from quantcal.study import keys
from quantcal.study.config import load_study

MICRO = {
    "name": "micro",
    "seeds": [0],
    "data": {"datasets": ["digits"]},
    "model": [
        {"arch": "shufflenetv2", "width": 0.1},
        {"arch": "ghostnet_vgg16", "width": 0.1},
    ],
    "train": {"epochs": 1, "batch_size": 128, "lr": 0.05, "schedule": "cosine"},
    "quant": {"precisions": ["fp32", "W8A8", "W4A4"], "observers": ["minmax"]},
    "recal": {"methods": ["none", "temperature", "temperature_fp32"]},
    "metrics": {"bootstrap": 50},
}
N_ROWS = 2 * 3 * 3  # models x precisions x methods


def _rows(out: Path) -> list[dict]:
    with open(out / "results.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _cell_ids(rows: list[dict]) -> list[tuple]:
    return [(r["arch"], r["precision"], r["observer"], r["ptq_sample"], r["recal"]) for r in rows]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("micro")
    study.run_study(MICRO, out, quiet=True)
    return out


def test_micro_study_writes_every_file(finished):
    for name in ("results.csv", "details.json", "config.toml", "env.json", "report.html"):
        assert (finished / name).is_file(), name
    assert list((finished / "figures").glob("*.png"))
    rows = _rows(finished)
    assert len(rows) == N_ROWS
    assert len(set(_cell_ids(rows))) == N_ROWS
    assert all(r["status"] == "ok" for r in rows), [r["error"] for r in rows]
    for r in rows:
        assert 0.0 <= float(r["ece"]) <= 1.0
        # A percentile interval of a biased statistic need not contain the point estimate.
        assert 0.0 <= float(r["ece_lo"]) <= float(r["ece_hi"]) <= 1.0
        assert int(r["n_test"]) > 0 and int(r["params"]) > 0
    fp32 = [r for r in rows if r["precision"] == "fp32"]
    assert all(float(r["ece_diff_vs_fp32"]) == 0.0 for r in fp32)
    # Reusing the fp32 temperature at fp32 is the same thing as fitting it there.
    for arch in {r["arch"] for r in rows}:
        a = next(r for r in fp32 if r["arch"] == arch and r["recal"] == "temperature")
        b = next(r for r in fp32 if r["arch"] == arch and r["recal"] == "temperature_fp32")
        assert float(a["ece"]) == pytest.approx(float(b["ece"]), abs=1e-12)
    w4 = [r for r in rows if r["precision"] == "W4A4"]
    assert all(float(r["weight_bytes"]) < float(fp32[0]["weight_bytes"]) for r in w4)


def test_resolved_config_round_trips(finished):
    again = load_study(finished / "config.toml")
    assert again == load_study(MICRO)


def test_rerun_does_no_training_or_inference(finished, monkeypatch):
    from quantcal import quant
    from quantcal.training import train

    def boom(*a, **k):
        raise AssertionError("a finished study must not recompute")

    monkeypatch.setattr(train, "train", boom)
    monkeypatch.setattr(train, "predict_logits", boom)
    monkeypatch.setattr(quant, "quantize", boom)
    before = _rows(finished)
    study.run_study(MICRO, finished, quiet=True)
    assert _rows(finished) == before


def test_resume_after_kill_between_and_inside_stages(tmp_path, monkeypatch):
    """Kill the run inside the logits stage of the second model, then resume: the first model's
    cells are not recomputed and no row is lost or duplicated."""
    from quantcal import quant
    from quantcal.training import train

    calls = {"quantize": 0, "train": 0}
    real_quantize, real_train = quant.quantize, train.train

    def counting_quantize(*a, **k):
        calls["quantize"] += 1
        if calls["quantize"] == 3:  # second model's first quantized cell
            raise KeyboardInterrupt("simulated kill")
        return real_quantize(*a, **k)

    def counting_train(*a, **k):
        calls["train"] += 1
        return real_train(*a, **k)

    monkeypatch.setattr(quant, "quantize", counting_quantize)
    monkeypatch.setattr(train, "train", counting_train)
    with pytest.raises(KeyboardInterrupt):
        study.run_study(MICRO, tmp_path, quiet=True)
    assert not (tmp_path / "results.csv").exists()
    assert calls == {"quantize": 3, "train": 2}
    calls.update(quantize=0, train=0)
    study.run_study(MICRO, tmp_path, quiet=True)
    # Only the second model's two quantized cells remain; nothing is trained again.
    assert calls == {"quantize": 2, "train": 0}
    rows = _rows(tmp_path)
    assert len(rows) == N_ROWS and len(set(_cell_ids(rows))) == N_ROWS


def test_failing_cell_becomes_error_row(tmp_path, monkeypatch):
    from quantcal import quant

    real = quant.quantize

    def fail_w4(model, config, batches, **kw):
        if config.act_bits == 4:
            raise RuntimeError("simulated backend failure")
        return real(model, config, batches, **kw)

    monkeypatch.setattr(quant, "quantize", fail_w4)
    cfg = {**MICRO, "model": MICRO["model"][:1]}
    study.run_study(cfg, tmp_path, quiet=True)
    rows = _rows(tmp_path)
    bad = [r for r in rows if r["status"] != "ok"]
    assert {r["precision"] for r in bad} == {"W4A4"} and len(bad) == 3
    assert all("simulated backend failure" in r["error"] for r in bad)
    assert all(r["status"] == "ok" for r in rows if r["precision"] != "W4A4")
    # The error is not cached as a result: a later run retries and succeeds.
    monkeypatch.setattr(quant, "quantize", real)
    study.run_study(cfg, tmp_path, quiet=True)
    assert all(r["status"] == "ok" for r in _rows(tmp_path))


def test_two_shards_in_two_processes(tmp_path):
    cfg_path = tmp_path / "micro.toml"
    cfg_path.write_text(load_study(MICRO).to_toml())
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "quantcal",
                "run",
                str(cfg_path),
                "--out",
                str(out),
                "--shard",
                f"{i}/2",
                "--quiet",
                "--device",
                "cpu",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    if not (out / "results.csv").exists():  # both finished at once: assemble explicitly
        study.assemble(out)
    rows = _rows(out)
    assert len(rows) == N_ROWS and len(set(_cell_ids(rows))) == N_ROWS
    assert all(r["status"] == "ok" for r in rows)


def test_shard_parsing():
    assert study.parse_shard("1/4") == (1, 4)
    for bad in ("4/4", "x", "1/0", "-1/2"):
        with pytest.raises(ValueError, match="shard"):
            study.parse_shard(bad)


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        ({**MICRO, "trian": {}}, "(?i)did you mean 'train'"),
        ({**MICRO, "quant": {"precison": ["fp32"]}}, "(?i)did you mean 'precisions'"),
        ({**MICRO, "quant": {"precisions": ["fp32", "W4A3x"]}}, "W4A3x"),
        ({**MICRO, "quant": {"precisions": ["W8A8"]}}, "fp32"),
        ({**MICRO, "recal": {"methods": ["temprature"]}}, "(?i)did you mean 'temperature'"),
        ({**MICRO, "model": [{"arch": "shufflenet", "width": 1}]}, "shufflenetv2"),
        ({**MICRO, "model": [{"arch": "shufflenetv2", "widht": 1}]}, "(?i)did you mean 'width'"),
        ({**MICRO, "train": {"epoch": 3}}, "epochs"),
        ({**MICRO, "data": {"datasets": ["digits"], "train_size": 0}}, "train_size"),
        ({**MICRO, "quant": {**MICRO["quant"], "attribution": "yes"}}, "true, false or a table"),
        (
            {**MICRO, "quant": {**MICRO["quant"], "attribution": {"granularty": "layer"}}},
            "(?i)did you mean 'granularity'",
        ),
        (
            {**MICRO, "quant": {**MICRO["quant"], "attribution": {"granularity": "stage"}}},
            "layer, block",
        ),
        (
            {**MICRO, "quant": {**MICRO["quant"], "attribution": {"precisions": ["W4A8"]}}},
            "W8A8, W4A4",
        ),
        ({**MICRO, "quant": {**MICRO["quant"], "attribution": {"samples": 0}}}, "positive"),
    ],
)
def test_bad_study_files_name_the_problem(raw, match):
    with pytest.raises(ValueError, match=match):
        load_study(raw)


def test_builtin_studies_parse():
    from quantcal.study.config import builtin_studies

    names = builtin_studies()
    assert {"demo", "paper_cifar100", "paper_pathmnist", "cifar100_small"} <= set(names)
    for name in names:
        cfg = load_study(name)
        assert "fp32" in cfg.precisions


def test_paper_presets_use_the_papers_recipe():
    for name in ("paper_cifar100", "paper_pathmnist"):
        cfg = load_study(name)
        assert {m.width for m in cfg.models} == {1.0}
        assert cfg.train["epochs"] == 200 and cfg.train["batch_size"] == 32
        assert cfg.train["lr"] == 0.1 and cfg.train["weight_decay"] == 1e-4
        assert cfg.precisions == ("fp32", "W8A8", "W4A8", "W4A4")


def test_report_gives_verdicts_first_and_explains_cells_beyond_repair(finished, tmp_path):
    """The report of a real run: a verdict per quantized cell at the top; diagnostics in
    details.json for each; with a zero ECE budget every cell beyond repair gets its why."""
    import json
    import re
    import shutil

    from quantcal.findings.verdicts import OUTCOMES
    from quantcal.report import html as report

    details = json.loads((finished / "details.json").read_text())
    diag = details["diagnostics"]
    assert {(d["arch"], d["precision"]) for d in diag} == {
        (a, p) for a in ("shufflenetv2", "ghostnet_vgg16") for p in ("W8A8", "W4A4")
    }
    for d in diag:
        g = d["gap"]
        assert g["gap_q"] - g["gap_fp32"] == pytest.approx(
            g["accuracy_term"] + g["confidence_term"]
        )
        assert sum(f["n"] for f in d["flips"]) == int(_rows(finished)[0]["n_test"])
    text = (finished / "report.html").read_text()
    assert text.index("<h2>Verdict</h2>") < text.index("<h2>Key numbers</h2>")
    assert len(re.findall(r"class='badge ", text)) == 4
    assert all(o in OUTCOMES for o in re.findall(r"class='badge \w+'>[✔✘] ([^<·]+?)(?: ·|<)", text))
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    cfg = (run / "config.toml").read_text()
    cfg = re.sub(r"max_ece_rise = [0-9.e-]+", "max_ece_rise = 0.0", cfg)
    cfg = re.sub(r"max_accuracy_drop = [0-9.e-]+", "max_accuracy_drop = 1.0", cfg)
    (run / "config.toml").write_text(cfg)
    text = report.write_report(run).read_text()
    assert "<h2>Why recalibration fails</h2>" in text
    assert "Mean confidence − accuracy went from" in text and "NLL is" in text
    assert list((run / "figures").glob("why_*.png"))


def test_compare_two_runs_pairs_cells_and_finds_the_one_changed(finished, tmp_path, capsys):
    """Run B is run A with one cell's logits changed and another cell's logits gone: every
    other cell differs by exactly 0 with a [0, 0] paired interval."""
    import hashlib
    import io
    import shutil

    import torch

    from quantcal import cli
    from quantcal.findings.compare import compare_runs

    run_b = tmp_path / "b"
    shutil.copytree(finished, run_b)
    runner, plan = study.open_run(run_b, lambda s: None)
    changed = gone = None
    for g, cells in plan:
        tkey = runner.train_key(g)
        for c in cells[1:]:
            path = runner.cache / "logits" / f"{keys.logits_key(runner.config, c, tkey)}.pt"
            if g.model.arch == "ghostnet_vgg16" and c.precision == "W4A4":
                d = torch.load(path, weights_only=True)
                d["test_logits"] = d["test_logits"] * 3 + 1
                buf = io.BytesIO()
                torch.save(d, buf)
                path.write_bytes(buf.getvalue())
                meta = runner.store.read_json(path.with_suffix(".json"))
                meta["sha256"] = hashlib.sha256(buf.getvalue()).hexdigest()
                runner.store.write_json(path.with_suffix(".json"), meta)  # signed as a run would
                changed = (g.model.arch, c.precision)
            elif g.model.arch == "shufflenetv2" and c.precision == "W8A8":
                path.unlink()
                path.with_suffix(".json").unlink()
                gone = (g.model.arch, c.precision)
    assert changed and gone
    result = compare_runs(finished, run_b, n_resamples=50)
    assert {(r["arch"], r["precision"]) for r in result["only_a"]} == {gone}
    assert result["only_b"] == []
    for r in result["rows"]:
        assert r["paired"]
        if (r["arch"], r["precision"]) == changed and r["recal"] == "none":
            assert r["diff"] != 0 and r["b"] != r["a"]
        elif (r["arch"], r["precision"]) != changed:
            assert (r["diff"], r["lo"], r["hi"]) == (0.0, 0.0, 0.0)
    assert cli.main(["compare", str(finished), str(run_b), "--bootstrap", "20"]) == 0
    out = capsys.readouterr().out
    assert "paired" in out and f"only in {finished.name} (3)" in out
    assert cli.main(["compare", str(finished), str(tmp_path / "nothing")]) == 2


def test_plans_add_two_mixed_precision_cells_measured_on_test(tmp_path):
    """[quant] plans: plan:calib and plan:accuracy per model, searched on val, in results.csv
    with their BOPs, in details.json with their layers, in the report with the front and the
    finding; a second run reads every plan from the cache."""
    import json

    cfg = {
        **MICRO,
        "model": [{"arch": "ghostnet_vgg16", "width": 0.1}],
        "quant": {
            "precisions": ["fp32", "W8A8", "W4A4"],
            "observers": ["minmax"],
            "plans": {"max_accuracy_drop": 0.05, "max_ece_rise": 0.05},
        },
    }
    study.run_study(cfg, tmp_path, quiet=True)
    rows = _rows(tmp_path)
    precs = [r["precision"] for r in rows if r["recal"] == "none"]
    assert precs == ["fp32", "W8A8", "W4A4", "plan:calib", "plan:accuracy"]
    assert all(r["status"] == "ok" for r in rows)
    bops = {r["precision"]: float(r["bops"]) for r in rows if r["recal"] == "none"}
    assert bops["W4A4"] <= bops["plan:calib"] <= bops["W8A8"] < bops["fp32"]
    details = json.loads((tmp_path / "details.json").read_text())
    kinds = {d["precision"]: d for d in details["plans"]}
    assert set(kinds) == {"plan:calib", "plan:accuracy"}
    assert kinds["plan:accuracy"]["budget"]["max_ece_rise"] is None
    html = (tmp_path / "report.html").read_text()
    assert "<h2>Mixed precision</h2>" in html and "Budgeting calibration chooses" in html
    before = (tmp_path / "results.csv").read_text()
    study.run_study(cfg, tmp_path, quiet=True)  # all from the cache, same numbers
    assert (tmp_path / "results.csv").read_text() == before


def test_compare_of_runs_sharing_no_cell_says_so(finished, tmp_path, capsys, monkeypatch):
    import shutil

    from quantcal import cli
    from quantcal.study import runner

    other = tmp_path / "other"
    shutil.copytree(finished, other)
    real = runner.recalibrated_test_logits

    def renamed(run, **kw):  # the other run's cells under another dataset name
        out = real(run, **kw)
        return {("x", *k[1:]): v for k, v in out.items()} if str(run) == str(other) else out

    monkeypatch.setattr(runner, "recalibrated_test_logits", renamed)
    assert cli.main(["compare", str(finished), str(other), "--bootstrap", "10"]) == 2
    assert "share no cell" in capsys.readouterr().err


def test_train_size_trains_on_a_stratified_subset_and_says_so(tmp_path):
    import numpy as np

    from quantcal.training import data

    full = data.load_dataset("digits", seed=0)
    cut = data.with_train_size(full, 500, seed=0)
    assert len(cut.train) == 500 and cut.test is full.test and cut.val is full.val
    assert set(cut.train.indices.tolist()) <= set(full.train.indices.tolist())
    counts = np.bincount(cut.train.labels.numpy(), minlength=10) / 500
    ref = np.bincount(full.train.labels.numpy(), minlength=10) / len(full.train)
    assert np.abs(counts - ref).max() < 0.01  # class proportions kept
    assert "stratified 500 of the 1157" in cut.notes[-1]
    assert data.with_train_size(full, len(full.train), seed=0) is full
    with pytest.raises(ValueError, match="train_size must be an integer in"):
        data.with_train_size(full, 5000, seed=0)
    # in a study: a different training set is a different model (its own cache key), named in
    # every row's notes
    raw = {**MICRO, "model": [MICRO["model"][0]], "data": {"datasets": ["digits"]}}
    raw["data"]["train_size"] = 300
    raw["quant"] = {"precisions": ["fp32"]}
    out = study.run_study(raw, tmp_path / "cut", quiet=True)
    rows = _rows(out)
    assert all("stratified 300 of the 1157" in r["notes"] for r in rows)
    cfg_a, cfg_b = load_study(raw), load_study({**raw, "data": {"datasets": ["digits"]}})
    g = study.expand_cells(cfg_a)[0][0]
    assert keys.train_key(cfg_a, g, "d") != keys.train_key(cfg_b, g, "d")


def test_timm_arch_without_timm_is_a_clear_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_timm(name, *args, **kwargs):
        if name == "timm" or name.startswith("timm."):
            raise ImportError("No module named 'timm'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_timm)
    with pytest.raises(ValueError, match=r"needs the timm package.*quantcal\[timm\]"):
        study.build_model("timm:resnet18", num_classes=10, image_size=32, in_chans=3, width=1.0)


def test_timm_factory_adapts_and_checks_the_model_with_a_stand_in_timm(monkeypatch):
    """The adapter's contract without timm installed: a fake ``timm`` module records how the
    model is created (no pretrained weights, the study's classes and channels, ``img_size`` only
    where the architecture takes it) and the forward check names a model that gives the wrong
    shape."""
    import sys
    import types

    import torch
    from torch import nn

    from quantcal.models.external import timm_factory

    calls = []

    class Net(nn.Module):
        def __init__(self, num_classes, in_chans, out=None):
            super().__init__()
            self.conv = nn.Conv2d(in_chans, 4, 3)
            self.fc = nn.Linear(4, out or num_classes)

        def forward(self, x):
            return self.fc(self.conv(x).mean((2, 3)))

    def create_model(name, pretrained, num_classes, in_chans, **kw):
        calls.append((name, pretrained, num_classes, in_chans, kw))
        if name == "vit_like":
            return Net(num_classes, in_chans)
        if "img_size" in kw:
            raise TypeError("unexpected keyword argument 'img_size'")
        return Net(num_classes, in_chans, out=3 if name == "wrong_head" else None)

    fake = types.SimpleNamespace(
        __version__="9.9",
        list_models=lambda: ["cnn", "vit_like", "wrong_head"],
        create_model=create_model,
    )
    monkeypatch.setitem(sys.modules, "timm", fake)
    m = timm_factory("cnn")(num_classes=10, image_size=16, in_chans=1, width=1.0)
    assert m.training and m(torch.zeros(2, 1, 16, 16)).shape == (2, 10)
    assert calls[0] == ("cnn", False, 10, 1, {"img_size": 16}) and calls[1][4] == {}
    calls.clear()
    timm_factory("vit_like")(num_classes=5, image_size=32, in_chans=3, width=1.0)
    assert calls == [("vit_like", False, 5, 3, {"img_size": 32})]
    with pytest.raises(ValueError, match=r"gives torch.Size\(\[2, 3\]\) for 2 images"):
        timm_factory("wrong_head")(num_classes=10, image_size=16, in_chans=1, width=1.0)
    with pytest.raises(ValueError, match="no width multiplier"):
        timm_factory("cnn")(num_classes=10, image_size=16, in_chans=1, width=0.5)
    with pytest.raises(ValueError, match="closest: cnn"):
        timm_factory("cnm")
    assert study.build_model("timm:cnn", num_classes=4, image_size=8, in_chans=3, width=1.0)


def test_attribution_reuses_the_cells_quantized_model(tmp_path, monkeypatch):
    """The attribution of a cell runs right after its logits, on the model the logits stage
    quantized: one quantization per quantized cell, not two."""
    from quantcal import quant

    calls = []
    real = quant.quantize

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(quant, "quantize", counting)
    raw = {
        **MICRO,
        "model": [MICRO["model"][0]],
        "quant": {"precisions": ["fp32", "W8A8", "W4A4"], "attribution": {"samples": 60}},
    }
    out = study.run_study(raw, tmp_path / "run", quiet=True)
    assert len(calls) == 2  # W8A8 and W4A4, each quantized once
    import json

    recs = json.loads((out / "details.json").read_text())["attribution"]
    assert [r["precision"] for r in recs] == ["W8A8", "W4A4"] and all("groups" in r for r in recs)
