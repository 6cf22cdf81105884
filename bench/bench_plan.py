"""Mixed-precision search cost: ShuffleNetV2 0.5 on 32x32 images, one CPU thread.

    python bench/bench_plan.py [--quick] [--threads 1]

Prints the search's wall time and how many whole validation passes it needed, and compares the
cost of evaluating one candidate plan the way quantcal does (composing layers of uniform
quantizations, quant.plan.compose_plan) with the naive way (quantize the model with the plan,
then run it), on the same input in the same process: medians and their ratio.

The model is randomly initialised; its validation labels are its own fp32 predictions on random
images with a clear top-2 margin, so every budget is meaningful (fp32 accuracy is 100 %).
"""

from __future__ import annotations

import argparse
import time

import torch

from _race import race
from quantcal import models, quant
from quantcal.quant.plan import compose_plan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer images and repeats")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n_val, repeats = (400, 3) if args.quick else (2000, 7)
    net = models.create_model("shufflenetv2", num_classes=100, image_size=32, width=0.5, seed=0)
    net.eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2 * n_val, 3, 32, 32, generator=g)
    with torch.no_grad():
        z = net(x)
    top2 = z.topk(2, dim=1).values
    keep = (top2[:, 0] - top2[:, 1]).argsort(descending=True)[:n_val]
    xv, yv = x[keep], z[keep].argmax(1)
    calib = [torch.randn(256, 3, 32, 32, generator=g)]
    val = [(xv[i : i + 500], yv[i : i + 500]) for i in range(0, n_val, 500)]

    t0 = time.perf_counter()
    r = quant.plan_mixed_precision(net, calib, val, budget=quant.PlanBudget(0.02, 0.02))
    search = time.perf_counter() - t0
    layers = len(r.plan)
    print(
        f"search: {search:.1f} s, {r.evaluations} validation passes of {n_val} images "
        f"({layers} layers, 3 levels; {search / r.evaluations:.2f} s per pass), "
        f"{sum(b != (8, 8) for b in r.plan.values())} layers below W8A8, within budget: "
        f"{r.within_budget}"
    )

    deploy = models.to_deploy(net)
    levels = [quant.quantize(deploy, p, calib) for p in ("W8A8", "W4A8", "W4A4")]
    names = list(r.plan)
    assign = {n: i % 3 for i, n in enumerate(names)}
    plan_cfg = quant.QuantConfig(
        layer_bits={n: ((8, 8), (4, 8), (4, 4))[j] for n, j in assign.items()}
    )
    work = compose_plan(levels, {})

    def composed():
        with torch.no_grad():
            return compose_plan(levels, assign, work)(xv[:500])

    def requantized():
        with torch.no_grad():
            return quant.quantize(deploy, plan_cfg, calib)(xv[:500])

    res = race({"compose": composed, "quantize": requantized}, repeats, warmup=True)
    (tc, zc), (tq, zq) = res["compose"], res["quantize"]
    assert torch.equal(zc, zq), "composed and requantized plans must be bit-identical"
    print(
        f"one candidate on 500 images (median of {repeats}): compose {tc * 1e3:.0f} ms, "
        f"quantize {tq * 1e3:.0f} ms, quantize / compose = {tq / tc:.2f}x (bit-identical logits)"
    )


if __name__ == "__main__":
    main()
