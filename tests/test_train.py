"""quantcal.train: recipe config, schedule, resumable training, DDP, checkpoints, predict_logits.

Tiny synthetic data and a tiny CNN keep this file to a few seconds (the DDP test launches two
processes with torchrun and gloo).
"""

from __future__ import annotations

import math
import re
import textwrap

import pytest
import torch
from torch import nn

from _torchrun import run_two_processes
from quantcal.training import train as tr
from quantcal.training.data import Split, Splits
from quantcal.training.environment import Dist, init_process_group, resolve_device
from quantcal.training.train import TrainConfig, load_checkpoint, lr_multiplier, predict_logits


def _split(n=48, classes=3, size=8, seed=0):
    """Images whose brightness depends on the class, so a tiny CNN can learn them."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n, dtype=torch.int64) % classes
    base = (labels.float() * 200 / max(1, classes - 1)).view(n, 1, 1, 1)
    noise = torch.randint(-40, 41, (n, 3, size, size), generator=g).float()
    images = (base + noise).clamp(0, 255).to(torch.uint8)
    return Split(
        images=images,
        labels=labels,
        mean=(0.4, 0.4, 0.4),
        std=(0.3, 0.3, 0.3),
        indices=torch.arange(n, dtype=torch.int64),
    )


def _net(seed=0, classes=3):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3, padding=1, stride=2),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(0.1),  # consumes the global RNG, so resuming must restore it
        nn.Linear(8, classes),
    )


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), f"{k} differs"


# ------------------------------------------------------------------------------------------
# TrainConfig and the schedule
# ------------------------------------------------------------------------------------------
def test_defaults_are_the_study_recipe():
    c = TrainConfig()
    assert (c.epochs, c.batch_size, c.lr, c.momentum, c.weight_decay) == (200, 32, 0.1, 0.9, 1e-4)
    assert c.schedule == "cosine_restarts" and c.augment and not c.nesterov
    assert (c.amp, c.channels_last) == ("auto", "auto")


@pytest.mark.parametrize(
    "kw,field",
    [
        ({"epochs": 0}, "epochs"),
        ({"batch_size": 2.5}, "batch_size"),
        ({"lr": -1}, "lr"),
        ({"momentum": 1.0}, "momentum"),
        ({"schedule": "step"}, "schedule"),
        ({"amp": "fp16"}, "amp"),
        ({"channels_last": True}, "channels_last"),
        ({"warmup_epochs": 300}, "warmup_epochs"),
        ({"augment": "yes"}, "augment"),
        ({"crop_padding": -1}, "crop_padding"),
        ({"objective": "focall"}, "did you mean .focal."),
        ({"objective": {"name": "focal", "gamma": -1}}, "gamma must be in"),
        ({"nesterov": True, "momentum": 0.0}, "nesterov"),
    ],
)
def test_config_validation_names_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**kw)


def test_old_label_smoothing_key_points_to_the_objective():
    with pytest.raises(ValueError, match=re.escape('{name = "label_smoothing", epsilon = 0.1}')):
        TrainConfig.from_dict({"label_smoothing": 0.1})


def test_config_dict_round_trip_and_unknown_key():
    c = TrainConfig(epochs=3, lr=1, schedule="cosine")
    assert isinstance(c.lr, float)
    assert TrainConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="Did you mean 'epochs'"):
        TrainConfig.from_dict({"epoch": 3})


@pytest.mark.parametrize("spe", [1, 3])
def test_cosine_restarts_match_torch_sgdr_when_cycles_are_whole(spe):
    # 7 epochs = cycles of 1, 2 and 4 epochs: SGDR with T_0 = 1 epoch, T_mult = 2
    cfg = TrainConfig(epochs=7, cycles=3, cycle_mult=2, lr=0.1)
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    ref = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=spe, T_mult=2)
    for step in range(7 * spe):
        assert math.isclose(
            0.1 * lr_multiplier(step, spe, cfg), opt.param_groups[0]["lr"], abs_tol=1e-12
        ), step
        opt.step()
        ref.step()


def test_cosine_and_constant_and_warmup():
    cos = TrainConfig(epochs=4, schedule="cosine")
    for k in range(8):
        assert math.isclose(lr_multiplier(k, 2, cos), 0.5 * (1 + math.cos(math.pi * k / 8)))
    assert lr_multiplier(5, 2, TrainConfig(epochs=4, schedule="constant")) == 1.0
    warm = TrainConfig(epochs=4, schedule="cosine", warmup_epochs=1)
    assert [lr_multiplier(k, 4, warm) for k in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_multiplier(4, 4, warm) == 1.0  # cosine starts after warm-up
    # the default recipe's last step is the end of a cycle (lr near 0), restarts at 2/7 and 6/7
    d = TrainConfig()
    assert lr_multiplier(200 * 10 - 1, 10, d) < 1e-4
    assert lr_multiplier(round(200 * 10 / 7), 10, d) > 0.99


# ------------------------------------------------------------------------------------------
# Training, resume, checkpoints
# ------------------------------------------------------------------------------------------
def test_train_learns_writes_a_safe_checkpoint_and_leaves_global_rng(tmp_path):
    cfg = TrainConfig(epochs=4, batch_size=8, lr=0.1, schedule="cosine", crop_padding=1)
    model = _net()
    rng_before = torch.get_rng_state()
    res = tr.train(model, _split(), cfg, out_dir=tmp_path, progress=False)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert [h["epoch"] for h in res.history] == [1, 2, 3, 4]
    assert set(res.history[0]) == {"epoch", "loss", "train_acc", "lr", "images_per_s", "seconds"}
    assert res.history[-1]["loss"] < res.history[0]["loss"]
    assert res.history[-1]["train_acc"] > 0.8
    assert not res.model.training and next(res.model.parameters()).device.type == "cpu"
    assert res.checkpoint == tmp_path / "last.pt"
    raw = torch.load(res.checkpoint, weights_only=True)  # plain tensors and containers only
    assert raw["epoch"] == 4 and raw["config"] == cfg.to_dict()
    assert {"model", "optimizer", "scheduler", "rng", "data_seed", "history"} <= set(raw)
    assert [f.name for f in tmp_path.iterdir()] == ["last.pt"]  # no temp files left


class _Crash(RuntimeError):
    pass


class _CrashAfter(nn.Module):
    """Wraps a model and raises on the n-th forward: a run killed in the middle of an epoch."""

    def __init__(self, inner: nn.Module, n: int) -> None:
        super().__init__()
        self.inner, self.n, self.calls = inner, n, 0

    def forward(self, x):
        self.calls += 1
        if self.calls == self.n:
            raise _Crash("killed")
        return self.inner(x)


@pytest.mark.parametrize("objective", ["ce", {"name": "mixup", "alpha": 0.4}, "flsd53"])
def test_resume_after_a_crash_gives_bitwise_the_same_weights(tmp_path, objective):
    split = _split()
    cfg = TrainConfig(
        objective=objective,
        epochs=3,
        batch_size=8,
        lr=0.05,
        cycles=2,
        crop_padding=1,
        deterministic=True,
        weight_decay=5e-4,
    )
    whole = tr.train(_net(seed=0), split, cfg, out_dir=tmp_path / "a", progress=False)

    crashing = _CrashAfter(_net(seed=0), n=6 + 3)  # 6 steps per epoch: dies inside epoch 2
    with pytest.raises(_Crash):
        tr.train(crashing, split, cfg, out_dir=tmp_path / "b", progress=False)
    assert load_checkpoint(tmp_path / "b" / "last.pt")["epoch"] == 1
    # a fresh process would rebuild the model with other weights: the checkpoint must win
    resumed = tr.train(_CrashAfter(_net(seed=7), n=-1), split, cfg, out_dir=tmp_path / "b")
    _assert_same_state(whole.model, resumed.model.inner)
    keep = ("epoch", "loss", "train_acc", "lr")
    assert [{k: h[k] for k in keep} for h in whole.history] == [
        {k: h[k] for k in keep} for h in resumed.history
    ]
    # resuming a finished run trains nothing and returns the same weights
    again = tr.train(_net(seed=3), split, cfg, out_dir=tmp_path / "a", progress=False)
    _assert_same_state(whole.model, again.model)


def test_resume_refuses_a_different_recipe_or_model(tmp_path):
    split = _split(n=16)
    cfg = TrainConfig(epochs=1, batch_size=8, schedule="constant")
    tr.train(_net(), split, cfg, out_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"lr: 0\.1 -> 0\.2"):
        tr.train(
            _net(),
            split,
            TrainConfig(epochs=1, batch_size=8, schedule="constant", lr=0.2),
            out_dir=tmp_path,
        )
    with pytest.raises(ValueError, match="different model"):
        tr.train(_net(classes=5), split, cfg, out_dir=tmp_path)
    # log_every changes no math: resuming with another value is fine
    tr.train(_net(), split, dataclass_replace(cfg, log_every=3), out_dir=tmp_path)


def dataclass_replace(cfg, **kw):
    import dataclasses

    return dataclasses.replace(cfg, **kw)


def test_load_checkpoint_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")
    tr.train(_net(), _split(n=16), TrainConfig(epochs=1, batch_size=8), out_dir=tmp_path)
    good = (tmp_path / "last.pt").read_bytes()
    cut = tmp_path / "truncated.pt"
    cut.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="truncated, corrupt or not a torch checkpoint") as err:
        load_checkpoint(cut)
    assert str(cut) in str(err.value) and "resume=False" in str(err.value)
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(ValueError, match="not a torch checkpoint"):
        load_checkpoint(text)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, foreign)
    with pytest.raises(ValueError, match="not a quantcal checkpoint"):
        load_checkpoint(foreign)
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"format": tr.CHECKPOINT_FORMAT, "obj": _Crash("x")}, unsafe)
    with pytest.raises(ValueError, match=str(unsafe)):
        load_checkpoint(unsafe)  # weights_only refuses arbitrary objects


def test_train_rejects_bad_arguments():
    with pytest.raises(ValueError, match="fewer than one batch"):
        tr.train(_net(), _split(n=4), TrainConfig(epochs=1, batch_size=8))
    with pytest.raises(TypeError, match="Splits"):
        tr.train(_net(), [1, 2, 3], TrainConfig(epochs=1))
    with pytest.raises(TypeError, match="TrainConfig"):
        tr.train(_net(), _split(), {"epochs": 1})


def test_bf16_autocast_and_channels_last_can_be_forced_on_cpu():
    cfg = TrainConfig(epochs=1, batch_size=8, amp="bf16", channels_last="on", schedule="constant")
    res = tr.train(_net(), _split(n=16), cfg, progress=False)
    assert math.isfinite(res.history[0]["loss"]) and res.checkpoint is None
    w = res.model[0].weight
    assert w.is_contiguous() and w.dtype == torch.float32


# ------------------------------------------------------------------------------------------
# DDP: two CPU processes with gloo under torchrun
# ------------------------------------------------------------------------------------------
_WORKER = textwrap.dedent(
    """
    import os, sys
    import torch
    from torch import nn
    from quantcal import train
    from quantcal.data import Split, Splits

    torch.set_num_threads(1)
    out, objective = sys.argv[1], sys.argv[2]
    rank = int(os.environ["RANK"])
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(64) % 4
    images = (labels.view(-1, 1, 1, 1) * 60 + torch.randint(0, 40, (64, 3, 8, 8), generator=g))
    split = Split(images.to(torch.uint8), labels, (0.5,) * 3, (0.25,) * 3, torch.arange(64))
    torch.manual_seed(100 + rank)  # different initial weights per rank: DDP broadcasts rank 0's
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 4))
    cfg = train.TrainConfig(epochs=2, batch_size=16, lr=0.1, schedule="cosine", crop_padding=1,
                            objective=objective)
    res = train.train(model, split, cfg, device="cpu",  # gloo, also where GPUs exist
                      out_dir=os.path.join(out, "ckpt"), progress=False)
    torch.save({"state": res.model.state_dict(), "history": res.history},
               os.path.join(out, f"rank{rank}.pt"))
    """
)


# One objective: the training loop calls every objective the same way, and mixup is the one
# whose random draws must agree across ranks.
@pytest.mark.parametrize("objective", ["mixup"])
def test_ddp_two_processes_end_with_identical_weights(tmp_path, objective):
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    run_two_processes(script, str(tmp_path), objective)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["state"].keys() == r1["state"].keys()
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    # each rank trained on half of every global batch; the logged totals are global
    assert r0["history"][0]["loss"] == r1["history"][0]["loss"]
    ck = load_checkpoint(tmp_path / "ckpt" / "last.pt")
    assert ck["world_size"] == 2 and ck["steps_per_epoch"] == 4 and ck["epoch"] == 2
    for k, v in ck["model"].items():
        assert torch.equal(v, r0["state"][k]), k


# ------------------------------------------------------------------------------------------
# predict_logits
# ------------------------------------------------------------------------------------------
def test_predict_logits_matches_a_manual_forward_and_restores_the_model():
    split = _split(n=20)
    model = _net().train()
    logits, labels = predict_logits(model, split, batch_size=7)
    assert model.training  # training flag restored
    assert logits.dtype == torch.float32 and labels.dtype == torch.int64
    assert logits.shape == (20, 3) and torch.equal(labels, split.labels)
    model.eval()
    with torch.no_grad():
        ref = model(split.normalize(split.images))
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
    # the outputs are ordinary tensors: a temperature can be fitted on them with autograd
    t = torch.ones(1, requires_grad=True)
    nn.functional.cross_entropy(logits / t, labels).backward()
    assert t.grad is not None
    # any iterable of (x, y) batches works, in its own order
    batches = [(split.normalize(split.images[i : i + 5]), split.labels[i : i + 5]) for i in (15, 0)]
    lg2, lb2 = predict_logits(model, batches)
    assert torch.equal(lb2, torch.cat([split.labels[15:20], split.labels[0:5]]))
    torch.testing.assert_close(lg2[:5], logits[15:20], rtol=1e-5, atol=1e-5)
    assert not model.training


def test_predict_logits_rejects_bad_inputs():
    with pytest.raises(ValueError, match="no batches"):
        predict_logits(_net(), [])
    s = _split(n=8)
    whole = Splits("toy", s, s, s, s, 3, 8, 3, s.mean, s.std, ("a", "b", "c"))
    with pytest.raises(TypeError, match=r"splits\.test"):
        predict_logits(_net(), whole)
    with pytest.raises(ValueError, match="expected logits"):
        predict_logits(nn.Identity(), [(torch.zeros(2, 3, 4, 4), torch.zeros(2))])


def test_ddp_rank_without_its_gpu_is_a_clear_error():
    # two torchrun processes on a machine with fewer GPUs: rank 1 has no cuda:1 (found on a
    # one-GPU machine, where NCCL then failed with "invalid device ordinal")
    info = Dist(rank=1, world_size=2, local_rank=1)
    missing = torch.cuda.device_count()  # index one past the last GPU (0 on a CPU machine)
    with pytest.raises(ValueError, match="nproc_per_node"):
        resolve_device(f"cuda:{missing}", info)
    if torch.cuda.device_count() < 2:
        with pytest.raises(ValueError, match=r"device='cpu'"):
            resolve_device("cuda", info)
    assert resolve_device("cpu", info) == torch.device("cpu")
    assert init_process_group(Dist(), torch.device("cpu")) == Dist()
