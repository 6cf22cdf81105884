"""A short real-data run: ShuffleNetV2 (width 0.5) on CIFAR-100 with quantcal's loader and trainer.

    .venv/bin/python scripts/cifar_experiment.py [--data npz:../shared/data/cifar100.npz]
        [--epochs 3] [--batch 128] [--lr 0.1] [--threads 2] [--out runs/cifar_experiment]

Not a test: it shows the learning curve of a healthy run (test accuracy and ECE after every
epoch, wall time). The run checkpoints every epoch into ``--out`` and resumes when started again;
the per-epoch results are written to ``--out/results.json``.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from quantcal import data, metrics, models, train
from quantcal._io import atomic_write_json

DEFAULT_DATA = "npz:" + os.path.normpath(
    os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "cifar100.npz")
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--model", default="shufflenetv2")
    ap.add_argument("--width", type=float, default=0.5)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--weight-decay", type=float, default=5e-4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/cifar_experiment")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    splits = data.load_dataset(args.data, seed=args.seed)
    print(f"{splits}  (loaded in {time.perf_counter() - t0:.1f} s)", flush=True)
    model = models.create_model(
        args.model,
        num_classes=splits.num_classes,
        image_size=splits.image_size,
        in_chans=splits.channels,
        width=args.width,
        seed=args.seed,
    )
    cfg = train.TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch,
        lr=args.lr,
        nesterov=True,
        weight_decay=args.weight_decay,
        schedule="cosine",
        seed=args.seed,
    )
    rows: list[dict[str, float]] = []

    def evaluate(epoch: int, net: torch.nn.Module, record: dict[str, float]) -> None:
        te = time.perf_counter()
        logits, labels = train.predict_logits(net, splits.test, batch_size=500)
        row = {
            **record,
            "test_acc": metrics.accuracy(logits, labels),
            "test_ece": metrics.ece(logits, labels),
            "eval_seconds": time.perf_counter() - te,
            "wall_seconds": time.perf_counter() - t0,
        }
        rows.append(row)
        print(
            f"epoch {epoch}: loss {row['loss']:.3f} train acc {row['train_acc']:.3f}  "
            f"test acc {row['test_acc']:.4f} ECE {row['test_ece']:.4f}  "
            f"{row['images_per_s']:.0f} img/s, epoch {row['seconds']:.0f} s, "
            f"wall {row['wall_seconds']:.0f} s",
            flush=True,
        )

    result = train.train(
        model, splits, cfg, device="cpu", out_dir=args.out, progress=True, on_epoch_end=evaluate
    )
    atomic_write_json(
        os.path.join(args.out, "results.json"),
        {
            "data": args.data,
            "model": {"name": args.model, "width": args.width},
            "train_config": cfg.to_dict(),
            "epochs": rows,
            "seconds": result.seconds,
            "threads": args.threads,
            "torch": torch.__version__,
            "machine": platform.platform(),
        },
    )
    print(f"done in {time.perf_counter() - t0:.0f} s -> {args.out}/results.json")


if __name__ == "__main__":
    main()
