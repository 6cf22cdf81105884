"""Training with the study's recipe, resumable checkpoints, DDP, and logits prediction.

The recipe (Kuang & Wong, arXiv 2309.13866, Sec. 4) and its warm-restart schedule are
:class:`TrainConfig` in :mod:`quantcal.training.recipe` (its docstring gives the numbers).

:func:`train` runs on one device or under ``torchrun --nproc_per_node N`` (DDP: gloo on CPU, nccl
on CUDA; ``batch_size`` is the *global* batch, split evenly over the ranks). It checkpoints after
every epoch to ``out_dir/last.pt`` and resumes from it; on CPU with ``deterministic=True`` a
resumed run ends with bitwise the same weights as an uninterrupted one.

The parts: :mod:`~quantcal.training.recipe` (the config and schedule),
:mod:`~quantcal.training.checkpoints` (``last.pt``), :mod:`~quantcal.training.environment`
(device, DDP, determinism) and :mod:`~quantcal.training.predict` (:func:`predict_logits`). This
module runs the loop and gathers their public names.
"""

from __future__ import annotations

import gc
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from quantcal._io import atomic_torch_save
from quantcal.training import objectives
from quantcal.training.checkpoints import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    check_resumable,
    checkpoint_damage,
    load_checkpoint,
    resumable,
    rng_state,
    set_rng_state,
)
from quantcal.training.environment import (
    Dist,
    determinism,
    dist_from_env,
    init_process_group,
    leave_process_group,
    resolve_device,
    sync_buffers,
)
from quantcal.training.predict import predict_logits
from quantcal.training.recipe import AMP_MODES as AMP_MODES
from quantcal.training.recipe import CHANNELS_LAST_MODES as CHANNELS_LAST_MODES
from quantcal.training.recipe import SCHEDULES as SCHEDULES
from quantcal.training.recipe import TrainConfig, crop_padding, lr_multiplier
from quantcal.training.splits import Split, Splits

# The ``name as name`` imports above are public names of this module that ``__all__`` (and so
# the facade ``quantcal.train``) leaves out; they stay importable from here.
__all__ = [
    "CHECKPOINT_FORMAT",
    "TrainConfig",
    "TrainResult",
    "checkpoint_damage",
    "crop_padding",
    "load_checkpoint",
    "lr_multiplier",
    "predict_logits",
    "train",
]


@dataclass
class TrainResult:
    """A finished run: the trained model (eval mode, CPU), per-epoch history, checkpoint path."""

    model: nn.Module
    history: list[dict[str, float]] = field(default_factory=list)
    checkpoint: Path | None = None
    seconds: float = 0.0


