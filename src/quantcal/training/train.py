"""Training with the study's recipe, resumable checkpoints, DDP, and logits prediction.

The recipe of Kuang & Wong (arXiv 2309.13866, Sec. 4): SGD with momentum 0.9, weight decay 1e-4,
learning rate 0.1 with cosine annealing with warm restarts (SGDR, Loshchilov & Hutter, ICLR 2017),
200 epochs, batch size 32, cross-entropy, random crop + horizontal flip. Those are the defaults of
:class:`TrainConfig`.

Warm restarts: the paper does not give the cycle lengths, and SGDR's usual ``T_0, T_mult``
rarely make the last epoch end a cycle (with T_0=10, T_mult=2 a 200-epoch run stops mid-cycle at
a high learning rate). Here the ``cycles`` lengths grow geometrically by ``cycle_mult`` and are
scaled so they sum exactly to the epochs after warm-up; the scheduler steps every iteration, so
boundaries may fall mid-epoch. Defaults (3 cycles, x2) over 200 epochs: 28.6, 57.1 and 114.3
epochs, the last ending with the last iteration.

:func:`train` runs on one device or under ``torchrun --nproc_per_node N`` (DDP: gloo on CPU, nccl
on CUDA; ``batch_size`` is the *global* batch, split evenly over the ranks). It checkpoints after
every epoch to ``out_dir/last.pt`` and resumes from it; on CPU with ``deterministic=True`` a
resumed run ends with bitwise the same weights as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantcal._io import atomic_torch_save
from quantcal._registry import closest
from quantcal.training import objectives
from quantcal.training.data import Split, Splits

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

CHECKPOINT_FORMAT = "quantcal.train.checkpoint"
CHECKPOINT_VERSION = 1
SCHEDULES = ("cosine_restarts", "cosine", "constant")
AMP_MODES = ("auto", "bf16", "off")
CHANNELS_LAST_MODES = ("auto", "on", "off")
# Fields that may differ between a checkpoint and the run resuming it (they do not change math).
_RESUME_FREE = ("log_every",)


@dataclass(frozen=True)
class TrainConfig:
    """Training recipe; the defaults are the study's (see module docstring).

    ``batch_size`` is global (divided over DDP ranks). ``schedule``: "cosine_restarts" (``cycles``
    cycles, lengths growing by ``cycle_mult``, summing to the post-warm-up epochs), "cosine" (one
    cycle) or "constant"; ``warmup_epochs`` ramps linearly from ``lr / warmup_steps`` to ``lr``
    first. ``objective``: the training objective, a name or ``{"name": ..., params}`` (see
    :mod:`quantcal.training.objectives`; stored in canonical form with defaults filled). ``augment``:
    random crop with ``crop_padding`` zero pixels (None: ``round(size / 8)``, at least 1: 4 for
    32x32 and 28x28 as in the CIFAR recipe, 1 for 8x8 digits), plus a horizontal flip if
    ``hflip``. ``amp``: "auto" = bf16 autocast on CUDA, off on CPU; "bf16"
    or "off" force it.
    ``channels_last``: "auto" = on for CUDA. ``deterministic``: deterministic algorithms (needed
    for bitwise-reproducible resumes; strict on CPU, warn-only on CUDA). ``log_every``: steps
    between progress-bar refreshes (each costs a device sync).
    """

    epochs: int = 200
    batch_size: int = 32
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    schedule: str = "cosine_restarts"
    cycles: int = 3
    cycle_mult: float = 2.0
    warmup_epochs: float = 0.0
    objective: str | dict[str, Any] = "ce"
    augment: bool = True
    crop_padding: int | None = None
    hflip: bool = True
    seed: int = 0
    amp: str = "auto"
    channels_last: str = "auto"
    deterministic: bool = False
    log_every: int = 20

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type in ("float", float):
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ValueError(f"TrainConfig.{f.name} must be a number, got {value!r}")
                object.__setattr__(self, f.name, float(value))
            elif f.type in ("int", int):
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ValueError(f"TrainConfig.{f.name} must be an integer, got {value!r}")
            elif f.type in ("bool", bool) and not isinstance(value, bool):
                raise ValueError(f"TrainConfig.{f.name} must be true or false, got {value!r}")
        _at_least("epochs", self.epochs, 1)
        _at_least("batch_size", self.batch_size, 1)
        _at_least("cycles", self.cycles, 1)
        if self.crop_padding is not None:
            if isinstance(self.crop_padding, bool) or not isinstance(self.crop_padding, int):
                raise ValueError(
                    "TrainConfig.crop_padding must be an integer or None (automatic), got "
                    f"{self.crop_padding!r}"
                )
            _at_least("crop_padding", self.crop_padding, 0)
        _at_least("log_every", self.log_every, 1)
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise ValueError(f"TrainConfig.lr must be a finite number > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"TrainConfig.momentum must be in [0, 1), got {self.momentum}")
        if self.nesterov and self.momentum == 0:
            raise ValueError("TrainConfig.nesterov=True needs momentum > 0")
        if self.weight_decay < 0:
            raise ValueError(f"TrainConfig.weight_decay must be >= 0, got {self.weight_decay}")
        if self.cycle_mult < 1:
            raise ValueError(f"TrainConfig.cycle_mult must be >= 1, got {self.cycle_mult}")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise ValueError(
                f"TrainConfig.warmup_epochs must be in [0, epochs={self.epochs}), got "
                f"{self.warmup_epochs}"
            )
        from quantcal.training import objectives

        object.__setattr__(self, "objective", objectives.canonical(self.objective))
        for name, allowed in (
            ("schedule", SCHEDULES),
            ("amp", AMP_MODES),
            ("channels_last", CHANNELS_LAST_MODES),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"TrainConfig.{name} must be one of {', '.join(allowed)}; got "
                    f"{getattr(self, name)!r}"
                )

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of all fields (JSON/TOML friendly)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from a dict; an unknown key raises ValueError naming the closest valid key."""
        names = [f.name for f in dataclasses.fields(cls)]
        if "label_smoothing" in values:
            raise ValueError(
                "TrainConfig.label_smoothing is now a training objective: write objective = "
                f'{{name = "label_smoothing", epsilon = {values["label_smoothing"]}}}'
            )
        for key in values:
            if key not in names:
                hint = closest(str(key), names)
                did = f" Did you mean {hint!r}?" if hint else ""
                raise ValueError(
                    f"unknown TrainConfig key {key!r}.{did} Valid keys: {', '.join(names)}."
                )
        return cls(**values)


