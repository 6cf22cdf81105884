"""A study's bad values are refused when it is loaded, before any training (issue 23).

Each case runs ``quantcal run STUDY --out RUN`` on a study file with one bad value and checks
what the user sees: exit status 2, one message naming the key and the value given, no
traceback, and nothing trained (no ``cache/train`` entry, no results). The checks themselves
are the ones the library uses (``QuantMethod.resolve`` for method options, ``quant.plan``'s
checks for plan budgets, ``_inputs`` for files and numbers), tested here too. Last, a damaged
QAT work file heals like a damaged training checkpoint.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from quantcal import cli, quant, study
from quantcal._inputs import check_input_file, check_number
from quantcal.quant import plan as qplan
from quantcal.quant.methods import available_methods, get_method
from quantcal.store.cache import heal_work_file, healed_entries, run_cache_of
from quantcal.study.config import from_toml_dict
from quantcal.training import data, train

_BASE = """\
name = "hardening"
seeds = [0]
threads = 1

[data]
datasets = ["digits"]

[[model]]
arch = "shufflenetv2"
width = 0.1

[train]
epochs = 1
batch_size = 128
lr = 0.05

[recal]
methods = ["none"]

[metrics]
bootstrap = 10
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "study.toml"
    path.write_text(text)
    return path


def _quant(body: str, methods: str = '["ptq"]') -> str:
    return f'\n[quant]\nprecisions = ["fp32", "W8A8", "W4A4"]\nmethods = {methods}\n{body}\n'


def _refused(tmp_path: Path, capsys, text: str, *needles: str) -> str:
    """Run the study; assert exit 2 with one message holding every needle, and no work done."""
    out = tmp_path / "run"
    code = cli.main(["run", str(_write(tmp_path, text)), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err, (needle, err)
    # Refused before the run started: no model trained, no row scored.
    assert not (out / "cache" / "train").exists()
    assert not list(out.glob("**/*.pt")) and not (out / "results.csv").exists()
    return err


# ---------------------------------------------------------------------------------------------
# 1. Method option values: one place (QuantMethod.resolve), every caller
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("method", "option", "value", "expect"),
    [
        ("adaround", "iterations", "-5", "an integer >= 1, got -5"),
        ("adaround", "lr", "nan", "a number > 0, got nan"),
        ("adaround", "batch_size", "0", "an integer >= 1, got 0"),
        ("adaround", "warmup", "1.5", ">= 0 and <= 1, got 1.5"),
        ("adaround", "reg_weight", "-0.1", ">= 0, got -0.1"),
        ("adaround", "max_images", "0", ">= 1, got 0"),
        ("adaround", "seed", "-1", ">= 0, got -1"),
        ("adaround", "beta_end", "0.0", "> 0, got 0.0"),
        ("qat", "epochs", "0", "an integer >= 1, got 0"),
        ("qat", "batch_size", "-4", "an integer >= 0, got -4"),
        ("qat", "lr", "inf", "a number > 0, got inf"),
        ("qat", "weight_decay", "-1e-4", ">= 0, got -0.0001"),
        ("qat", "log_every", "0", ">= 1, got 0"),
        ("cle_bc", "iterations", "0", "an integer >= 1, got 0"),
    ],
)
def test_bad_method_option_value_exits_2_naming_it(tmp_path, capsys, method, option, value, expect):
    text = _BASE + _quant(
        f"method_options = {{{method} = {{{option} = {value}}}}}", f'["ptq", "{method}"]'
    )
    _refused(
        tmp_path, capsys, text, f"quant.method_options.{method}: option '{option}' must be", expect
    )


def test_method_option_checks_apply_to_quantize_too():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))
    net(torch.zeros(1, 3, 8, 8))
    calib = [torch.randn(8, 3, 8, 8)]
    with pytest.raises(ValueError, match=r"method 'adaround': option 'iterations' must be an "):
        quant.quantize(
            net.eval(), "W8A8", calib, method="adaround", method_options={"iterations": -5}
        )
    with pytest.raises(ValueError, match=r"method 'qat': option 'epochs' must be an integer >= 1"):
        get_method("qat").resolve({"epochs": 0})
    # type errors keep their kind; a valid value is accepted and an int becomes a float
    with pytest.raises(TypeError, match="'iterations'"):
        get_method("adaround").resolve({"iterations": 2.5})
    assert get_method("qat").resolve({"lr": 1})["lr"] == 1.0


