"""Quantization-aware training step against the fp32 training step (target: <= 1.5x).

    python bench/bench_qat.py [--quick] [--threads 1] [--arch shufflenetv2 --width 0.5]
                              [--precision W4A4] [--batch 128]

Both contenders run one SGD step (forward, cross-entropy, backward, update) on the same batch
of 32x32 images in the same process, interleaved: the fp32 step trains the model in its
training form (BatchNorm included), as ``train.train`` does; the QAT step trains the deploy
graph with every conv/linear wrapped by ``quant.methods.qat.LSQLayer`` (BatchNorm folded, fake
quantization with learned step sizes in the loop), as ``quantize(..., method="qat")`` does.
Prints the medians and their ratio.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from _race import race
from quantcal import models, quant
from quantcal.quant.apply import LayerTarget
from quantcal.quant.graph import set_submodule
from quantcal.quant.methods import MethodContext
from quantcal.quant.methods.ptq import layers_with_ranges
from quantcal.quant.methods.qat import LSQLayer


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, x, y) -> float:
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--arch", default="shufflenetv2")
    ap.add_argument("--width", type=float, default=0.5)
    ap.add_argument("--precision", default="W4A4")
    ap.add_argument("--batch", type=int, default=128)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    repeats = 5 if args.quick else 15
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, 32, 32, generator=g)
    y = torch.randint(0, 100, (args.batch,), generator=g)
    fp32 = models.create_model(args.arch, num_classes=100, image_size=32, width=args.width, seed=0)
    qat = models.to_deploy(fp32.eval())
    fp32.train()
    target = LayerTarget.of(qat, quant.parse_precision(args.precision))
    layers = layers_with_ranges(qat, target, MethodContext(calib=[x]))
    for name, layer in layers.items():
        set_submodule(qat, name, LSQLayer(layer))
    qat.requires_grad_(True)
    for m in qat.modules():
        if isinstance(m, LSQLayer):
            m.layer.requires_grad_(False)
    qat.train()
    sgd = dict(lr=1e-3, momentum=0.9, nesterov=True)
    opt_f = torch.optim.SGD(fp32.parameters(), **sgd)
    opt_q = torch.optim.SGD([p for p in qat.parameters() if p.requires_grad], **sgd)
    res = race(
        {
            "fp32 train step": lambda: _step(fp32, opt_f, x, y),
            "qat train step": lambda: _step(qat, opt_q, x, y),
        },
        repeats,
        warmup=True,
    )
    tf, tq = res["fp32 train step"][0], res["qat train step"][0]
    print(
        f"{args.arch} {args.width:g}, {args.precision}, batch {args.batch}, "
        f"{len(layers)} quantized layers, {args.threads} thread(s), median of {repeats}:"
    )
    print(f"  fp32 step {1000 * tf:.0f} ms   qat step {1000 * tq:.0f} ms   ratio {tq / tf:.2f}x")


if __name__ == "__main__":
    main()