def crop_padding(config: TrainConfig, image_size: int) -> int:
    """Zero padding of the random crop: ``config.crop_padding``, or ``max(1, round(size / 8))``."""
    if config.crop_padding is not None:
        return config.crop_padding
    return max(1, round(image_size / 8))


def _at_least(name: str, value: int, minimum: int) -> None:
    if value < minimum:
        raise ValueError(f"TrainConfig.{name} must be >= {minimum}, got {value}")


@dataclass
class TrainResult:
    """A finished run: the trained model (eval mode, CPU), per-epoch history, checkpoint path."""

    model: nn.Module
    history: list[dict[str, float]] = field(default_factory=list)
    checkpoint: Path | None = None
    seconds: float = 0.0


def lr_multiplier(step: int, steps_per_epoch: int, config: TrainConfig) -> float:
    """Learning-rate factor (times ``config.lr``) for optimizer step ``step`` (0-based).

    Warm-up: ``(step + 1) / warmup_steps``. Then, with ``u`` the fraction of the post-warm-up
    steps done, "constant" gives 1, "cosine" ``(1 + cos(pi u)) / 2`` (SGDR, eta_min = 0) and
    "cosine_restarts" the same cosine within each of ``cycles`` cycles of relative lengths
    ``cycle_mult ** i`` (normalised to sum to 1).
    """
    total = config.epochs * steps_per_epoch
    warm = round(config.warmup_epochs * steps_per_epoch)
    if step < warm:
        return (step + 1) / warm
    if config.schedule == "constant":
        return 1.0
    done = Fraction(step - warm, max(1, total - warm))
    if config.schedule == "cosine_restarts":
        # exact rational arithmetic so a step on a cycle boundary always starts the new cycle
        lengths = [Fraction(config.cycle_mult) ** i for i in range(config.cycles)]
        total_len = sum(lengths)
        start = Fraction(0)
        for i, length in enumerate(lengths):
            frac = length / total_len
            if done < start + frac or i == len(lengths) - 1:
                done = (done - start) / frac
                break
            start += frac
    u = float(done)
    return 0.5 * (1.0 + math.cos(math.pi * min(max(u, 0.0), 1.0)))


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------
def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a training checkpoint with ``torch.load(weights_only=True)`` onto the CPU.

    Raises FileNotFoundError when absent and ValueError for a truncated, corrupt or foreign file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    what = (
        f"Expected a quantcal training checkpoint (the out_dir/last.pt that quantcal.train.train "
        f"writes). Delete {path} and train again (or pass resume=False), or point at the right "
        "file."
    )
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, foreign pickle, not a torch file at all
        raise ValueError(
            f"cannot read checkpoint {path}: it is truncated, corrupt or not a torch checkpoint "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). {what}"
        ) from exc
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        keys = sorted(map(str, ck))[:8] if isinstance(ck, dict) else type(ck).__name__
        raise ValueError(f"{path} is a torch file but not a quantcal checkpoint ({keys}). {what}")
    if ck.get("version") != CHECKPOINT_VERSION:
        raise ValueError(
            f"{path} is checkpoint version {ck.get('version')}, this quantcal reads version "
            f"{CHECKPOINT_VERSION}. {what}"
        )
    return ck