@pytest.mark.parametrize("name", available_methods())
def test_every_method_default_passes_its_own_checks(name):
    spec = get_method(name)
    assert set(spec.checks) <= set(spec.defaults)
    assert spec.resolve(dict(spec.defaults)) == spec.resolve(None)
    numeric = [k for k, v in spec.defaults.items() if type(v) in (int, float)]
    assert set(numeric) <= set(spec.checks), f"{name}: options without a range check"


def test_a_method_registered_with_a_check_for_an_unknown_option_is_refused():
    from quantcal.quant.methods import QuantMethod, integer_option

    with pytest.raises(ValueError, match="checks for options it does not take: steps"):
        QuantMethod("x", lambda *a: {}, {"iterations": 1}, checks={"steps": integer_option(1)})


# ---------------------------------------------------------------------------------------------
# 2. Plan budgets: the same checks as quant.PlanBudget and `quantcal plan`
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("plans", "needles"),
    [
        ("{max_accuracy_drop = -1}", ("quant.plans.max_accuracy_drop", "got -1")),
        ("{max_accuracy_drop = nan}", ("quant.plans.max_accuracy_drop", "got nan")),
        ("{max_ece_rise = 2.0}", ("quant.plans.max_ece_rise", "got 2.0")),
        ('{max_ece_rise = "none"}', ("quant.plans.max_ece_rise", "'none'", "plan:accuracy")),
        ('{recal = "temprature"}', ("quant.plans.recal", "'temprature'", "temperature")),
        ('{cost = "latency"}', ("quant.plans.cost", "'latency'", "bops")),
        ('{levels = ["W4A4", "W8A8"]}', ("quant.plans.levels", "most to fewest bits")),
        ('{levels = ["fp32", "W4A4"]}', ("quant.plans.levels", "'fp32'")),
        ('{levels = ["W8A8"]}', ("quant.plans.levels", "at least two")),
        ('{levels = ["W8A8", "W8A8"]}', ("quant.plans.levels", "none twice")),
        ('{levels = ["W8A8", "bogus"]}', ("quant.plans.levels", "'bogus'")),
    ],
)
def test_bad_plan_setting_exits_2_naming_it(tmp_path, capsys, plans, needles):
    _refused(tmp_path, capsys, _BASE + _quant(f"plans = {plans}"), *needles)


def test_plan_checks_are_the_plan_budgets_own():
    """One function: the study's message is PlanBudget's with the study key as its name."""
    raw = {"model": [{"arch": "shufflenetv2", "width": 0.1}]}
    with pytest.raises(ValueError) as in_study:
        from_toml_dict({**raw, "quant": {"plans": {"max_accuracy_drop": -1}}})
    with pytest.raises(ValueError) as in_api:
        quant.PlanBudget(max_accuracy_drop=-1)
    assert str(in_study.value).replace("quant.plans.", "PlanBudget.") == str(in_api.value)
    with pytest.raises(ValueError) as via_cli_label:
        qplan.check_budget(0.01, "none", "temperature", label=lambda k: "--" + k.replace("_", "-"))
    assert str(via_cli_label.value).startswith("--max-ece-rise must be a fraction")


def test_plan_levels_default_to_the_study_precisions_most_bits_first():
    raw = {
        "model": [{"arch": "shufflenetv2", "width": 0.1}],
        "quant": {"precisions": ["fp32", "W4A4", "W8A8", "w4a8"], "plans": True},
    }
    assert from_toml_dict(raw).plans["levels"] == ["W8A8", "W4A8", "W4A4"]
    raw["quant"]["plans"] = {"levels": ["w8a8", "W4A4"]}
    assert from_toml_dict(raw).plans["levels"] == ["W8A8", "W4A4"]
    raw["quant"] = {"precisions": ["fp32", "W4A4"], "plans": True}
    with pytest.raises(ValueError, match="at least two quantized precisions"):
        from_toml_dict(raw)


