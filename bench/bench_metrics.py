"""Speed of quantcal.metrics / quantcal.recal against their peers, on the same inputs, one run.

    .venv/bin/python bench/bench_metrics.py [--quick]

1. ECE of 1,000,000 x 100 float32 logits (15 bins): quantcal vs torchmetrics
   ``multiclass_calibration_error`` and netcal ``ECE``, softmax included for the peers (their
   users must compute it); plus the one-pass floor (a plain row max over the logits).
2. 1,000 bootstrap resamples of ECE on 10,000 x 100: quantcal ``bootstrap_ci`` vs resampling
   through torchmetrics (50 calls timed on pre-computed probabilities, extrapolated to 1,000).
3. Temperature fit on 10,000 x 100 over-confident logits: quantcal's exact solve vs the
   much-copied LBFGS recipe (lr 0.01, max_iter 50, T0 = 1.5); both NLLs and Ts printed.

Every comparison interleaves the contenders, repeats, and reports medians and ratios, so a
busy machine slows both sides alike. Both sides run with the same number of intra-op threads,
1 by default (``--threads``): on the shared two-core machine, two threads per process made
every chunked or small op wait on descheduled threads (up to 10x slower, for both sides).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from _race import race
from quantcal.calibration import bootstrap, metrics, recal


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:9.1f} ms"


def bench_ece(n: int, repeats: int) -> None:
    from netcal.metrics import ECE
    from torchmetrics.functional.classification import multiclass_calibration_error

    c = 100
    g = torch.Generator().manual_seed(0)
    z = torch.randn(n, c, generator=g) * 3.0
    y = torch.randint(0, c, (n,), generator=g)
    y_np = y.numpy()
    res = race(
        {
            "quantcal": lambda: metrics.ece(z, y, n_bins=15),
            "torchmetrics": lambda: float(
                multiclass_calibration_error(torch.softmax(z, 1), y, num_classes=c, n_bins=15)
            ),
            "netcal": lambda: ECE(15).measure(torch.softmax(z, 1).numpy(), y_np),
            "floor amax": lambda: z.amax(dim=1),
            "floor max+argmax": lambda: z.max(dim=1),
        },
        repeats,
    )
    q_t, q_v = res["quantcal"]
    print(f"\n[1] ECE, {n:,} x {c} float32 logits, 15 bins (median of {repeats})")
    for name in ("quantcal", "torchmetrics", "netcal"):
        t, v = res[name]
        ratio = "" if name == "quantcal" else f"   quantcal is {t / q_t:4.2f}x faster"
        print(f"  {name:<17}{_ms(t)}   ECE = {float(v):.9f}{ratio}")
    for name in ("torchmetrics", "netcal"):
        diff = abs(float(res[name][1]) - q_v)
        print(
            f"  |quantcal - {name}| = {diff:.2e}  ({'OK' if diff <= 1e-6 else 'MISMATCH'} <= 1e-6)"
        )
    for name in ("floor amax", "floor max+argmax"):
        t = res[name][0]
        print(f"  {name:<17}{_ms(t)}   quantcal = {q_t / t:4.2f}x this one pass")


def bench_bootstrap(n: int, resamples: int, repeats: int, peer_calls: int) -> None:
    from torchmetrics.functional.classification import multiclass_calibration_error

    c = 100
    g = torch.Generator().manual_seed(1)
    z = torch.randn(n, c, generator=g) * 3.0
    y = torch.randint(0, c, (n,), generator=g)
    probs = torch.softmax(z, 1)  # computed once for the peer, outside its timing
    idx = torch.from_numpy(bootstrap._bootstrap_indices(n, peer_calls, seed=0))

    def peer() -> list[float]:
        return [
            float(multiclass_calibration_error(probs[i], y[i], num_classes=c, n_bins=15))
            for i in idx
        ]

    res = race(
        {
            "quantcal": lambda: metrics.bootstrap_ci("ece", z, y, n_resamples=resamples),
            "torchmetrics": peer,
        },
        repeats,
    )
    q_t, (lo, hi) = res["quantcal"]
    p_t = res["torchmetrics"][0] * resamples / peer_calls
    print(f"\n[2] bootstrap of ECE, {resamples:,} resamples of {n:,} x {c} (median of {repeats})")
    print(f"  quantcal         {_ms(q_t)}   95% CI = ({lo:.5f}, {hi:.5f})")
    print(
        f"  torchmetrics     {_ms(p_t)}   ({peer_calls} calls timed, x{resamples // peer_calls} "
        f"extrapolated)   quantcal is {p_t / q_t:5.1f}x faster"
    )
    check = [metrics.ece(z[i], y[i]) for i in idx[:5]]
    peer_vals = peer()[:5]
    diff = max(abs(a - b) for a, b in zip(check, peer_vals))
    print(f"  same resamples, quantcal vs torchmetrics ECE: max |diff| = {diff:.2e}")


def _lbfgs_recipe(z: torch.Tensor, y: torch.Tensor) -> float:
    t = torch.nn.Parameter(torch.ones(1) * 1.5)
    opt = torch.optim.LBFGS([t], lr=0.01, max_iter=50)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z / t, y)
        loss.backward()
        return loss

    opt.step(closure)
    return float(t.detach())


def bench_temperature(n: int, repeats: int) -> None:
    c = 100
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(n, c)) * 2.0
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    y = torch.from_numpy((p.cumsum(1) < rng.random(n)[:, None]).sum(1).clip(0, c - 1))
    z = torch.from_numpy(logits * 4.0).float()  # calibrated model, over-confident by 4x
    _lbfgs_recipe(z[:10], y[:10])  # warm-up: torch.optim's first use imports torch._dynamo
    res = race(
        {
            "quantcal": lambda: recal.TemperatureScaling().fit(z, y).temperature,
            "LBFGS recipe": lambda: _lbfgs_recipe(z, y),
        },
        repeats,
    )
    q_t, q_temp = res["quantcal"]
    l_t, l_temp = res["LBFGS recipe"]
    q_nll, l_nll = metrics.nll(z.double() / q_temp, y), metrics.nll(z.double() / l_temp, y)
    print(f"\n[3] temperature fit, {n:,} x {c} over-confident logits (median of {repeats})")
    print(f"  quantcal         {_ms(q_t)}   T = {q_temp:.6f}   val NLL = {q_nll:.6f}")
    print(f"  LBFGS recipe     {_ms(l_t)}   T = {l_temp:.6f}   val NLL = {l_nll:.6f}")
    print(
        f"  quantcal is {l_t / q_t:4.1f}x faster; NLL lower or equal: "
        f"{'yes' if q_nll <= l_nll + 1e-12 else 'NO'} (by {l_nll - q_nll:.4f})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller inputs, fewer repeats")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (both)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads")
    if args.quick:
        bench_ece(100_000, 3)
        bench_bootstrap(10_000, 200, 2, 20)
        bench_temperature(10_000, 2)
    else:
        bench_ece(1_000_000, 5)
        bench_bootstrap(10_000, 1000, 5, 50)
        bench_temperature(10_000, 5)


if __name__ == "__main__":
    main()
