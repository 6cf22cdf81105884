"""``quantcal train``: train one model and save its checkpoint."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantcal.cli._common import EXIT_SIMPLE, Common, add_common, add_force, common, parse_set


@dataclass(frozen=True)
class TrainRequest:
    model: str
    width: float
    dataset: str
    config: Any  # train.TrainConfig
    out: Path
    force: bool
    common: Common


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "train",
        help="train one model and save its checkpoint",
        description="Train one registry model on a dataset with the study's recipe (override "
        "any field) and save OUT/model.pt (weights only) with its test accuracy.",
        epilog="example:\n  quantcal train --model shufflenetv2 --width 0.5 --dataset digits "
        "--epochs 20 --set batch_size=64 --out runs/sn\n\n"
        + EXIT_SIMPLE.replace("  0    done", "  0    trained; OUT/model.pt written"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="registry name (see `quantcal list`)")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--dataset", default="digits")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a TrainConfig field, e.g. lr=0.05",
    )
    p.add_argument("--out", default="runs/train")
    add_force(p, "model.pt and train.json")
    add_common(p)


def resolve(args: argparse.Namespace) -> TrainRequest:
    from quantcal import models
    from quantcal._inputs import check_number
    from quantcal._registry import unknown_name_message
    from quantcal.training import train
    from quantcal.training.data import check_dataset_name

    if args.model not in models.list_models():
        raise ValueError(
            "--model: " + unknown_name_message("model", args.model, models.list_models())
        )
    check_number(args.width, "--width", minimum=0, exclusive_minimum=True)
    check_number(args.seed, "--seed", integer=True, minimum=0)
    check_dataset_name(args.dataset, "--dataset")
    overrides = parse_set(args.set)
    if args.epochs is not None:
        check_number(args.epochs, "--epochs", integer=True, minimum=1)
        overrides["epochs"] = args.epochs
    overrides["seed"] = args.seed
    cfg = train.TrainConfig.from_dict(overrides)
    return TrainRequest(
        args.model, args.width, args.dataset, cfg, Path(args.out), bool(args.force), common(args)
    )


def execute(req: TrainRequest) -> int:
    from quantcal._io import atomic_torch_save, atomic_write_json
    from quantcal.calibration import metrics
    from quantcal.store import runfolder as _runfolder
    from quantcal.study.environment import resolve_device
    from quantcal.study.factories import build_model
    from quantcal.training import data, train

    _runfolder.check(req.out, force=req.force, identity=_identity(req))
    device = resolve_device(req.common.device)
    splits = data.load_dataset(req.dataset, seed=req.config.seed)
    model = build_model(
        req.model,
        num_classes=splits.num_classes,
        image_size=splits.image_size,
        in_chans=splits.channels,
        width=req.width,
        seed=req.config.seed,
    )
    out = _runfolder.claim(req.out, force=req.force, identity=_identity(req))
    result = train.train(
        model,
        splits,
        req.config,
        device=device,
        out_dir=out,
        resume=True,
        progress=not req.common.quiet,
    )
    logits, labels = train.predict_logits(result.model, splits.test, device=device)
    acc = metrics.accuracy(logits, labels)
    ece = metrics.ece(logits, labels)
    atomic_torch_save(
        {
            "model": result.model.to("cpu").state_dict(),
            "config": getattr(result.model, "config", {}),
        },
        out / "model.pt",
    )
    atomic_write_json(
        out / "train.json",
        {
            "train_config": req.config.to_dict(),
            "history": result.history,
            "test_accuracy": acc,
            "test_ece": ece,
            "seconds": result.seconds,
        },
    )
    print(f"test accuracy {100 * acc:.2f} %, ECE {100 * ece:.2f} %  ->  {out / 'model.pt'}")
    return 0


def _identity(req: TrainRequest) -> dict[str, Any]:
    return {
        "command": "train",
        "model": f"{req.model}@{req.width:g}",
        "dataset": req.dataset,
    }
