"""Quantization-aware training under torchrun: two CPU processes (gloo) fine-tune one model
together and end with the same integers, as ``train.train`` does for fp32 training."""

from __future__ import annotations

import textwrap

import torch

from _torchrun import run_two_processes

_WORKER = textwrap.dedent(
    """
    import os, sys
    import torch
    from torch import nn
    from quantcal import quant, train
    from quantcal.data import Split

    torch.set_num_threads(1)
    out = sys.argv[1]
    rank = int(os.environ["RANK"])
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(64) % 4
    images = (labels.view(-1, 1, 1, 1) * 60 + torch.randint(0, 40, (64, 3, 8, 8), generator=g))
    split = Split(images.to(torch.uint8), labels, (0.5,) * 3, (0.25,) * 3, torch.arange(64))
    torch.manual_seed(0)  # the same model on every rank
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    calib = [x for x, _ in split.batches(32)]
    cfg = train.TrainConfig(epochs=2, batch_size=16, lr=0.01, schedule="cosine", crop_padding=1)
    q = quant.quantize(model, "W4A4", calib, method="qat", train_data=split, train_config=cfg,
                       method_options={"epochs": 2, "lr": 0.01},
                       work_dir=os.path.join(out, "qat"))
    state = {n: layer.weight_int.clone() for n, layer in quant.quantized_layers(q)}
    state.update({n + ".act_scale": layer.act_scale.clone()
                  for n, layer in quant.quantized_layers(q)})
    torch.save(state, os.path.join(out, f"rank{rank}.pt"))
    """
)


def test_qat_under_torchrun_two_processes_agree(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    run_two_processes(script, str(tmp_path))
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0.keys() == r1.keys() and len(r0) == 6
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    ck = torch.load(tmp_path / "qat" / "last.pt", weights_only=True)
    assert ck["world_size"] == 2 and ck["epoch"] == 2
