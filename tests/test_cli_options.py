"""No option is accepted and then ignored: each option of each sub-command either changes what
the command will do (its resolved request) or is refused with exit status 2 and a message that
names it. Checked by walking the parser, so a new option without a sample here fails the test."""

from __future__ import annotations

import argparse
import json

import pytest

from quantcal import cli
from quantcal.findings.rows import RESULT_COLUMNS
from quantcal.store.runfolder import MARKER


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(p: argparse.ArgumentParser) -> list[str]:
    """Each option string (the long one) and positional dest of a parser, help excluded."""
    out = []
    for a in p._actions:
        if isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        out.append(a.option_strings[-1] if a.option_strings else a.dest)
    return out


@pytest.fixture
def files(tmp_path):
    """Stand-ins for the files the commands take (resolve only checks that they are there)."""
    f = {}
    for name in ("model.pt", "other.pt", "m.onnx", "n.onnx", "val.npz", "test.npz", "v2.npz"):
        (tmp_path / name).write_bytes(b"x")
        f[name] = str(tmp_path / name)
    run = tmp_path / "run"
    run.mkdir()
    (run / MARKER).write_text("{}")
    header = ",".join([*RESULT_COLUMNS[: RESULT_COLUMNS.index("recal") + 1], "status"])
    (run / "results.csv").write_text(header + "\n")
    (run / "config.toml").write_text('name = "x"\n')
    (run / "cache").mkdir()
    other = tmp_path / "run2"
    other.mkdir()
    for name in ("config.toml", "results.csv", MARKER):
        (other / name).write_text((run / name).read_text())
    (other / "cache").mkdir()
    f["run"], f["run2"], f["tmp"] = str(run), str(other), tmp_path
    return f


def _contexts(f) -> dict[str, tuple[str, list[str]]]:
    """name -> (sub-command, base argv) of each path a command can take."""
    return {
        "run": ("run", ["run", "demo", "--out", str(f["tmp"] / "o")]),
        "train": ("train", ["train", "--model", "resnet20", "--out", str(f["tmp"] / "o")]),
        "eval-checkpoint": (
            "eval",
            ["eval", "--checkpoint", f["model.pt"], "--model", "resnet20", "--dataset", "digits"],
        ),
        "eval-onnx": ("eval", ["eval", "--onnx", f["m.onnx"], "--dataset", "digits"]),
        "eval-logits": ("eval", ["eval", "--logits", f["val.npz"], f["test.npz"]]),
        "report": ("report", ["report", f["run"]]),
        "plan": (
            "plan",
            [
                "plan",
                "--checkpoint",
                f["model.pt"],
                "--model",
                "resnet20",
                "--dataset",
                "digits",
                "--out",
                str(f["tmp"] / "plan.json"),
            ],
        ),
        "compare": ("compare", ["compare", f["run"], f["run2"]]),
        "data": ("data", ["data", "download", "cifar100"]),
        "data-export": ("data export", ["data", "export", "cifar100", str(f["tmp"] / "c.npz")]),
        "list": ("list", ["list"]),
    }


