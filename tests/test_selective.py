"""Selective prediction and failure detection (``quantcal.calibration.selective``) against a
brute force over every order of tied samples, hand-worked cases, and scikit-learn's ROC."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from quantcal.calibration import bootstrap, selective


def _logits(conf: list[float], right: list[bool]) -> tuple[torch.Tensor, torch.Tensor]:
    """Two-class logits whose top-label confidence is ``conf`` (>= 0.5), predicting class 0;
    the label is 0 where ``right``."""
    c = torch.tensor(conf, dtype=torch.float64)
    z = torch.stack([torch.log(c), torch.log1p(-c)], 1)
    y = torch.tensor([0 if r else 1 for r in right])
    return z, y


def _brute_aurc(conf, right) -> float:
    """Mean over every order of tied samples of (1/N) Σ_k errors(top k)/k."""
    n = len(conf)
    groups = {}
    for i, c in enumerate(conf):
        groups.setdefault(c, []).append(i)
    blocks = [groups[c] for c in sorted(groups, reverse=True)]
    values = []
    for orders in itertools.product(*(itertools.permutations(b) for b in blocks)):
        seq = [i for block in orders for i in block]
        errors = np.cumsum([0 if right[i] else 1 for i in seq])
        values.append(np.mean(errors / np.arange(1, n + 1)))
    return float(np.mean(values))


CASES = [
    ([0.9, 0.8, 0.7, 0.6], [True, True, False, False]),  # perfect ranking
    ([0.9, 0.8, 0.7, 0.6], [False, False, True, True]),  # worst ranking
    ([0.9, 0.9, 0.7, 0.7, 0.6], [True, False, True, False, True]),  # ties
    ([0.75] * 5, [True, False, True, True, False]),  # one block
    ([0.99, 0.6, 0.6, 0.55, 0.55, 0.55], [True, True, False, False, True, False]),
]


@pytest.mark.parametrize(("conf", "right"), CASES)
def test_aurc_is_the_mean_over_tie_orders(conf, right):
    z, y = _logits(conf, right)
    assert selective.aurc(z, y) == pytest.approx(_brute_aurc(conf, right), abs=1e-12)


def test_aurc_by_hand_and_excess_aurc_of_a_perfect_ranking_is_zero():
    z, y = _logits(*CASES[0])
    # errors among the top k: 0, 0, 1, 2 -> (0 + 0 + 1/3 + 1/2) / 4
    assert selective.aurc(z, y) == pytest.approx((1 / 3 + 1 / 2) / 4)
    assert selective.excess_aurc(z, y) == pytest.approx(0.0, abs=1e-15)
    z, y = _logits(*CASES[1])  # worst: 1, 1, 2/3, 1/2
    assert selective.aurc(z, y) == pytest.approx((1 + 1 + 2 / 3 + 1 / 2) / 4)
    assert selective.excess_aurc(z, y) == pytest.approx((1 + 1 + 2 / 3 + 1 / 2 - 1 / 3 - 1 / 2) / 4)


def test_all_right_and_all_wrong():
    z, y = _logits([0.9, 0.7, 0.6], [True] * 3)
    assert selective.aurc(z, y) == 0.0 and selective.excess_aurc(z, y) == 0.0
    assert math.isnan(selective.failure_auroc(z, y))
    assert math.isnan(selective.failure_fpr_at_tpr(z, y))
    assert selective.coverage_at_risk(z, y, 0.0) == 1.0
    z, y = _logits([0.9, 0.7, 0.6], [False] * 3)
    assert selective.aurc(z, y) == 1.0 and selective.excess_aurc(z, y) == 0.0
    assert selective.coverage_at_risk(z, y, 0.5) == 0.0


def test_risk_coverage_has_one_point_per_distinct_confidence():
    z, y = _logits(*CASES[2])  # blocks: 0.9 (R, W), 0.7 (R, W), 0.6 (R)
    curve = selective.risk_coverage(z, y)
    assert curve.accepted.tolist() == [2, 4, 5] and curve.n == 5
    assert curve.coverage.tolist() == pytest.approx([0.4, 0.8, 1.0])
    assert curve.risk.tolist() == pytest.approx([0.5, 0.5, 0.4])
    assert curve.thresholds.tolist() == pytest.approx([0.9, 0.7, 0.6])


def test_selective_risk_rounds_up_to_a_whole_tie_block_and_coverage_at_risk_is_the_largest():
    z, y = _logits(*CASES[4])  # blocks: 0.99 (R) | 0.6 (R, W) | 0.55 (W, R, W)
    assert selective.selective_risk(z, y, 1 / 6) == 0.0
    assert selective.selective_risk(z, y, 0.3) == pytest.approx(1 / 3)  # 2 -> block of 3
    assert selective.selective_risk(z, y, 1.0) == pytest.approx(3 / 6)
    assert selective.coverage_at_risk(z, y, 0.0) == pytest.approx(1 / 6)
    assert selective.coverage_at_risk(z, y, 1 / 3) == pytest.approx(3 / 6)
    assert selective.coverage_at_risk(z, y, 0.5) == 1.0
    with pytest.raises(ValueError, match="coverage must be in"):
        selective.selective_risk(z, y, 0.0)
    with pytest.raises(ValueError, match="risk must be in"):
        selective.coverage_at_risk(z, y, 1.5)


def test_failure_auroc_and_fpr95_match_scikit_learn_with_ties():
    metrics = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3000, 10, generator=g) * 2
    z = torch.round(z * 4) / 4  # many ties in the confidence
    y = torch.randint(0, 10, (3000,), generator=g)
    y[:1500] = z[:1500].argmax(1)  # half right on purpose
    conf = torch.softmax(z.double(), 1).max(1).values.numpy()
    right = (z.argmax(1) == y).numpy()
    assert selective.failure_auroc(z, y) == pytest.approx(
        metrics.roc_auc_score(right, conf), abs=1e-9
    )
    fpr, tpr, _ = metrics.roc_curve(right, conf)
    expected = fpr[np.searchsorted(tpr, 0.95 - 1e-12)]
    assert selective.failure_fpr_at_tpr(z, y) == pytest.approx(expected, abs=1e-12)


def test_the_bootstrap_and_paired_differences_take_them():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(400, 5, generator=g)
    y = torch.randint(0, 5, (400,), generator=g)
    lo, hi = bootstrap.bootstrap_ci(selective.aurc, z, y, n_resamples=50, seed=0)
    assert lo <= selective.aurc(z, y) <= hi
    z2, y2 = z[:, :2], (y % 2)  # two classes: a temperature keeps the order of confidences
    est, lo, hi = bootstrap.paired_bootstrap_diff(
        selective.failure_auroc, z2, z2 * 0.5, y2, n_resamples=50, seed=0
    )
    assert est == 0.0 and lo == hi == 0.0


def test_bad_input_is_refused_like_every_metric():
    with pytest.raises(ValueError):
        selective.aurc(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError):
        selective.aurc(torch.zeros(4, 3), torch.zeros(5, dtype=torch.long))
    z = torch.zeros(4, 3)
    z[0, 0] = float("nan")
    with pytest.raises(ValueError):
        selective.failure_auroc(z, torch.zeros(4, dtype=torch.long))


def test_bootstrap_fast_aurc_equals_the_callable_loop_on_tied_confidences():
    g = torch.Generator().manual_seed(7)
    z = (torch.randn(90, 4, generator=g) * 2).round()  # many exactly tied confidences
    y = torch.randint(0, 4, (90,), generator=g)
    for name, fn in (("aurc", selective.aurc), ("excess_aurc", selective.excess_aurc)):
        fast = bootstrap.bootstrap_ci(name, z, y, n_resamples=60, seed=3)
        loop = bootstrap.bootstrap_ci(fn, z, y, n_resamples=60, seed=3)
        assert fast == pytest.approx(loop, abs=1e-12), name
        est, lo, hi = bootstrap.paired_bootstrap_diff(name, z, z / 4, y, n_resamples=60, seed=3)
        assert est == pytest.approx(fn(z, y) - fn(z / 4, y), abs=1e-12)
        assert lo <= hi


def test_aurc_agrees_with_torch_uncertainty_where_installed():
    """torch-uncertainty's AURC integrates the risk over coverage k/N by the trapezoid rule and
    divides by 1 - 1/N; without ties the two are the same area: ``(N·aurc − (r_1 + r_N)/2) /
    (N − 1)``. Its package imports Lightning, so the file defining the metric is loaded alone
    (``pip install --no-deps --target DIR torch-uncertainty``, DIR on PYTHONPATH)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("torch_uncertainty")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("torch-uncertainty is not installed")
    path = Path(spec.submodule_search_locations[0], "metrics/classification/risk_coverage.py")
    file_spec = importlib.util.spec_from_file_location("_tu_risk_coverage", path)
    module = importlib.util.module_from_spec(file_spec)
    file_spec.loader.exec_module(module)
    g = torch.Generator().manual_seed(2)
    for n in (2, 7, 500):
        z = torch.randn(n, 6, generator=g, dtype=torch.float64) * 2
        y = torch.randint(0, 6, (n,), generator=g)
        m = module.AURC()
        m.update(torch.softmax(z, 1), y)
        curve = selective.risk_coverage(z, y)
        ours = (n * selective.aurc(z, y) - (float(curve.risk[0]) + float(curve.risk[-1])) / 2) / (
            n - 1
        )
        assert ours == pytest.approx(float(m.compute()), abs=1e-6), n  # its coverage is float32
