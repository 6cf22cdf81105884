"""Speed of quantcal's smooth ECE against relplot (the paper's package), on the same inputs.

    .venv/bin/python bench/bench_smooth_ece.py [--quick] [--threads 1]

Smooth ECE (Błasiok & Nakkiran 2024) with the automatic (fixed-point) bandwidth on N = 10,000
and 100,000 samples of 10-class float32 logits: a calibrated model (logits N(0, 6²), labels
drawn from its softmax: most confidences near 1, as in trained networks) and the same logits
sharpened by 1.2 (over-confident, ECE about 0.03). A small smooth ECE means a small fixed-point
bandwidth, a finer evaluation grid and more work for both:

1. from confidences: ``metrics.smooth_ece_from_confidences(conf, correct)`` vs
   ``relplot.smECE(conf, correct)`` on the same float64 arrays (the metric alone);
2. from logits: ``metrics.smooth_ece(logits, labels)`` vs relplot with its own
   ``multiclass_logits_to_confidences`` (scipy softmax) first, as its users call it.

Contenders are interleaved and repeated; medians and ratios are printed, with both values and
the bandwidths they chose. The values differ by relplot's discretization (it bins the samples
on a 0.001 grid, cuts its kernel at ±1/2 and counts samples within 0.001 of 1 at up to half
weight), so near-1 confidences make them differ visibly; see ``metrics.smooth_ece``. relplot is
not a quantcal dependency: without it the peer is skipped with a message.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import numpy as np
import torch

from _race import race
from quantcal.calibration import metrics, rows, smooth


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:9.2f} ms"


def _data(n: int, sharpen: float, c: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 logits of a calibrated model times ``sharpen`` and labels drawn from the model."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, c)) * 6.0
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    y = (p.cumsum(axis=1) < rng.random(n)[:, None]).sum(axis=1).clip(0, c - 1)
    return torch.from_numpy(z * sharpen).float(), torch.from_numpy(y)


def bench(n: int, sharpen: float, repeats: int, relplot) -> None:
    z, y = _data(n, sharpen)
    conf_t, correct_t = rows.top_label(z, y)
    conf = conf_t.double().numpy()
    correct = correct_t.double().numpy()
    ours_value, ours_sigma = smooth._SmoothEce(conf, conf - correct).search()
    kind = "calibrated" if sharpen == 1.0 else f"over-confident (x{sharpen})"
    print(f"\n[N = {n:,}] {kind} 10-class float32 logits (median of {repeats})")
    print(
        f"  confidences: mean {conf.mean():.4f}, within 0.001 of 1: {np.mean(conf > 0.999):.1%}, "
        f"exactly 1.0: {np.mean(conf == 1.0):.1%}"
    )
    contenders: dict[str, Callable[[], object]] = {
        "quantcal conf": lambda: metrics.smooth_ece_from_confidences(conf, correct),
        "quantcal logits": lambda: metrics.smooth_ece(z, y),
    }
    if relplot is not None:
        z_np, y_np = z.numpy(), y.numpy()
        contenders["relplot conf"] = lambda: relplot.smECE(conf, correct)
        contenders["relplot logits"] = lambda: relplot.smECE(
            *relplot.multiclass_logits_to_confidences(z_np, y_np)
        )
    res = race(contenders, repeats, warmup=True)
    print(f"  quantcal: smooth ECE = {ours_value:.6f} at bandwidth {ours_sigma:.6f}")
    if relplot is not None:
        rp_value, rp_sigma = relplot.smECE(conf, correct, return_width=True)
        print(f"  relplot:  smooth ECE = {rp_value:.6f} at bandwidth {rp_sigma:.6f}")
        print(f"  |quantcal - relplot| = {abs(rp_value - ours_value):.2e}")
    for what in ("conf", "logits"):
        q_t = res[f"quantcal {what}"][0]
        line = f"  from {what:<7} quantcal {_ms(q_t)}"
        if relplot is not None:
            r_t = res[f"relplot {what}"][0]
            line += f"   relplot {_ms(r_t)}   relplot / quantcal = {r_t / q_t:5.2f}x"
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    try:
        from importlib.metadata import version

        import relplot

        peer = f"relplot {version('relplot')}"
    except ImportError as exc:  # not a dependency: `pip install relplot` to compare
        relplot = None
        peer = f"relplot not importable ({exc}); timing quantcal alone"
    print(f"torch {torch.__version__}, numpy {np.__version__}, {peer}")
    print(f"{torch.get_num_threads()} torch intra-op threads (set OMP_NUM_THREADS=1 for numpy)")
    for sharpen in (1.0, 1.2):
        bench(10_000, sharpen, 7 if args.quick else 31, relplot)
        bench(100_000, sharpen, 3 if args.quick else 11, relplot)


if __name__ == "__main__":
    main()