def checkpoint_damage(error: ValueError) -> str:
    """The first sentence of :func:`load_checkpoint`'s error: what is wrong with the file,
    without the advice to delete it (for a message saying it was removed)."""
    text = str(error)
    return text.split(". ")[0] if ". " in text else text.rstrip(".")


def _resumable(
    path: Path, heal: Callable[[Path, str], None] | None, rank: int
) -> dict[str, Any] | None:
    """The checkpoint at ``path``; None when there is none, or when it is damaged and ``heal``
    is given (rank 0 calls it; the file is gone afterwards on every rank's view)."""
    if not path.is_file():
        return None
    try:
        return load_checkpoint(path)
    except FileNotFoundError:  # removed meanwhile (by rank 0's heal)
        return None
    except ValueError as exc:
        if heal is None:
            raise
        if rank == 0:
            heal(path, checkpoint_damage(exc))
            path.unlink(missing_ok=True)
        return None


def _rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _check_resumable(ck: dict[str, Any], config: TrainConfig, path: Path) -> None:
    saved = ck.get("config", {})
    now = config.to_dict()
    diffs = [
        f"{k}: {saved.get(k)!r} -> {now.get(k)!r}"
        for k in sorted(set(saved) | set(now))
        if k not in _RESUME_FREE and saved.get(k) != now.get(k)
    ]
    if diffs:
        raise ValueError(
            f"{path} was written with a different TrainConfig ({'; '.join(diffs)}); resuming "
            "needs the same recipe. Use another out_dir, pass resume=False to start over, or "
            "delete the checkpoint."
        )


# --------------------------------------------------------------------------------------------
# Environment: device, DDP, determinism
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    created: bool = False


