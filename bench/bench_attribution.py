"""Per-layer attribution cost: the replay of quant.attribute_layers against full forward passes.

    python bench/bench_attribution.py [--quick] [--threads 1] [--arch shufflenetv2 --width 0.5]

Both contenders compute the same thing on the same input in the same process: every quantized
layer alone quantized and alone kept in fp32, over N validation images of 32x32 (W4A4). The naive
one runs the whole network per layer and mode (``naive=True``); quantcal's replays only the nodes
downstream of each layer against one batch's cached values. Prints the medians, their ratio, the
fraction of nodes re-executed, and checks that both give identical numbers.
"""

from __future__ import annotations

import argparse

import torch

from _race import race
from quantcal import models, quant


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer images and repeats")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--arch", default="shufflenetv2")
    ap.add_argument("--width", type=float, default=0.5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n, repeats = (128, 3) if args.quick else (512, 5)
    net = models.create_model(args.arch, num_classes=100, image_size=32, width=args.width, seed=0)
    net.eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 32, 32, generator=g)
    with torch.no_grad():
        y = net(x).argmax(1)  # labels: the fp32 model's own predictions
    q = quant.quantize(net, "W4A4", [torch.randn(256, 3, 32, 32, generator=g)])
    layers = len(quant.quantized_layers(q))
    res = race(
        {
            "naive (full passes)": lambda: quant.attribute_layers(q, (x, y), naive=True),
            "quantcal (replay)": lambda: quant.attribute_layers(q, (x, y)),
        },
        repeats,
    )
    (t_naive, r_naive), (t_fast, r_fast) = res["naive (full passes)"], res["quantcal (replay)"]
    assert r_naive.groups == r_fast.groups, "the replay must give the full passes' numbers"
    print(
        f"{args.arch}@{args.width:g}, 32x32, W4A4, {layers} layers x 2 modes over {n} images, "
        f"{args.threads} thread(s), median of {repeats}"
    )
    print(f"  naive (full passes) {t_naive:8.2f} s")
    print(f"  quantcal (replay)   {t_fast:8.2f} s   ratio {t_naive / t_fast:.2f}x")
    print(f"  nodes re-executed: {r_fast.work_fraction:.0%} of the full passes'; numbers identical")


if __name__ == "__main__":
    main()
