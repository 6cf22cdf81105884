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
