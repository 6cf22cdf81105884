"""Logits in, verdict out: an fp32 reference and quantized logits from any runtime give the same
verdicts, paired differences and why-section a study gives, from the CLI and from Python."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

import quantcal
from quantcal import cli
from quantcal.calibration import metrics
from quantcal.findings.verdicts import ACCURACY_LOST, SAFE


def _fp32(n: int, seed: int, classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of a calibrated model: each label drawn from the softmax of its logits."""
    g = torch.Generator().manual_seed(seed)
    z = 3 * torch.randn(n, classes, generator=g)
    labels = torch.multinomial(z.softmax(1), 1, generator=g).squeeze(1)
    return z, labels


def _broken(z: torch.Tensor, seed: int) -> torch.Tensor:
    """A 4-bit-like collapse: predictions scrambled, confidence kept high."""
    g = torch.Generator().manual_seed(seed)
    return (z[torch.randperm(z.shape[0], generator=g)] * 3).contiguous()


def _save(path, z, y) -> str:
    np.savez(path, logits=z.numpy(), labels=y.numpy())
    return str(path)


@pytest.fixture
def logit_files(tmp_path):
    (zv, yv), (zt, yt) = _fp32(600, 0), _fp32(800, 1)
    noise = torch.Generator().manual_seed(5)
    files = {
        "fv": _save(tmp_path / "fp32_val.npz", zv, yv),
        "ft": _save(tmp_path / "fp32_test.npz", zt, yt),
        # int8: the fp32 logits with a little noise; int4: collapsed
        "8v": _save(
            tmp_path / "int8_val.npz", zv + 0.05 * torch.randn(zv.shape, generator=noise), yv
        ),
        "8t": _save(
            tmp_path / "int8_test.npz", zt + 0.05 * torch.randn(zt.shape, generator=noise), yt
        ),
        "4v": _save(tmp_path / "int4_val.npz", _broken(zv, 2), yv),
        "4t": _save(tmp_path / "int4_test.npz", _broken(zt, 3), yt),
    }
    return tmp_path, files


def _eval(files, out, *extra):
    return cli.main(
        [
            "eval",
            "--logits",
            files["fv"],
            files["ft"],
            "--quantized",
            "int8",
            files["8v"],
            files["8t"],
            "--quantized",
            "int4",
            files["4v"],
            files["4t"],
            "--out",
            str(out),
            "--quiet",
            *extra,
        ]
    )


def test_eval_of_logits_with_a_reference_gives_verdicts(logit_files, capsys):
    tmp, files = logit_files
    out = tmp / "ev"
    assert _eval(files, out) == 0
    with open(out / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["precision"] for r in rows} == {"fp32", "int8", "int4"}
    recals = {(r["precision"], r["recal"]) for r in rows}
    assert ("int8", "temperature_fp32") in recals and ("fp32", "temperature_fp32") not in recals
    # The paired difference vs fp32 is there and re-derives from the arrays.
    r = next(r for r in rows if r["precision"] == "int4" and r["recal"] == "none")
    z4, y = (torch.from_numpy(np.load(files["4t"])[k]) for k in ("logits", "labels"))
    zf = torch.from_numpy(np.load(files["ft"])["logits"])
    expected = metrics.ece(z4, y) - metrics.ece(zf, y)
    assert float(r["ece_diff_vs_fp32"]) == pytest.approx(expected, abs=1e-6)
    html = (out / "report.html").read_text()
    assert ACCURACY_LOST in html  # int4 collapsed
    diag = json.loads((out / "details.json").read_text())["diagnostics"]
    assert {d["precision"] for d in diag} == {"int8", "int4"}
    assert "Traceback" not in capsys.readouterr().err


def test_compare_takes_two_eval_folders(logit_files, capsys):
    tmp, files = logit_files
    a, b = tmp / "a", tmp / "b"
    assert _eval(files, a) == 0
    assert _eval(files, b, "--recal-fit", "test_crossfit") == 0
    capsys.readouterr()
    assert cli.main(["compare", str(a), str(b), "--format", "json", "--bootstrap", "50"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["rows"]) == 3 * 3 - 1  # fp32 has no temperature_fp32 row
    assert all(r["paired"] for r in result["rows"])
    none_rows = [r for r in result["rows"] if r["recal"] == "none"]
    assert all(abs(r["diff"]) < 1e-12 for r in none_rows)  # nothing refitted: identical


def test_quantized_logits_must_be_of_the_same_images(logit_files, capsys):
    tmp, files = logit_files
    z, y = _fp32(800, 9)  # other labels
    other = _save(tmp / "other.npz", z, y)
    argv = ["eval", "--logits", files["fv"], files["ft"], "--quantized", "int8", files["8v"]]
    assert cli.main([*argv, other, "--out", str(tmp / "x")]) == 2
    err = capsys.readouterr().err
    assert "test labels of 'int8' differ from the fp32 reference" in err
    assert not (tmp / "x").exists()


def test_quantized_needs_logits_and_a_name(logit_files, capsys):
    tmp, files = logit_files
    bad = [
        [
            "--onnx",
            files["fv"],
            "--dataset",
            "digits",
            "--quantized",
            "q",
            files["8v"],
            files["8t"],
        ],
        ["--logits", files["fv"], files["ft"], "--quantized", "fp32", files["8v"], files["8t"]],
    ]
    for argv in bad:
        assert cli.main(["eval", *argv, "--out", str(tmp / "y")]) == 2
        assert "--quantized" in capsys.readouterr().err


def test_python_one_liner():
    # Enough images that a calibrated model's binned ECE (biased upwards) sits under 5 %.
    (zv, yv), (zt, yt) = _fp32(3000, 0), _fp32(4000, 1)
    same = quantcal.verdict(zt, zt.clone(), yt, val=(zv, zv.clone(), yv), bootstrap=100)
    assert same.outcome == SAFE
    lost = quantcal.verdict(zt, _broken(zt, 3), yt, bootstrap=100)  # cross-fitted on test
    assert lost.outcome == ACCURACY_LOST
    with pytest.raises(ValueError, match="quantized"):
        quantcal.verdict(zt, zt[:10], yt)