def _dist_from_env() -> _Dist:
    """Rank info from torchrun's env (WORLD_SIZE, RANK, LOCAL_RANK); nothing is initialised."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    if "RANK" not in os.environ:
        raise ValueError(
            f"WORLD_SIZE={world} is set but RANK is not: launch with torchrun (which sets "
            "RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT) or unset WORLD_SIZE"
        )
    rank = int(os.environ["RANK"])
    return _Dist(rank=rank, world_size=world, local_rank=int(os.environ.get("LOCAL_RANK", rank)))


def _init_process_group(info: _Dist, dev: torch.device) -> _Dist:
    """Join the process group unless one exists: NCCL when this rank trains on a GPU, gloo
    when it trains on the CPU (so CPU DDP also works on a machine that has GPUs)."""
    import torch.distributed as dist

    if info.world_size <= 1 or dist.is_initialized():
        return info
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return dataclasses.replace(info, created=True)


def _resolve_device(device: torch.device | str | None, dist: _Dist) -> torch.device:
    """The training device: ``device``, by default CUDA if available else CPU; under torchrun a
    bare "cuda" is ``cuda:LOCAL_RANK``, which must exist."""
    if device is None:
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", dist.local_rank if dist.world_size > 1 else 0)
    if dev.type == "cuda" and dev.index >= torch.cuda.device_count():
        raise ValueError(
            f"training device {dev} does not exist: this machine has "
            f"{torch.cuda.device_count()} CUDA device(s). Under torchrun start at most that many "
            "processes per node (--nproc_per_node), or train on the CPU with device='cpu' "
            "(DDP then uses gloo)"
        )
    return dev


@contextmanager
def _determinism(on: bool, device: torch.device) -> Iterator[None]:
    """Deterministic algorithms (strict on CPU, warn-only on CUDA) or cudnn autotuning."""
    prev = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
    )
    if on:
        if device.type == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev[0], warn_only=prev[1])
        torch.backends.cudnn.benchmark = prev[2]
        torch.backends.cudnn.deterministic = prev[3]


def _model_device(model: nn.Module) -> torch.device:
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    return first.device if first is not None else torch.device("cpu")


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
    dist_info = _dist_from_env()
    dev = _resolve_device(device, dist_info)
    dist_info = _init_process_group(dist_info, dev)
    finished = False
    try:
        fork = [dev.index] if dev.type == "cuda" else []
        with torch.random.fork_rng(devices=fork), _determinism(config.deterministic, dev):
            result = _run(
                model, split, config, dev, dist_info, out_dir, resume, progress, on_epoch_end, heal
            )
        finished = True
        return result
    finally:
        if dist_info.created:
            _leave_process_group(finished)


def _leave_process_group(finished: bool) -> None:
    """Destroy the process group this call created. After a run that finished on every rank,
    the ranks first meet at a barrier: a rank that tears gloo down while its peer still has a
    collective in flight makes gloo's C++ side abort ("terminate called without an active
    exception"), which a loaded machine made happen now and then. After an error the barrier
    is skipped (the peer may never reach it)."""
    import torch.distributed as dist

    if finished:
        dist.barrier()
    dist.destroy_process_group()


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
    dist_info: _Dist,
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
    ck = _resumable(ckpt, heal, rank) if resume and ckpt is not None else None
    if ck is not None and ckpt is not None:
        _check_resumable(ck, config, ckpt)
        try:
            model.load_state_dict(ck["model"])
        except RuntimeError as exc:
            raise ValueError(
                f"{ckpt} holds weights of a different model ({str(exc).splitlines()[0]}); "
                "build the same architecture, or use another out_dir / resume=False"
            ) from exc
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        _set_rng_state(ck["rng"], dev)
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
                    "rng": _rng_state(dev),
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
        _sync_buffers(model)
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


def _sync_buffers(model: nn.Module) -> None:
    import torch.distributed as dist

    for buf in model.buffers():
        dist.broadcast(buf, src=0)


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
    dist_info: _Dist,
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


# --------------------------------------------------------------------------------------------
# Prediction
# --------------------------------------------------------------------------------------------
def predict_logits(
    model: nn.Module,
    data: Split | Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    batch_size: int = 512,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits float32 CPU (N, C), labels int64 CPU (N,))`` of ``model`` on ``data``.

    Runs in eval mode under ``torch.inference_mode`` in float32 (no autocast), in the data's
    order (a :class:`~quantcal.data.Split` is read unshuffled, unaugmented). ``data`` is a Split
    or any iterable of ``(x, y)`` batches. ``device`` defaults to the model's; the model is moved
    there for the call and back afterwards, and its training flag is restored. The outputs are
    ordinary tensors (usable with autograd, e.g. to fit a temperature).
    """
    if isinstance(data, Splits):
        raise TypeError("predict_logits needs one split, e.g. splits.test, not the whole Splits")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    home = _model_device(model)
    dev = home if device is None else torch.device(device)
    was_training = model.training
    outs: list[torch.Tensor] = []
    labs: list[torch.Tensor] = []
    try:
        if dev != home:
            model.to(dev)
        model.eval()
        batches = data.batches(batch_size, device=dev) if isinstance(data, Split) else data
        with torch.inference_mode():
            for x, y in batches:
                out = model(x.to(dev))
                if out.dim() != 2 or out.shape[0] != x.shape[0]:
                    raise ValueError(
                        f"model returned shape {tuple(out.shape)} for a batch of {x.shape[0]}; "
                        "expected logits (batch, num_classes)"
                    )
                outs.append(out.float().cpu())
                labs.append(torch.as_tensor(y).cpu())
    finally:
        model.train(was_training)
        if dev != home:
            model.to(home)
    if not outs:
        raise ValueError("predict_logits got no batches: the data is empty")
    # Concatenating outside inference mode yields normal tensors, not inference tensors.
    return torch.cat(outs).float(), torch.cat(labs).long()