def _train_split(splits: Splits | Split) -> Split:
    if isinstance(splits, Splits):
        return splits.train
    if isinstance(splits, Split):
        return splits
    raise TypeError(
        f"train() needs quantcal.data.Splits (or a Split to train on), got "
        f"{type(splits).__name__}; load one with quantcal.data.load_dataset(name)"
    )


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------
def train(
    model: nn.Module,
    splits: Splits | Split,
    config: TrainConfig | None = None,
    *,
    device: torch.device | str | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    resume: bool = True,
    progress: bool = True,
    on_epoch_end: Callable[[int, nn.Module, dict[str, float]], None] | None = None,
    heal: Callable[[Path, str], None] | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``splits.train`` with ``config``; return a :class:`TrainResult`.

    ``device``: default CUDA (``cuda:LOCAL_RANK`` under torchrun) if available, else CPU.
    ``out_dir``: after every epoch rank 0 writes ``out_dir/last.pt`` atomically (model, optimizer,
    scheduler, epoch, RNG states, config, history); with ``resume`` an existing one is continued
    (a different config is an error). ``on_epoch_end(epoch, model, record)`` runs on every rank
    after the checkpoint of epoch ``epoch`` (1-based) is written. The scheduler steps per
    iteration. The returned model is in eval mode on the CPU; its global RNG is left as it was.
    Under DDP the ranks' BatchNorm buffers are made rank 0's at the end.

    ``heal(path, reason)``: what to do with an ``out_dir/last.pt`` that cannot be read
    (truncated, corrupt, not a quantcal checkpoint, another version; see
    :func:`checkpoint_damage`): it is called on rank 0 to name and remove the file (a study
    passes ``_cache.Cache.heal``, which records it in ``healed.json``), and training starts
    over. None: such a file is a ValueError saying to delete it. A sound checkpoint written
    with another recipe is a ValueError either way (it is not damage).
    """
    config = TrainConfig() if config is None else config
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    split = _train_split(splits)
    dist_info = dist_from_env()
    dev = resolve_device(device, dist_info)
    dist_info = init_process_group(dist_info, dev)
    finished = False
    try:
        fork = [dev.index] if dev.type == "cuda" else []
        with torch.random.fork_rng(devices=fork), determinism(config.deterministic, dev):
            result = _run(
                model, split, config, dev, dist_info, out_dir, resume, progress, on_epoch_end, heal
            )
        finished = True
        return result
    finally:
        if dist_info.world_size > 1:  # the group this call created, or one an earlier kept
            leave_process_group(finished)


def _steps_per_epoch(n: int, config: TrainConfig, world: int) -> tuple[int, int]:
    if config.batch_size % world:
        raise ValueError(
            f"TrainConfig.batch_size={config.batch_size} is the global batch and must divide "
            f"evenly over {world} processes; choose a multiple of {world}"
        )
    per_rank_batch = config.batch_size // world
    steps = (n // world) // per_rank_batch
    if steps < 1:
        raise ValueError(
            f"the train split has {n} images, fewer than one batch of {config.batch_size}: "
            "lower TrainConfig.batch_size"
        )
    return per_rank_batch, steps


def _run(
    model: nn.Module,
    split: Split,
    config: TrainConfig,
    dev: torch.device,
    dist_info: Dist,
    out_dir: str | os.PathLike[str] | None,
    resume: bool,
    progress: bool,
    on_epoch_end: Callable[[int, nn.Module, dict[str, float]], None] | None,
    heal: Callable[[Path, str], None] | None = None,
) -> TrainResult:
    t_start = time.perf_counter()
    world, rank = dist_info.world_size, dist_info.rank
    per_rank_batch, spe = _steps_per_epoch(len(split), config, world)
    use_amp = config.amp == "bf16" or (config.amp == "auto" and dev.type == "cuda")
    use_cl = config.channels_last == "on" or (config.channels_last == "auto" and dev.type == "cuda")
    torch.manual_seed(config.seed)
    model.to(dev)
    if use_cl:
        model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(
        model.parameters(),
        lr=config.lr,
        momentum=config.momentum,
        nesterov=config.nesterov,
        weight_decay=config.weight_decay,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: lr_multiplier(k, spe, config))
    ckpt = Path(out_dir) / "last.pt" if out_dir is not None else None
    start, history = 0, []
    ck = resumable(ckpt, heal, rank) if resume and ckpt is not None else None
    if ck is not None and ckpt is not None:
        check_resumable(ck, config, ckpt)
        try:
            model.load_state_dict(ck["model"])
        except RuntimeError as exc:
            raise ValueError(
                f"{ckpt} holds weights of a different model ({str(exc).splitlines()[0]}); "
                "build the same architecture, or use another out_dir / resume=False"
            ) from exc
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        set_rng_state(ck["rng"], dev)
        start, history = int(ck["epoch"]), list(ck["history"])
    net: nn.Module = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    for epoch in range(start, config.epochs):
        record = _train_epoch(
            net,
            opt,
            sched,
            split,
            config,
            dev,
            epoch,
            per_rank_batch,
            spe,
            dist_info,
            use_amp,
            use_cl,
            progress,
        )
        if not math.isfinite(record["loss"]):
            # Before the checkpoint: a resume restarts from the last finite epoch.
            raise FloatingPointError(
                f"training diverged: the mean loss of epoch {epoch + 1} is {record['loss']} "
                f"(lr {config.lr:g}, batch {config.batch_size}); lower the learning rate or check "
                "the data"
            )
        history.append(record)
        if ckpt is not None and rank == 0:
            atomic_torch_save(
                {
                    "format": CHECKPOINT_FORMAT,
                    "version": CHECKPOINT_VERSION,
                    "epoch": epoch + 1,
                    "steps_per_epoch": spe,
                    "world_size": world,
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "rng": rng_state(dev),
                    "data_seed": config.seed,
                    "config": config.to_dict(),
                    "history": history,
                },
                ckpt,
            )
        if world > 1:
            import torch.distributed as dist

            dist.barrier()
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, model, record)
    if world > 1:
        sync_buffers(model)
        # The DDP wrapper's reducer hooks the parameters and holds the process group: freed
        # here (with any reference cycle), the group's gloo threads stop when the group is
        # destroyed, not at interpreter exit, where their destruction order made a rank abort
        # now and then ("terminate called without an active exception").
        del net
        gc.collect()
    model.eval()
    model.to(device="cpu", memory_format=torch.contiguous_format)
    return TrainResult(
        model=model,
        history=history,
        checkpoint=ckpt if ckpt is not None and ckpt.is_file() else None,
        seconds=time.perf_counter() - t_start,
    )


def _train_epoch(
    net: nn.Module,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    split: Split,
    config: TrainConfig,
    dev: torch.device,
    epoch: int,
    batch: int,
    spe: int,
    dist_info: Dist,
    use_amp: bool,
    use_cl: bool,
    progress: bool,
) -> dict[str, float]:
    """One epoch of SGD; returns {epoch, loss, train_acc, lr, images_per_s, seconds}."""
    from tqdm import tqdm

    net.train()
    t0 = time.perf_counter()
    loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
    correct = torch.zeros((), dtype=torch.int64, device=dev)
    seen, lr = 0, opt.param_groups[0]["lr"]
    show = progress and dist_info.rank == 0
    objective = objectives.build(config.objective)

    def forward(inputs: torch.Tensor) -> torch.Tensor:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_amp):
            return net(inputs)

    bar = tqdm(
        total=spe,
        desc=f"epoch {epoch + 1}/{config.epochs}",
        leave=False,
        file=sys.stderr,
        disable=None if show else True,
        dynamic_ncols=True,
    )
    batches = split.batches(
        batch,
        device=dev,
        shuffle=True,
        augment=config.augment,
        seed=config.seed,
        epoch=epoch,
        drop_last=True,
        rank=dist_info.rank,
        world_size=dist_info.world_size,
        pad=crop_padding(config, split.image_size),
        flip=config.hflip,
    )
    with bar:
        for step, (x, y) in enumerate(batches):
            if use_cl:
                x = x.contiguous(memory_format=torch.channels_last)
            loss, logits = objective(forward, x, y, (config.seed, epoch, step))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            lr = opt.param_groups[0]["lr"]
            opt.step()
            sched.step()
            loss_sum += loss.detach().double() * y.numel()
            correct += (logits.detach().argmax(1) == y).sum()
            seen += y.numel()
            bar.update(1)
            if not bar.disable and ((step + 1) % config.log_every == 0 or step + 1 == spe):
                elapsed = time.perf_counter() - t0
                bar.set_postfix(
                    loss=f"{loss_sum.item() / seen:.3f}",
                    acc=f"{correct.item() / seen:.3f}",
                    img_s=f"{seen * dist_info.world_size / elapsed:.0f}",
                )
    totals = torch.stack(
        [loss_sum, correct.double(), torch.tensor(float(seen), device=dev, dtype=torch.float64)]
    )
    if dist_info.world_size > 1:
        import torch.distributed as dist

        dist.all_reduce(totals)
    loss_total, correct_total, seen_total = totals.tolist()
    seconds = time.perf_counter() - t0
    return {
        "epoch": epoch + 1,
        "loss": loss_total / seen_total,
        "train_acc": correct_total / seen_total,
        "lr": float(lr),
        "images_per_s": seen_total / seconds,
        "seconds": seconds,
    }