# ---------------------------------------------------------------------------------------------
# 3. [report] budgets
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("line", "needles"),
    [
        ('max_ece_rise = "none"', ("report.max_ece_rise", "'none'", "number in [0, 1]")),
        ("max_ece_rise = false", ("report.max_ece_rise", "False")),
        ("max_accuracy_drop = -0.5", ("report.max_accuracy_drop", "-0.5")),
        ("max_accuracy_drop = nan", ("report.max_accuracy_drop", "nan")),
    ],
)
def test_bad_report_budget_exits_2_naming_it(tmp_path, capsys, line, needles):
    err = _refused(tmp_path, capsys, _BASE + f"\n[report]\n{line}\n", *needles)
    assert "could not convert" not in err


# ---------------------------------------------------------------------------------------------
# 4. Seeds
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("seeds", "needle"),
    [("[-1]", "got -1"), ("[0, -3]", "got -3"), ("[4294967296]", "4294967296"), ("[1.5]", "1.5")],
)
def test_bad_seed_exits_2_naming_it(tmp_path, capsys, seeds, needle):
    text = _BASE.replace("seeds = [0]", f"seeds = {seeds}")
    err = _refused(tmp_path, capsys, text, "seeds", needle)
    assert "dataset" not in err.lower()


# ---------------------------------------------------------------------------------------------
# 5. Files that are not regular files: model.checkpoint and npz: datasets
# ---------------------------------------------------------------------------------------------
def _not_a_file(tmp_path: Path, kind: str) -> tuple[str, str]:
    if kind == "folder":
        (tmp_path / "dir").mkdir()
        return str(tmp_path / "dir"), "is a folder"
    if kind == "empty":
        (tmp_path / "empty.bin").write_bytes(b"")
        return str(tmp_path / "empty.bin"), "is empty"
    return os.devnull, "is not a regular file"


@pytest.mark.parametrize("kind", ["folder", "devnull", "empty"])
def test_checkpoint_that_is_not_a_file_exits_2_saying_what_it_is(tmp_path, capsys, kind):
    path, what = _not_a_file(tmp_path, kind)
    text = _BASE.replace("width = 0.1\n", f'width = 0.1\ncheckpoint = "{path}"\n')
    err = _refused(tmp_path, capsys, text, "model.checkpoint", path, what)
    assert "does not exist" not in err and "no file" not in err


def test_missing_checkpoint_still_says_it_does_not_exist(tmp_path, capsys):
    path = tmp_path / "gone.pt"
    text = _BASE.replace("width = 0.1\n", f'width = 0.1\ncheckpoint = "{path}"\n')
    _refused(tmp_path, capsys, text, "model.checkpoint", "does not exist")


@pytest.mark.parametrize("kind", ["folder", "devnull", "empty"])
def test_npz_dataset_that_is_not_a_file_exits_2_saying_what_it_is(tmp_path, capsys, kind):
    path, what = _not_a_file(tmp_path, kind)
    text = _BASE.replace('datasets = ["digits"]', f'datasets = ["npz:{path}"]')
    err = _refused(tmp_path, capsys, text, path, what)
    assert "does not exist" not in err
    with pytest.raises(ValueError, match=what):
        data.load_dataset(f"npz:{path}")
    with pytest.raises(ValueError, match=what):
        data.dataset_digest(f"npz:{path}")
    with pytest.raises(ValueError, match=what):
        data.val_held_out_of_train(f"npz:{path}")


def test_missing_npz_is_still_dataset_not_found(tmp_path):
    for fn in (data.load_dataset, data.dataset_digest, data.val_held_out_of_train):
        with pytest.raises(data.DatasetNotFoundError, match="does not exist"):
            fn(f"npz:{tmp_path / 'missing.npz'}")


