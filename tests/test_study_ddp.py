"""A study under torchrun (two CPU processes, gloo): the quantize stage's ``prepare`` trains the
QAT cells with every rank together, rank 0 takes the result through the stage memo and writes
every row; the other rank only helps to train (``quantcal.study.stages.quantize.distribute``)."""

from __future__ import annotations

import csv
import textwrap

import torch

from _torchrun import run_two_processes

_WORKER = textwrap.dedent(
    """
    import sys
    import torch
    from quantcal import study

    torch.set_num_threads(1)
    study.run_study(
        {
            "name": "ddp",
            "seeds": [0],
            "data": {"datasets": ["digits"]},
            "model": [{"arch": "resnet20", "width": 0.25}],
            "train": {"epochs": 1, "batch_size": 64, "lr": 0.05, "augment": False},
            "quant": {
                "precisions": ["fp32", "W4A4"],
                "observers": ["minmax"],
                "methods": ["ptq", "qat"],
                "method_options": {"qat": {"epochs": 1}},
            },
            "recal": {"methods": ["none", "temperature"]},
            "metrics": {"bootstrap": 0},
        },
        sys.argv[1],
        quiet=True,
        report=False,
        device="cpu",
    )
    """
)


def test_a_study_with_qat_under_torchrun(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    out = tmp_path / "run"
    run_two_processes(script, str(out), timeout=400)
    with open(out / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 6 and all(r["status"] == "ok" for r in rows), rows
    assert sorted({r["method"] for r in rows}) == ["-", "ptq", "qat"]
    (qat_dir,) = (out / "cache" / "qat").iterdir()
    assert torch.load(qat_dir / "last.pt", weights_only=True)["world_size"] == 2
    (train_dir,) = (out / "cache" / "train").iterdir()
    assert torch.load(train_dir / "last.pt", weights_only=True)["world_size"] == 2
