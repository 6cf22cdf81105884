"""Speed of quantcal's failure-detection metrics against scikit-learn, on the same inputs.

    .venv/bin/python bench/bench_selective.py [--quick] [--threads 1]

1,000,000 samples of 100-class float32 logits (labels drawn from the model's softmax, logits
rounded to 1/8 so confidences tie, as low-precision logits do):

1. AUROC of right against wrong by confidence: ``metrics.failure_auroc(logits, labels)`` vs
   ``sklearn.metrics.roc_auc_score(correct, confidence)`` with the softmax confidence computed
   by torch first (as its users do), on the same inputs;
2. FPR at 95 % TPR: ``metrics.failure_fpr_at_tpr`` vs ``sklearn.metrics.roc_curve`` plus the
   first point with TPR >= 0.95;
3. AURC: ``metrics.aurc`` (ties averaged over their orders) alone, with the time of a plain
   ``torch.sort`` of the confidences beside it as the floor (scikit-learn has no AURC);
4. AURC against torch-uncertainty's ``AURC`` metric (``update`` with softmax probabilities, then
   ``compute``) on the same logits unrounded (no ties, where both definitions are exact). It
   integrates the risk over coverage k/N by the trapezoid rule and divides by (1 − 1/N), so
   quantcal's value (the mean of the risks) is converted to that form for the comparison:
   ``(N · AURC − (risk(1) + risk(N)) / 2) / (N − 1)``. Its package imports Lightning, so the one
   file that defines the metric is loaded on its own from an installed copy, e.g.
   ``pip install --no-deps --target /tmp/tu torch-uncertainty`` and ``PYTHONPATH=/tmp/tu``;
   absent, the part is skipped with a message.

Contenders are interleaved and repeated; medians and ratios are printed with both values.
scikit-learn is a dev dependency: without it the peers are skipped with a message.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from _race import race
from quantcal import metrics


def _data(n: int, c: int = 100, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, c, generator=g) * 3
    y = torch.multinomial(torch.softmax(z, 1), 1, generator=g).squeeze(1)
    return torch.round(z * 8) / 8, y


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:9.1f} ms"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="100,000 samples, 3 repeats")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n, repeats = (100_000, 3) if args.quick else (1_000_000, 5)
    z, y = _data(n)
    print(f"N = {n:,}, 100 classes, float32, {args.threads} thread(s), median of {repeats}")
    try:
        from sklearn.metrics import roc_auc_score, roc_curve
    except ImportError:
        print("scikit-learn is not installed: the peers are skipped")
        roc_auc_score = roc_curve = None

    def sk_conf() -> tuple[np.ndarray, np.ndarray]:
        p = torch.softmax(z.double(), 1)
        conf, pred = p.max(1)
        return (pred == y).numpy(), conf.numpy()

    def sk_auroc() -> float:
        right, conf = sk_conf()
        return float(roc_auc_score(right, conf))

    def sk_fpr95() -> float:
        right, conf = sk_conf()
        fpr, tpr, _ = roc_curve(right, conf)
        return float(fpr[np.searchsorted(tpr, 0.95 - 1e-12)])

    rows = [
        ("AUROC right vs wrong", lambda: metrics.failure_auroc(z, y), sk_auroc),
        ("FPR at 95 % TPR", lambda: metrics.failure_fpr_at_tpr(z, y), sk_fpr95),
    ]
    for name, ours, peer in rows:
        contenders = {"quantcal": ours}
        if roc_auc_score is not None:
            contenders["scikit-learn"] = peer
        r = race(contenders, repeats, warmup=True)
        line = f"{name:22s} quantcal {_ms(r['quantcal'][0])} = {r['quantcal'][1]:.6f}"
        if "scikit-learn" in r:
            ratio = r["scikit-learn"][0] / r["quantcal"][0]
            line += (
                f" | scikit-learn {_ms(r['scikit-learn'][0])} = {r['scikit-learn'][1]:.6f}"
                f" | {ratio:.1f}x"
            )
        print(line)
    r = race(
        {
            "aurc": lambda: metrics.aurc(z, y),
            "sort": lambda: torch.sort(torch.softmax(z, 1).max(1).values, descending=True),
        },
        repeats,
        warmup=True,
    )
    print(
        f"{'AURC (ties averaged)':22s} quantcal {_ms(r['aurc'][0])} = {r['aurc'][1]:.6f}"
        f" | softmax + sort alone {_ms(r['sort'][0])}"
    )
    peer = _torch_uncertainty_aurc()
    if peer is None:
        print("torch-uncertainty is not installed: its AURC is skipped (see the docstring)")
        return
    zu = torch.randn(n, 100, generator=torch.Generator().manual_seed(1)) * 3  # no ties

    def theirs() -> float:
        m = peer()
        m.update(torch.softmax(zu, 1), y)
        return float(m.compute())

    r = race(
        {"quantcal": lambda: metrics.aurc(zu, y), "torch-uncertainty": theirs},
        repeats,
        warmup=True,
    )
    curve = metrics.risk_coverage(zu, y)  # the conversion, outside the timed calls
    ends = (float(curve.risk[0]) + float(curve.risk[-1])) / 2
    converted = (n * r["quantcal"][1] - ends) / (n - 1)
    ratio = r["torch-uncertainty"][0] / r["quantcal"][0]
    print(
        f"{'AURC, no ties':22s} quantcal {_ms(r['quantcal'][0])} = {converted:.6f}"
        f" | torch-uncertainty {_ms(r['torch-uncertainty'][0])} = "
        f"{r['torch-uncertainty'][1]:.6f} | {ratio:.1f}x"
    )


def _torch_uncertainty_aurc():
    """torch-uncertainty's ``AURC`` class, its defining file loaded alone; None if absent."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("torch_uncertainty")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0], "metrics/classification/risk_coverage.py")
    file_spec = importlib.util.spec_from_file_location("_tu_risk_coverage", path)
    module = importlib.util.module_from_spec(file_spec)
    file_spec.loader.exec_module(module)
    return module.AURC


if __name__ == "__main__":
    main()