# ---------------------------------------------------------------------------------------------
# 6. Normalisation of the wrong length
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits():
    return data.load_dataset("digits")


def test_mean_of_the_wrong_length_says_what_to_give(digits):
    with pytest.raises(ValueError) as err:
        data.with_normalization(digits, [0.5, 0.5, 0.5], [0.5])
    assert (
        str(err.value) == "mean has 3 values but the dataset (digits) has 1 channel: give 1 value"
    )
    with pytest.raises(ValueError, match=r"^--std has 2 values but the dataset \(digits\)"):
        data.with_normalization(digits, [0.5], [0.2, 0.3], names=("--mean", "--std"))
    with pytest.raises(ValueError, match="std must hold finite numbers"):
        data.with_normalization(digits, 0.5, float("nan"))
    with pytest.raises(ValueError, match="std must be > 0"):
        data.with_normalization(digits, 0.5, 0.0)
    assert data.with_normalization(digits, [0.25], 0.5).mean == (0.25,)


def test_three_channel_message_offers_both_forms():
    with pytest.raises(ValueError) as err:
        data.per_channel([0.1, 0.2], 3, "data.mean", dataset="cifar100")
    assert str(err.value) == (
        "data.mean has 2 values but the dataset (cifar100) has 3 channels: give 3 values "
        "(one per channel) or 1 (used for every channel)"
    )


# ---------------------------------------------------------------------------------------------
# 7. A damaged QAT work file heals like a damaged training checkpoint
# ---------------------------------------------------------------------------------------------
_QAT = _BASE + _quant("method_options = {qat = {epochs = 1, batch_size = 128}}", '["qat"]')


def _csv(out: Path) -> list[dict]:
    with open(out / "results.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_truncated_qat_checkpoint_heals_to_identical_results(tmp_path, capsys):
    cfg = _write(tmp_path, _QAT.replace('"W8A8", "W4A4"', '"W4A4"'))
    out = tmp_path / "run"
    study.run_study(cfg, out, quiet=True, report=False)
    clean = (out / "results.csv").read_bytes()
    assert {r["status"] for r in _csv(out)} == {"ok"}
    (last,) = (out / "cache" / "qat").glob("*/last.pt")
    # A run killed during the fine-tuning: the cell's logits and row were never written, and
    # the resume checkpoint is cut in half.
    for stage in ("logits", "rows"):
        shutil.rmtree(out / "cache" / stage)
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    capsys.readouterr()
    study.run_study(cfg, out, quiet=False, report=False)
    err = capsys.readouterr().err
    assert (out / "results.csv").read_bytes() == clean
    assert "was damaged" in err and "qat" in err and "last.pt" in err, err
    assert "Traceback" not in err
    healed = healed_entries(out / "cache")
    assert [Path(h["file"]).parts[:2] for h in healed] == [("cache", "qat")]
    assert "truncated" in healed[0]["reason"]
    assert train.load_checkpoint(last)["epoch"] == 1  # rewritten whole
    study.run_study(cfg, out, quiet=False, report=False)  # healed for good: nothing to say
    assert "was damaged" not in capsys.readouterr().err


def _tiny_split(n: int = 64) -> data.Split:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8, generator=g)
    labels = torch.arange(n) % 4
    return data.Split(
        images=images, labels=labels, mean=(0.5,), std=(0.25,), indices=torch.arange(n)
    )


def _tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 4))


