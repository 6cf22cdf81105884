"""The command line: help text, listing, error messages and exit codes."""

from __future__ import annotations

import pytest

from quantcal import cli


@pytest.mark.parametrize("cmd", ["run", "train", "eval", "report", "data", "list"])
def test_every_command_has_help_with_an_example(cmd, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([cmd, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "example" in text and f"quantcal {cmd}" in text


def test_list_names_registries(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    for word in ("shufflenetv2", "mobileone_s0", "digits", "W4A4", "temperature", "minmax", "demo"):
        assert word in out


def test_bad_input_exits_2_with_a_message(tmp_path, capsys):
    assert cli.main(["run", "no_such_study"]) == 2
    assert "not found" in capsys.readouterr().err
    assert cli.main(["run", "demo", "--shard", "3/2"]) == 2
    assert "shard" in capsys.readouterr().err
    assert cli.main(["run", "demo", "--set", "quant.precisions=['fp32','W9A1']"]) == 2
    assert "W9A1" in capsys.readouterr().err
    assert cli.main(["report", str(tmp_path)]) == 2
    assert "results.csv" in capsys.readouterr().err


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 2
    assert "quantcal" in capsys.readouterr().out


def test_eval_brings_your_own_checkpoint(tmp_path, capsys):
    import torch

    from quantcal import models

    net = models.create_model("shufflenetv2", num_classes=10, image_size=8, in_chans=1, width=0.1)
    ckpt = tmp_path / "net.pt"
    torch.save(net.state_dict(), ckpt)
    out = tmp_path / "eval"
    code = cli.main(
        [
            "eval",
            "--checkpoint",
            str(ckpt),
            "--model",
            "shufflenetv2",
            "--width",
            "0.1",
            "--dataset",
            "digits",
            "--precisions",
            "W8A8",
            "--recal",
            "none,temperature",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0
    assert (out / "report.html").exists()
    # an untrained network is at chance: said, not hidden
    assert "near chance" in capsys.readouterr().err
    # A checkpoint that does not fit the model is a clear error, not a traceback.
    code = cli.main(
        [
            "eval",
            "--checkpoint",
            str(ckpt),
            "--model",
            "shufflenetv2",
            "--width",
            "0.5",
            "--dataset",
            "digits",
            "--out",
            str(tmp_path / "e2"),
            "--quiet",
        ]
    )
    # Bad input: refused before anything is computed, with a short message and status 2.
    assert code == 2
    err = capsys.readouterr().err
    assert "does not fit" in err and "Check the model name, width" in err
    assert len(err.splitlines()) <= 3, err
    assert not (tmp_path / "e2" / "results.csv").exists()
    assert not (tmp_path / "e2" / "cache" / "train").exists()


# ----------------------------------------------------------------------------------------------
# A model trained in plain PyTorch on x / 16: its preprocessing, declared or not
# ----------------------------------------------------------------------------------------------
_PLAIN_NET = """
import torch
from torch import nn


def build(num_classes, in_chans):
    return nn.Sequential(
        nn.Conv2d(in_chans, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(32, num_classes),
    )
"""


@pytest.fixture(scope="module")
def plain_digits_model(tmp_path_factory):
    """A CNN trained outside quantcal on sklearn digits scaled x / 16, and its true accuracy on
    quantcal's digits test split fed the same way."""
    import importlib.util

    import torch

    from quantcal.training import data

    folder = tmp_path_factory.mktemp("plain")
    (folder / "plainnet.py").write_text(_PLAIN_NET)
    spec = importlib.util.spec_from_file_location("plainnet_fixture", folder / "plainnet.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    splits = data.load_dataset("digits")
    torch.manual_seed(0)
    net = mod.build(10, 1)
    x = splits.train.images.float() / 255.0  # = digits / 16 up to the uint8 rounding
    y = splits.train.labels
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    for _ in range(150):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        acc = (net(splits.test.images.float() / 255.0).argmax(1) == splits.test.labels).double()
    torch.save(net.state_dict(), folder / "plain.pt")
    return folder, float(acc.mean())


def _eval_plain(folder, out, *extra):
    return cli.main(
        [
            "eval",
            "--checkpoint",
            str(folder / "plain.pt"),
            "--model",
            str(folder / "plainnet.py") + ":build",
            "--dataset",
            "digits",
            "--precisions",
            "fp32",
            "--recal",
            "none,temperature",
            "--out",
            str(out),
            "--quiet",
            *extra,
        ]
    )


def _eval_factory(folder, model, out):
    """``quantcal eval`` of the plain checkpoint built by ``model`` (a module:factory), fp32."""
    return cli.main(
        [
            "eval",
            "--checkpoint",
            str(folder / "plain.pt"),
            "--model",
            model,
            "--dataset",
            "digits",
            "--precisions",
            "fp32",
            "--recal",
            "none",
            "--out",
            str(out),
        ]
    )


def test_declared_preprocessing_gives_the_models_real_accuracy(
    plain_digits_model, tmp_path, capsys
):
    import csv

    folder, true_acc = plain_digits_model
    assert true_acc > 0.9
    assert _eval_plain(folder, tmp_path / "declared", "--mean", "0", "--std", "1") == 0
    with open(tmp_path / "declared" / "results.csv", newline="") as fh:
        row = next(r for r in csv.DictReader(fh) if r["recal"] == "none")
    assert float(row["accuracy"]) == pytest.approx(true_acc, abs=1e-9)
    err = capsys.readouterr().err
    assert "check the preprocessing" not in err and "check the preprocessing" not in row["notes"]


def test_undeclared_preprocessing_is_flagged(plain_digits_model, tmp_path, capsys):
    import csv

    folder, _ = plain_digits_model
    assert _eval_plain(folder, tmp_path / "undeclared") == 0
    err = capsys.readouterr().err
    assert "check the preprocessing" in err
    with open(tmp_path / "undeclared" / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert all("check the preprocessing" in r["notes"] for r in rows)
    assert "check the preprocessing" in (tmp_path / "undeclared" / "report.html").read_text()


def test_factory_declares_its_preprocessing_and_modules_load_from_the_current_folder(
    plain_digits_model, tmp_path, capsys, monkeypatch
):
    import csv

    folder, true_acc = plain_digits_model
    (tmp_path / "declaring.py").write_text(_PLAIN_NET + "\nbuild.mean = 0.0\nbuild.std = 1.0\n")
    monkeypatch.chdir(tmp_path)  # 'declaring' is found in the current folder, no PYTHONPATH
    assert _eval_factory(folder, "declaring:build", tmp_path / "run") == 0
    err = capsys.readouterr().err
    assert "declared by declaring:build" in err and "mean (0)" in err
    with open(tmp_path / "run" / "results.csv", newline="") as fh:
        row = next(csv.DictReader(fh))
    assert float(row["accuracy"]) == pytest.approx(true_acc, abs=1e-9)


_PREP = """
import torch


def prep(x):
    assert x.dtype == torch.uint8 and x.dim() == 4
    return x.float() / 255


def wrong(x):
    return x  # still uint8
"""


def test_a_transform_function_is_the_models_preprocessing(
    plain_digits_model, tmp_path, capsys, monkeypatch
):
    """``--transform path.py:function`` (and ``factory.transform``) preprocess uint8 batches."""
    import csv

    folder, true_acc = plain_digits_model
    (tmp_path / "prep.py").write_text(_PREP)
    assert _eval_plain(folder, tmp_path / "run", "--transform", str(tmp_path / "prep.py:prep")) == 0
    with open(tmp_path / "run" / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert float(rows[0]["accuracy"]) == pytest.approx(true_acc, abs=1e-9)
    assert not any("check the preprocessing" in r["notes"] for r in rows)
    # declared by the factory, as a 'module:function' string found in the current folder
    (tmp_path / "declaring_t.py").write_text(_PLAIN_NET + "\nbuild.transform = 'prep:prep'\n")
    monkeypatch.chdir(tmp_path)
    assert _eval_factory(folder, "declaring_t:build", tmp_path / "run2") == 0
    err = capsys.readouterr().err
    assert "inputs are prep:prep(uint8 images) (declared by declaring_t:build)" in err
    with open(tmp_path / "run2" / "results.csv", newline="") as fh:
        assert float(next(csv.DictReader(fh))["accuracy"]) == pytest.approx(true_acc, abs=1e-9)
    # a transform that does not return a float batch is bad input: exit 2, nothing computed
    assert (
        _eval_plain(folder, tmp_path / "bad", "--transform", str(tmp_path / "prep.py:wrong")) == 2
    )
    err = capsys.readouterr().err
    assert "must return a float tensor" in err and "torch.uint8" in err
    assert not (tmp_path / "bad" / "results.csv").exists()


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--mean", "0"], "go together"),
        (["--mean", "a", "--std", "1"], "comma-separated numbers"),
        (["--mean", "0", "--std", "1", "--transform", "x:y"], "replaces --mean/--std"),
    ],
)
def test_bad_preprocessing_options(plain_digits_model, tmp_path, capsys, extra, match):
    folder, _ = plain_digits_model
    assert _eval_plain(folder, tmp_path / "bad", *extra) == 2
    assert match in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Where recalibrators are fitted, for a model quantcal did not train
# ----------------------------------------------------------------------------------------------
def _rows_of(out):
    import csv

    with open(out / "results.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_crossfit_on_test_agrees_with_a_truly_held_out_fit(plain_digits_model, tmp_path, capsys):
    """The plain model never saw quantcal's digits val split, so fitting there is truly held
    out; cross-fitting on test must agree with it within the interval. Fitting on val is still
    flagged (quantcal cannot know what a foreign checkpoint saw), and auto cross-fits."""
    folder, _ = plain_digits_model
    mean_std = ("--mean", "0", "--std", "1")
    assert _eval_plain(folder, tmp_path / "val", *mean_std, "--recal-fit", "val") == 0
    assert _eval_plain(folder, tmp_path / "cf", *mean_std, "--recal-fit", "test_crossfit") == 0
    assert _eval_plain(folder, tmp_path / "auto", *mean_std) == 0
    val = {r["recal"]: r for r in _rows_of(tmp_path / "val")}
    cf = {r["recal"]: r for r in _rows_of(tmp_path / "cf")}
    auto = {r["recal"]: r for r in _rows_of(tmp_path / "auto")}
    ts_val, ts_cf = val["temperature"], cf["temperature"]
    assert ts_val["recal_fit"] == "val" and ts_cf["recal_fit"] == "test_crossfit"
    # Agreement: the two 95 % intervals overlap and the estimates differ by under 2 points
    # (a binned ECE's percentile interval need not contain its own estimate: the estimator is
    # biased upward, so "each inside the other's interval" is not the test).
    lo_v, hi_v = float(ts_val["ece_lo"]), float(ts_val["ece_hi"])
    lo_c, hi_c = float(ts_cf["ece_lo"]), float(ts_cf["ece_hi"])
    assert max(lo_v, lo_c) <= min(hi_v, hi_c)
    assert abs(float(ts_val["ece"]) - float(ts_cf["ece"])) < 0.02
    assert "may be too low" in ts_val["notes"]
    assert auto["temperature"]["recal_fit"] == "test_crossfit"
    assert "cross-fitted on the test split" in auto["temperature"]["notes"]
    assert auto["temperature"]["ece"] == ts_cf["ece"]  # auto chose exactly the cross-fit
    # no recalibration: the same numbers whatever the fit
    assert val["none"]["ece"] == cf["none"]["ece"]
    assert "cross-fit" in (tmp_path / "cf" / "report.html").read_text()


def test_plan_command_writes_a_plan_the_quantizer_takes(plain_digits_model, tmp_path, capsys):
    import json

    from quantcal import quant

    folder, _ = plain_digits_model
    out = tmp_path / "plan.json"
    common = [
        "plan",
        "--checkpoint",
        str(folder / "plain.pt"),
        "--model",
        str(folder / "plainnet.py") + ":build",
        "--dataset",
        "digits",
        "--mean",
        "0",
        "--std",
        "1",
        "--levels",
        "W8A8,W4A4",
        "--out",
        str(out),
    ]
    code = cli.main([*common, "--max-accuracy-drop", "0.05", "--max-ece-rise", "0.05"])
    assert code in (0, 1)
    printed = capsys.readouterr().out
    assert "test search half, check half (" in printed and "evaluations" in printed
    assert "at 90 % confidence" in printed
    plan = json.loads(out.read_text())
    assert plan["images"]["split"] == "test_half" and plan["bound"]["rule"] == "upper_bound"
    assert set(plan["plan"]) == {"0", "3", "7"} and plan["budget"]["max_ece_rise"] == 0.05
    cfg = quant.QuantConfig.from_dict(plan["quant_config"])
    assert {n: cfg.bits_of(n) for n in plan["plan"]} == {
        n: tuple(b) for n, b in plan["plan"].items()
    }
    assert cli.main([*common, "--max-ece-rise", "-1"]) == 2
    assert "--max-ece-rise must be a fraction" in capsys.readouterr().err
    assert cli.main([*common, "--max-ece-rise", "none", "--cost", "weight_bytes"]) in (0, 1)
    assert json.loads(out.read_text())["budget"]["max_ece_rise"] is None


def test_eval_attributes_a_users_checkpoint_to_its_layers(plain_digits_model, tmp_path, capsys):
    """``eval --attribution``: which layers of my network decide its calibration at W4A4."""
    import json

    folder, _ = plain_digits_model
    out = tmp_path / "attr"
    code = _eval_plain(
        folder, out, "--mean", "0", "--std", "1", "--precisions", "fp32,W4A4", "--attribution"
    )
    assert code == 0
    recs = json.loads((out / "details.json").read_text())["attribution"]
    assert [r["precision"] for r in recs] == ["W4A4"]
    assert recs[0]["granularity"] == "layer" and recs[0]["n_samples"] == 180  # all of val
    assert "Which layers decide calibration" in (out / "report.html").read_text()
    with pytest.raises(ValueError, match="--attribution quantizes the model itself"):
        cli.resolve(["eval", "--logits", "a", "b", "--attribution"])


def test_eval_config_lists_no_training_recipe_and_still_reassembles(
    plain_digits_model, tmp_path, capsys
):
    """An eval of a checkpoint trains nothing: its config.toml has no [train] recipe, and the
    folder still re-assembles from its cache (no key holds the recipe) for report and compare."""
    folder, _ = plain_digits_model
    out = tmp_path / "norecipe"
    assert _eval_plain(folder, out, "--mean", "0", "--std", "1") == 0
    text = (out / "config.toml").read_text()
    assert "[train]" not in text and "[quant]" in text
    before = (out / "results.csv").read_text()
    capsys.readouterr()
    assert cli.main(["report", str(out)]) == 0
    assert (out / "results.csv").read_text() == before
    assert cli.main(["compare", str(out), str(out), "--bootstrap", "20"]) == 0
    # A method that trains keeps its recipe.
    from quantcal import study

    raw = {
        "name": "e",
        "model": [{"arch": "resnet20", "width": 1.0, "checkpoint": str(folder / "plain.pt")}],
    }
    assert "[train]" in study.load_study({**raw, "quant": {"methods": ["qat"]}}).to_toml(
        applicable_only=True
    )


def test_eval_of_a_checkpoint_scores_shifts_and_unknown_inputs(plain_digits_model, tmp_path):
    import csv

    folder, _ = plain_digits_model
    out = tmp_path / "ev"
    extra = ("--mean", "0", "--std", "1", "--precisions", "fp32,W8A8")
    code = _eval_plain(folder, out, *extra, "--shifts", "contrast:5,jpeg:1", "--ood", "blurred")
    assert code == 0
    with open(out / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["shift"] for r in rows} == {"clean", "contrast:5", "jpeg_compression:1"}
    assert len(rows) == 2 * 2 * 3
    with open(out / "ood.csv", newline="") as fh:
        assert {r["ood_set"] for r in csv.DictReader(fh)} == {"synthetic:blurred"}
    assert "shifts = [" in (out / "config.toml").read_text()


def test_eval_refuses_shifts_for_given_logits(tmp_path, capsys):
    import numpy as np

    val, test = tmp_path / "val.npz", tmp_path / "test.npz"
    for path in (val, test):
        np.savez(path, logits=np.zeros((4, 3), np.float32), labels=np.zeros(4, np.int64))
    args = ["eval", "--logits", str(val), str(test), "--shifts", "fog:1"]
    assert cli.main([*args, "--out", str(tmp_path / "o")]) == 2
    assert "--shifts does not apply here" in capsys.readouterr().err
