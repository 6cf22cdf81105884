"""The preprocessing check reads a model's first BatchNorm: a wrong normalisation that leaves the
model well above chance with a plausible temperature is still flagged, a correctly fed model is
not."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from torch import nn

from quantcal import cli
from quantcal.calibration import diagnose
from quantcal.training import data

_BN_NET = """
from torch import nn


def build(num_classes, in_chans):
    return nn.Sequential(
        nn.Conv2d(in_chans, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes),
    )
"""


@pytest.fixture(scope="module")
def bn_model(tmp_path_factory):
    """A BatchNorm CNN trained outside quantcal on digits standardised with the dataset's own
    statistics (what quantcal feeds by default)."""
    import importlib.util

    folder = tmp_path_factory.mktemp("bn")
    (folder / "bnnet.py").write_text(_BN_NET)
    spec = importlib.util.spec_from_file_location("bnnet_fixture", folder / "bnnet.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    splits = data.load_dataset("digits")
    torch.manual_seed(0)
    net = mod.build(10, 1)
    x = torch.cat([b for b, _ in splits.train.batches(4096)])
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    for _ in range(80):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), splits.train.labels).backward()
        opt.step()
    torch.save(net.state_dict(), folder / "bn.pt")
    return folder, net.eval()


def test_mismatch_matches_a_numpy_rederivation(bn_model):
    _, net = bn_model
    splits = data.with_normalization(data.load_dataset("digits"), [0.0], [1.0])
    x = torch.cat([b for b, _ in splits.val.batches(256)])
    name, log_ratio, shift = diagnose.bn_input_mismatch(net, x)
    assert name == "1"
    h = net[0](x).detach().double().numpy()  # the first BatchNorm's input
    bn = net[1]
    mean, var = h.mean(axis=(0, 2, 3)), h.var(axis=(0, 2, 3))
    rm, rv = bn.running_mean.double().numpy(), bn.running_var.double().numpy()
    assert log_ratio == pytest.approx(float(np.median(np.log(var / rv))), rel=1e-9)
    assert shift == pytest.approx(float(np.median(np.abs(mean - rm) / np.sqrt(rv))), rel=1e-9)


def test_no_batchnorm_or_no_images_gives_nothing():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten())
    assert diagnose.bn_input_mismatch(net, torch.zeros(2, 1, 8, 8)) is None
    assert diagnose.input_statistics_notes(net, torch.zeros(2, 1, 8, 8)) == []
    bn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
    assert diagnose.bn_input_mismatch(bn, torch.zeros(0, 1, 8, 8)) is None


def test_model_state_is_left_as_it_was(bn_model):
    _, net = bn_model
    net.train()
    before = net[1].running_mean.clone()
    diagnose.bn_input_mismatch(net, torch.randn(8, 1, 8, 8) * 5)
    assert net.training and torch.equal(net[1].running_mean, before)
    net.eval()


def _eval(folder, out, *extra):
    return cli.main(
        [
            "eval",
            "--checkpoint",
            str(folder / "bn.pt"),
            "--model",
            f"{folder / 'bnnet.py'}:build",
            "--dataset",
            "digits",
            "--precisions",
            "fp32",
            "--recal",
            "none",
            "--out",
            str(out),
            "--quiet",
            *extra,
        ]
    )


def test_x_over_255_into_a_standardised_model_is_flagged(bn_model, tmp_path, capsys):
    folder, _ = bn_model
    assert _eval(folder, tmp_path / "raw", "--mean", "0", "--std", "1") == 0
    err = capsys.readouterr().err
    with open(tmp_path / "raw" / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    # Above the near-chance line (1.5 / K) with a plausible temperature: only the BatchNorm
    # check sees the mistake.
    assert float(rows[0]["accuracy"]) > 0.15 and "near chance" not in rows[0]["notes"]
    assert "first BatchNorm" in rows[0]["notes"] and "check the preprocessing" in err


def test_the_correct_preprocessing_raises_no_alarm(bn_model, tmp_path, capsys):
    folder, _ = bn_model
    assert _eval(folder, tmp_path / "ok") == 0
    with open(tmp_path / "ok" / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert "preprocessing" not in rows[0]["notes"]
    assert "check the preprocessing" not in capsys.readouterr().err


def test_a_check_that_cannot_run_is_named_not_silent():
    """A model whose forward fails on the sample batch: the note says the inputs were not
    checked (the cell itself is not failed for a check beside its numbers)."""

    class Picky(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(1)

        def forward(self, x):
            if x.shape[0] > 4:
                raise RuntimeError("batches of at most 4 images")
            return self.bn(x)

    (note,) = diagnose.input_statistics_notes(Picky().eval(), torch.zeros(8, 1, 4, 4))
    assert "could not run (RuntimeError: batches of at most 4 images)" in note
    assert "not checked" in note