def test_train_heal_restarts_from_scratch_and_matches_a_clean_run(tmp_path):
    cfg = train.TrainConfig(epochs=2, batch_size=16, lr=0.05, augment=False, deterministic=True)
    split = _tiny_split()
    clean = train.train(_tiny_net(), split, cfg, out_dir=tmp_path / "a", progress=False)
    ck = tmp_path / "b" / "last.pt"
    train.train(_tiny_net(), split, cfg, out_dir=tmp_path / "b", progress=False)
    ck.write_bytes(ck.read_bytes()[:100])
    with pytest.raises(ValueError, match="truncated, corrupt"):  # no heal: asks to delete it
        train.train(_tiny_net(), split, cfg, out_dir=tmp_path / "b", progress=False)
    calls = []
    healed = train.train(
        _tiny_net(),
        split,
        cfg,
        out_dir=tmp_path / "b",
        progress=False,
        heal=lambda p, why: calls.append((p, why)),
    )
    assert calls == [(ck, calls[0][1])] and "truncated" in calls[0][1]
    assert "Delete" not in calls[0][1]  # the reason, not the advice
    for a, b in zip(clean.model.state_dict().values(), healed.model.state_dict().values()):
        assert torch.equal(a, b)
    assert train.load_checkpoint(ck)["epoch"] == 2


def test_heal_work_file_outside_a_run_warns_and_inside_records(tmp_path):
    loose = tmp_path / "work" / "last.pt"
    loose.parent.mkdir()
    loose.write_bytes(b"x")
    assert run_cache_of(loose) is None
    with pytest.warns(UserWarning, match="last.pt was damaged"):
        heal_work_file(loose, "truncated", lambda _line: None)
    assert not loose.exists()
    run = tmp_path / "run"
    study_run = run / "cache" / "qat" / "abc"
    study_run.mkdir(parents=True)
    (run / ".quantcal-run").write_text("{}")
    inside = study_run / "last.pt"
    inside.write_bytes(b"x")
    lines: list[str] = []
    heal_work_file(inside, "truncated", lines.append)
    assert not inside.exists() and "cache/qat/abc/last.pt was damaged" in lines[0]
    assert json.loads((run / "cache" / "healed.json").read_text())[0]["reason"] == "truncated"


# ---------------------------------------------------------------------------------------------
# The shared checks: _inputs.check_number / check_input_file
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "kwargs", "ok"),
    [
        (3, {"integer": True, "minimum": 1}, True),
        (1, {"integer": True, "minimum": 1}, True),
        (0, {"integer": True, "minimum": 1}, False),
        (2.0, {"integer": True}, False),
        (True, {"integer": True}, False),
        (False, {}, False),
        ("3", {}, False),
        (None, {}, False),
        (math.nan, {}, False),
        (math.inf, {}, False),
        (-math.inf, {"maximum": 0}, False),
        (0.0, {"minimum": 0, "exclusive_minimum": True}, False),
        (1e-9, {"minimum": 0, "exclusive_minimum": True}, True),
        (1.0, {"minimum": 0, "maximum": 1}, True),
        (1.0000001, {"minimum": 0, "maximum": 1}, False),
        (5, {}, True),
    ],
)
def test_check_number_edges(value, kwargs, ok):
    if ok:
        assert check_number(value, "x", **kwargs) == value
    else:
        with pytest.raises(ValueError, match=r"^x must be (an integer|a number)"):
            check_number(value, "x", **kwargs)


def test_check_number_names_the_range():
    with pytest.raises(ValueError, match=r"^k must be a number > 0 and <= 1, got 0$"):
        check_number(0, "k", minimum=0, maximum=1, exclusive_minimum=True)


def test_check_input_file_edges(tmp_path):
    good = tmp_path / "f.bin"
    good.write_bytes(b"1")
    assert check_input_file(good, "--x") == good
    with pytest.raises(FileNotFoundError, match=r"^--x: .*missing does not exist$"):
        check_input_file(tmp_path / "missing", "--x")
    with pytest.raises(ValueError, match="is a folder"):
        check_input_file(tmp_path, "--x")
    with pytest.raises(ValueError, match="is not a regular file"):
        check_input_file(os.devnull, "--x")
    (tmp_path / "e").write_bytes(b"")
    with pytest.raises(ValueError, match=r"is empty \(0 bytes\)"):
        check_input_file(tmp_path / "e", "--x")
    if os.geteuid() != 0:  # root reads anything
        good.chmod(0)
        try:
            with pytest.raises(ValueError, match="not readable"):
                check_input_file(good, "--x")
        finally:
            good.chmod(0o644)