def _samples(f) -> dict[str, dict[str, list[str]]]:
    """sub-command -> option -> argv fragment giving it a value other than the default (a
    positional: the argv to append replaces nothing; the base is rebuilt without it)."""
    common = {
        "--device": ["--device", "cpu"],
        "--quiet": ["--quiet"],
        "--threads": ["--threads", "1"],
    }
    return {
        "run": {
            "study": ["cifar100_small"],
            "--out": ["--out", str(f["tmp"] / "o2")],
            "--shard": ["--shard", "1/2"],
            "--dataset": ["--dataset", "pathmnist"],
            "--set": ["--set", "train.epochs=3"],
            "--fresh": ["--fresh"],
            "--force": ["--force"],
            **common,
        },
        "train": {
            "--model": ["--model", "shufflenetv2"],
            "--width": ["--width", "0.5"],
            "--dataset": ["--dataset", "pathmnist"],
            "--epochs": ["--epochs", "3"],
            "--seed": ["--seed", "2"],
            "--set": ["--set", "lr=0.05"],
            "--out": ["--out", str(f["tmp"] / "o2")],
            "--force": ["--force"],
            **common,
        },
        "eval": {
            "--checkpoint": ["--checkpoint", f["other.pt"]],
            "--onnx": ["--onnx", f["n.onnx"]],
            "--logits": ["--logits", f["v2.npz"], f["test.npz"]],
            "--model": ["--model", "shufflenetv2"],
            "--mean": ["--mean", "0.5", "--std", "0.25"],
            "--std": ["--mean", "0.5", "--std", "0.25"],
            "--transform": ["--transform", "mymod:prep"],
            "--width": ["--width", "0.5"],
            "--dataset": ["--dataset", "pathmnist"],
            "--precisions": ["--precisions", "fp32,W4A4"],
            "--observers": ["--observers", "mse"],
            "--methods": ["--methods", "cle_bc"],
            "--recal": ["--recal", "none,isotonic"],
            "--recal-fit": ["--recal-fit", "test_crossfit"],
            "--seed": ["--seed", "3"],
            "--plans": ["--plans"],
            "--attribution": ["--attribution", "block"],
            "--attribution-samples": ["--attribution-samples", "50"],
            "--shifts": ["--shifts", "jpeg:5"],
            "--ood": ["--ood", "blurred"],
            "--set": ["--set", "metrics.bootstrap=200"],
            "--quantized": ["--quantized", "int8", f["v2.npz"], f["test.npz"]],
            "--out": ["--out", str(f["tmp"] / "o2")],
            "--force": ["--force"],
            **common,
        },
        "report": {
            "run_dir": [f["run2"]],
            "--format": ["--format", "md"],
            "--force": ["--force"],
        },
        "plan": {
            "--checkpoint": ["--checkpoint", f["other.pt"]],
            "--model": ["--model", "shufflenetv2"],
            "--width": ["--width", "0.5"],
            "--dataset": ["--dataset", "pathmnist"],
            "--mean": ["--mean", "0.5", "--std", "0.25"],
            "--std": ["--mean", "0.5", "--std", "0.25"],
            "--levels": ["--levels", "W8A8,W4A4"],
            "--max-accuracy-drop": ["--max-accuracy-drop", "0.02"],
            "--max-ece-rise": ["--max-ece-rise", "none"],
            "--recal": ["--recal", "vector"],
            "--confidence": ["--confidence", "none"],
            "--cost": ["--cost", "weight_bytes"],
            "--seed": ["--seed", "3"],
            "--out": ["--out", str(f["tmp"] / "p2.json")],
            "--force": ["--force"],
            **common,
        },
        "compare": {
            "run_a": [f["run2"], f["run"]],
            "run_b": [f["run"], f["run"]],
            "--metric": ["--metric", "accuracy"],
            "--format": ["--format", "json"],
            "--bootstrap": ["--bootstrap", "200"],
        },
        "data": {"name": ["pathmnist"], "--root": ["--root", str(f["tmp"] / "data")]},
        "data export": {
            "name": ["pathmnist", str(f["tmp"] / "c.npz")],
            "out": ["cifar100", str(f["tmp"] / "d.npz")],
            "--root": ["--root", str(f["tmp"] / "data")],
            "--force": ["--force"],
        },
        "list": {},
    }


def _positionals(p: argparse.ArgumentParser) -> set[str]:
    return {
        a.dest
        for a in p._actions
        if not a.option_strings
        and not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))
    }


def _argv(
    base: list[str], option: str, fragment: list[str], positionals: set[str], command: str
) -> list[str]:
    """``base`` with ``fragment`` appended; for a positional, the base's positionals replaced."""
    if option not in positionals:
        return [*base, *fragment]
    if command == "data":
        return ["data", "download", *fragment, *base[3:]]
    if command == "data export":  # both positionals, replaced together
        return ["data", "export", *fragment, *base[4:]]
    n = len(positionals)  # report, compare, run: the positionals follow the command
    return [base[0], *fragment[: n if command == "compare" else 1], *base[1 + n :]]


def test_every_option_has_a_sample(files):
    """A new option must be added to this walk (and so must say what it does on each path)."""
    subs = _subparsers(cli.build_parser())
    data = _subparsers(subs["data"])
    assert set(data) == {"download", "export"}
    subs.update(data=data["download"], **{"data export": data["export"]})
    samples = _samples(files)
    assert set(subs) == set(samples)
    for command, p in subs.items():
        missing = set(_options(p)) - set(samples[command])
        assert not missing, f"quantcal {command}: add a sample for {sorted(missing)}"


