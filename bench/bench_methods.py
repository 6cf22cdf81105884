"""quantcal's quantization methods against Brevitas's on the same model and images.

    cd bench && OMP_NUM_THREADS=1 /path/to/brevitas-venv/bin/python bench_methods.py \\
        --checkpoint model.pt --npz cifar100.npz [--precisions W4A8 W4A4] [--iters 200]
    ... bench_methods.py --quick          # digits, a model trained in ~30 s

(Brevitas in a venv of its own: ``pip install torch==2.13.0 -e ".[bench]"`` there; see
``bench_methods_brevitas.py``.) For each precision and
method (``ptq``, ``cle_bc``, ``adaround``) both tools quantize the same fp32 ShuffleNetV2 (0.5 on
32x32 by default, BatchNorm folded by ``models.to_deploy`` for both) with the same scheme
(symmetric per-channel weights, asymmetric per-tensor min-max activations, int32 biases; see
``bench_methods_brevitas.py``) on the same range-calibration images, and are scored on the same
test images. Prints accuracy and wall time side by side and the time ratio; ``ptq`` and
``cle_bc`` are timed as the median of ``--repeats`` interleaved runs, ``adaround`` once each
(minutes). Targets (issue 12): quantcal's accuracy no worse, its time at most 1.5x Brevitas's.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from bench_methods_brevitas import accuracy, run_brevitas
from quantcal import models, quant
from quantcal.training import data


def _tensors(split, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*split.batches(1024))
    return torch.cat(xs)[:n], torch.cat(ys)[:n]


def _quantcal(method: str, model, calib, x, y, precision: str, iters: int) -> dict:
    options = {"iterations": iters} if method == "adaround" else None
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = quant.quantize(model, precision, [calib], method=method, method_options=options)
    seconds = time.perf_counter() - t0
    return {"accuracy": accuracy(q, x, y), "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--checkpoint", help="a trained ShuffleNetV2 state dict (quantcal train)")
    ap.add_argument("--npz", help="the dataset as npz:PATH's file (CIFAR-100 for the checkpoint)")
    ap.add_argument("--arch", default="shufflenetv2")
    ap.add_argument("--width", type=float, default=0.5)
    ap.add_argument("--precisions", nargs="+", default=["W4A8", "W4A4"])
    ap.add_argument("--methods", nargs="+", default=["ptq", "cle_bc", "adaround"])
    ap.add_argument("--iters", type=int, default=200, help="AdaRound steps per layer (both)")
    ap.add_argument("--calib", type=int, default=512, help="range-calibration images")
    ap.add_argument("--test", type=int, default=2000, help="test images scored")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        from quantcal.training.train import TrainConfig, train

        splits = data.load_dataset("digits")
        model = models.create_model(
            args.arch, num_classes=10, image_size=8, in_chans=1, width=0.25, seed=0
        )
        cfg = TrainConfig(epochs=10, batch_size=64, lr=0.05, schedule="cosine", augment=False)
        train(model, splits, cfg, device="cpu", progress=False)
        args.iters, args.repeats, args.width = min(args.iters, 100), 1, 0.25
    else:
        if not (args.checkpoint and args.npz):
            ap.error("--checkpoint and --npz are needed without --quick")
        from quantcal.study.factories import load_weights

        splits = data.load_dataset(f"npz:{args.npz}", val_size=5000, ptq_calib_size=1000)
        model = models.create_model(
            args.arch,
            num_classes=splits.num_classes,
            image_size=splits.image_size,
            in_chans=splits.channels,
            width=args.width,
        )
        load_weights(model, args.checkpoint)
    model.eval()
    calib, _ = _tensors(splits.ptq_calib, args.calib)
    x, y = _tensors(splits.test, args.test)
    print(
        f"{args.arch}@{args.width:g}: {len(calib)} calibration / {len(y)} test images, "
        f"{torch.get_num_threads()} thread(s), AdaRound {args.iters} steps per layer (both); "
        f"fp32 accuracy {100 * accuracy(model, x, y):.1f} %"
    )
    print(
        f"{'prec':6} {'method':9} {'quantcal acc%':>13} {'brevitas acc%':>13} "
        f"{'quantcal s':>10} {'brevitas s':>10} {'time ratio':>10}"
    )
    for precision in args.precisions:
        w, a = (int(v) for v in precision.upper().lstrip("W").split("A"))
        for method in args.methods:
            repeats = 1 if method == "adaround" else args.repeats
            ours, theirs = [], []
            for _ in range(repeats):  # interleaved: a noisy neighbour slows both alike
                ours.append(_quantcal(method, model, calib, x, y, precision, args.iters))
                theirs.append(run_brevitas(method, model, calib, x, y, w, a, args.iters))
            tq = statistics.median(r["seconds"] for r in ours)
            tb = statistics.median(r["seconds"] for r in theirs)
            print(
                f"{precision:6} {method:9} {100 * ours[-1]['accuracy']:13.1f} "
                f"{100 * theirs[-1]['accuracy']:13.1f} {tq:10.1f} {tb:10.1f} {tq / tb:9.2f}x"
            )


if __name__ == "__main__":
    main()