@pytest.mark.parametrize(
    "context",
    [
        "run",
        "train",
        "eval-checkpoint",
        "eval-onnx",
        "eval-logits",
        "report",
        "plan",
        "compare",
        "data",
        "data-export",
        "list",
    ],
)
def test_no_option_is_accepted_and_ignored(files, context, capsys):
    command, base = _contexts(files)[context]
    baseline = cli.resolve(base)
    top = _subparsers(cli.build_parser())
    if command.startswith("data"):
        p = _subparsers(top["data"])["export" if command == "data export" else "download"]
    else:
        p = top[command]
    positionals = _positionals(p)
    applied, refused = [], []
    for option, fragment in _samples(files)[command].items():
        argv = _argv(base, option, fragment, positionals, command)
        try:
            request = cli.resolve(argv)
        except SystemExit as exc:  # argparse: e.g. two sources of one exclusive group
            assert exc.code == 2
            err = capsys.readouterr().err
            assert option in err, f"{argv}: argparse refused without naming {option}: {err}"
            refused.append(option)
            continue
        except (ValueError, FileNotFoundError) as exc:
            shown = option if option.startswith("--") else ""
            assert shown in str(exc), f"{argv}: refused without naming {option}: {exc}"
            refused.append(option)
            continue
        assert request != baseline, f"{context}: {option} was accepted and changed nothing"
        applied.append(option)
    # Each path accepts the options that are its own (not everything is simply refused).
    assert applied or command == "list"


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--onnx", "{m.onnx}", "--dataset", "digits", "--precisions", "W4A4"], "--precisions"),
        (["--onnx", "{m.onnx}", "--dataset", "digits", "--methods", "adaround"], "--methods"),
        (["--logits", "{val.npz}", "{test.npz}", "--precisions", "W4A4"], "--precisions"),
        (["--logits", "{val.npz}", "{test.npz}", "--dataset", "digits"], "--dataset"),
        (
            ["--logits", "{val.npz}", "{test.npz}", "--recal", "none,temperature_fp32"],
            "temperature_fp32",
        ),
        (
            ["--onnx", "{m.onnx}", "--dataset", "digits", "--recal", "temperature_fp32"],
            "temperature_fp32",
        ),
        (["--logits", "{val.npz}", "{test.npz}", "--mean", "0", "--std", "1"], "--mean"),
        (["--logits", "{val.npz}", "{test.npz}", "--device", "cuda"], "--device"),
        (
            [
                "--checkpoint",
                "{model.pt}",
                "--model",
                "resnet20",
                "--dataset",
                "digits",
                "--attribution-samples",
                "10",
            ],
            "--attribution-samples",
        ),
    ],
)
def test_options_that_do_not_apply_exit_2_before_any_work(files, argv, named, capsys):
    """The issue's examples: exit 2, a sentence naming the option, no traceback, no folder."""
    out = files["tmp"] / "never"
    argv = [files[a[1:-1]] if a.startswith("{") else a for a in argv]
    assert cli.main(["eval", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err and err.startswith("quantcal eval: error:")
    assert not out.exists()


def test_default_recal_of_given_predictions_has_no_fp32_reuse(files):
    """temperature_fp32 is not silently dropped any more: the default for --onnx/--logits is
    'none,temperature', and asking for it is refused (above)."""
    req = cli.resolve(["eval", "--logits", files["val.npz"], files["test.npz"]])
    assert req.recal == ("none", "temperature") and req.recal_fit == "val"


def test_plan_out_rules(files, capsys):
    """plan --out: a folder or a user's file is refused before the search; quantcal's own plan
    file is replaced."""
    base = ["plan", "--checkpoint", files["model.pt"], "--model", "resnet20", "--dataset", "digits"]
    with pytest.raises(ValueError, match="is a folder"):
        cli.resolve([*base, "--out", files["run"]])
    mine = files["tmp"] / "notes.json"
    mine.write_text('{"my": "notes"}')
    with pytest.raises(ValueError, match="not a plan quantcal wrote"):
        cli.resolve([*base, "--out", str(mine)])
    assert cli.resolve([*base, "--out", str(mine), "--force"]).force
    ours = files["tmp"] / "old_plan.json"
    ours.write_text(json.dumps({"created_by": "quantcal plan", "plan": {}}))
    assert cli.resolve([*base, "--out", str(ours)]).out == ours
    assert mine.read_text() == '{"my": "notes"}'
