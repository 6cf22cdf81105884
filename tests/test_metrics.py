"""quantcal.metrics against an independent numpy re-derivation, torchmetrics and netcal."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import _refs
from quantcal.calibration import binning as bins
from quantcal.calibration import bootstrap as boot
from quantcal.calibration import metrics as M
from quantcal.calibration import rows as row_pass
from quantcal.calibration import smooth as smece


def _random(n=600, c=7, scale=3.0, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(n, c, generator=g, dtype=torch.float64) * scale).to(dtype)
    y = torch.randint(0, c, (n,), generator=g)
    return z, y


# ----------------------------------------------------------------------------------------------
# agreement with the numpy re-derivation
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("norm", M.NORMS)
@pytest.mark.parametrize("n_bins", [1, 7, 15])
@pytest.mark.parametrize("binning", M.BINNINGS)
def test_ece_matches_numpy_reference(norm, n_bins, binning):
    z, y = _random()
    got = M.ece(z, y, n_bins=n_bins, binning=binning, norm=norm)
    want = _refs.ece(z.numpy(), y.numpy(), n_bins=n_bins, norm=norm, binning=binning)
    assert got == pytest.approx(want, abs=1e-12)


def test_other_metrics_match_numpy_reference():
    z, y = _random(n=400, c=5)
    zn, yn = z.numpy(), y.numpy()
    conf, pred = _refs.top_label(zn)
    assert M.accuracy(z, y) == pytest.approx(np.mean(pred == yn), abs=1e-15)
    assert M.mean_confidence(z, y) == pytest.approx(conf.mean(), abs=1e-12)
    assert M.nll(z, y) == pytest.approx(_refs.nll(zn, yn), abs=1e-12)
    assert M.brier(z, y) == pytest.approx(_refs.brier(zn, yn), abs=1e-12)
    assert M.classwise_ece(z, y, n_bins=10) == pytest.approx(
        _refs.classwise_ece(zn, yn, 10), abs=1e-12
    )
    assert M.debiased_ece_sq(z, y) == pytest.approx(_refs.debiased_ece_sq(zn, yn), abs=1e-12)
    assert M.debiased_ece(z, y) == pytest.approx(
        math.sqrt(max(0.0, _refs.debiased_ece_sq(zn, yn))), abs=1e-12
    )
    assert M.mce(z, y) == M.ece(z, y, norm="max")
    assert M.adaptive_ece(z, y) == M.ece(z, y, binning="mass")
    assert M.nll(z, y) == pytest.approx(float(torch.nn.functional.cross_entropy(z, y)), abs=1e-12)


def test_debiased_removes_the_small_sample_bias():
    # Calibrated model: the true binned squared error is ~0; the plug-in is biased up by
    # about sum_b acc_b(1-acc_b)/N, the debiased estimate averages near 0.
    plugin, debiased = [], []
    for seed in range(20):
        z, y = _refs.calibrated_logits(300, 4, seed=seed)
        plugin.append(M.ece(z, y, norm="l2") ** 2)
        debiased.append(M.debiased_ece_sq(z, y))
    assert np.mean(plugin) > 4 * abs(np.mean(debiased))
    assert abs(np.mean(debiased)) < 2e-3


def test_calibration_report_equals_the_single_metrics():
    z, y = _random(n=300, c=6, dtype=torch.float32)
    rep = M.calibration_report(z, y, n_bins=10)
    assert rep["n"] == 300
    single = {
        "accuracy": M.accuracy(z, y),
        "mean_confidence": M.mean_confidence(z, y),
        "ece": M.ece(z, y, n_bins=10),
        "mce": M.mce(z, y, n_bins=10),
        "ece_l2": M.ece(z, y, n_bins=10, norm="l2"),
        "adaptive_ece": M.adaptive_ece(z, y, n_bins=10),
        "debiased_ece": M.debiased_ece(z, y, n_bins=10),
        "classwise_ece": M.classwise_ece(z, y, n_bins=10),
        "nll": M.nll(z, y),
        "brier": M.brier(z, y),
    }
    for key, value in single.items():
        assert rep[key] == pytest.approx(value, abs=1e-6), key


def test_reliability_bins_are_consistent_with_ece():
    z, y = _random(n=500, c=4)
    rel = M.reliability(z, y, n_bins=12)
    assert rel.n_bins == 12
    np.testing.assert_array_equal(rel.edges, np.arange(13) / 12)
    assert rel.count.sum() == 500 and rel.count.dtype == np.int64
    empty = rel.count == 0
    assert np.isnan(rel.confidence[empty]).all() and np.isnan(rel.accuracy[empty]).all()
    full = ~empty
    lo, hi = rel.edges[:-1][full], rel.edges[1:][full]
    assert ((rel.confidence[full] > lo) & (rel.confidence[full] <= hi)).all()
    gaps = np.abs(rel.accuracy[full] - rel.confidence[full])
    assert np.sum(rel.count[full] / 500 * gaps) == pytest.approx(M.ece(z, y, n_bins=12), abs=1e-12)


# ----------------------------------------------------------------------------------------------
# peers
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("norm", M.NORMS)
@pytest.mark.parametrize("n_bins", [5, 15])
def test_matches_torchmetrics_on_random_inputs(norm, n_bins):
    tmf = pytest.importorskip("torchmetrics.functional.classification")
    z, y = _random(n=2000, c=10)
    want = tmf.multiclass_calibration_error(
        torch.softmax(z, 1), y, num_classes=10, n_bins=n_bins, norm=norm
    )
    assert M.ece(z, y, n_bins=n_bins, norm=norm) == pytest.approx(float(want), abs=1e-6)


@pytest.mark.parametrize("n_bins", [10, 15])
def test_matches_netcal_on_random_inputs(n_bins):
    netcal_metrics = pytest.importorskip("netcal.metrics")
    z, y = _random(n=2000, c=10)
    want = netcal_metrics.ECE(n_bins).measure(torch.softmax(z, 1).numpy(), y.numpy())
    assert M.ece(z, y, n_bins=n_bins) == pytest.approx(want, abs=1e-6)


def _edge_case_logits():
    """Three samples, four classes: conf exactly 1/2 (an interior edge of 4 bins), 0.3, 1.0."""
    low = -200.0
    z = torch.tensor(
        [
            [0.0, 0.0, low, low],  # conf 0.5 exactly, predicts 0, label 0: correct
            _refs.rows_at_confidence(np.array([0.3]), 4)[0].tolist(),  # conf 0.3, label 2: wrong
            [low, low, low, 0.0],  # conf 1.0 exactly, predicts 3, label 1: wrong
        ],
        dtype=torch.float64,
    )
    return z, torch.tensor([0, 2, 1])


def test_torchmetrics_hidden_extra_bin_for_confidence_one_is_pinned():
    # torchmetrics buckets with torch.bucketize(right=True) on linspace(0, 1, B+1): bins are
    # [lo, hi) and confidence exactly 1.0 lands in a hidden extra bin B
    # (Lightning-AI/torchmetrics#3510). quantcal uses (lo, hi] bins and puts 1.0 in the last.
    tmf = pytest.importorskip("torchmetrics.functional.classification")
    z, y = _edge_case_logits()
    z = torch.cat([z, torch.tensor([[0.0, -200.0, -200.0, -200.0]], dtype=torch.float64)])
    y = torch.cat([y, torch.tensor([0])])  # conf 1.0 and correct
    z = torch.cat([z, torch.from_numpy(_refs.rows_at_confidence(np.array([0.9]), 4))])
    y = torch.cat([y, torch.tensor([1])])  # conf 0.9 and wrong: shares the last bin with 1.0
    tm = float(tmf.multiclass_calibration_error(torch.softmax(z, 1), y, num_classes=4, n_bins=4))
    ours = M.ece(z, y, n_bins=4)
    assert ours == pytest.approx(_refs.ece(z, y, n_bins=4, convention="right"), abs=1e-12)
    # (torchmetrics returns float32, hence 1e-6)
    assert tm == pytest.approx(_refs.ece(z, y, n_bins=4, convention="torchmetrics"), abs=1e-6)
    # by hand: ours -> bins (0.25,0.5]: {0.5 ok, 0.3 x}; (0.75,1]: {1.0 x, 1.0 ok, 0.9 x}
    assert ours == pytest.approx((abs(0.5 - 0.4) * 2 + abs(1 / 3 - 2.9 / 3) * 3) / 5, abs=1e-12)
    # torchmetrics -> [0.25,0.5): {0.3 x}; [0.5,0.75): {0.5 ok}; [0.75,1): {0.9 x}; {1.0}: 2
    assert tm == pytest.approx((0.3 + 0.5 + 0.9 + abs(0.5 - 1.0) * 2) / 5, abs=1e-6)
    assert abs(tm - ours) > 0.1


def test_netcal_left_closed_bins_are_pinned():
    # netcal bins with np.histogramdd on linspace edges: [lo, hi) bins, the last closed; it also
    # clips confidences to [eps, 1 - eps]. An interior edge therefore goes up, not down.
    netcal_metrics = pytest.importorskip("netcal.metrics")
    z, y = _edge_case_logits()
    got = netcal_metrics.ECE(4).measure(torch.softmax(z, 1).numpy(), y.numpy())
    assert got == pytest.approx(_refs.ece(z, y, n_bins=4, convention="left"), abs=1e-9)
    ours = M.ece(z, y, n_bins=4)
    assert ours == pytest.approx(_refs.ece(z, y, n_bins=4, convention="right"), abs=1e-12)
    assert ours == pytest.approx((abs(0.5 - 0.4) * 2 + 1.0) / 3, abs=1e-12)
    assert got == pytest.approx((0.3 + 0.5 + 1.0) / 3, abs=1e-9)


# ----------------------------------------------------------------------------------------------
# edge cases
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_confidence_on_every_bin_edge_goes_to_the_lower_bin(dtype):
    n_bins = 15
    conf = np.arange(1, n_bins + 1) / n_bins
    z = torch.from_numpy(_refs.rows_at_confidence(conf, 16)).to(dtype)
    got_conf, _ = row_pass.top_label(z, torch.zeros(n_bins, dtype=torch.long))
    assert np.allclose(got_conf.double().numpy(), conf, rtol=1e-6)  # on the edges (rounded)
    np.testing.assert_array_equal(bins.bin_width(got_conf, n_bins).numpy(), np.arange(n_bins))
    rel = M.reliability(z, torch.zeros(n_bins, dtype=torch.long), n_bins=n_bins)
    np.testing.assert_array_equal(rel.count, np.ones(n_bins))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_exact_tie_edges_in_every_dtype(dtype):
    # k tied top logits give confidence exactly 1/k: the edges 1/8, 1/4, 1/2 and 1 of 8 bins.
    rows = []
    for k in (8, 4, 2, 1):
        rows.append([0.0] * k + [-60.0] * (8 - k))
    z = torch.tensor(rows, dtype=dtype)
    conf, correct = row_pass.top_label(z, torch.zeros(4, dtype=torch.long))
    np.testing.assert_array_equal(conf.double().numpy(), [1 / 8, 1 / 4, 1 / 2, 1.0])
    assert correct.all()  # the prediction is the first index among ties ...
    _, correct = row_pass.top_label(z, torch.tensor([1, 1, 1, 0]))
    np.testing.assert_array_equal(correct.numpy(), [False, False, False, True])  # ... not any
    np.testing.assert_array_equal(bins.bin_width(conf, 8).numpy(), [0, 1, 3, 7])


def test_bin_rule_at_zero_one_and_just_above_an_edge():
    conf = torch.tensor([0.0, 1.0, 0.5, 0.5 + 1e-6, 0.5 - 1e-6], dtype=torch.float32)
    np.testing.assert_array_equal(bins.bin_width(conf, 4).numpy(), [0, 3, 1, 2, 1])
    np.testing.assert_array_equal(bins.bin_width(conf, 1).numpy(), [0, 0, 0, 0, 0])
    conf64 = torch.tensor([0.5 + 1e-12, 0.5 * (1 + 1e-15)], dtype=torch.float64)
    np.testing.assert_array_equal(bins.bin_width(conf64, 4).numpy(), [2, 1])


def test_single_sample_one_class_present_all_correct_all_wrong():
    z, y = _random(n=50, c=5)
    _, pred = _refs.top_label(z.numpy())
    conf = _refs.top_label(z.numpy())[0]
    right = torch.from_numpy(pred)
    wrong = (right + 1) % 5
    assert M.ece(z, right) == pytest.approx(1.0 - conf.mean(), abs=1e-12)  # all correct
    assert M.ece(z, wrong) == pytest.approx(conf.mean(), abs=1e-12)  # all wrong
    assert M.accuracy(z, right) == 1.0 and M.accuracy(z, wrong) == 0.0
    one = torch.full((50,), 2)  # a single class present
    assert M.ece(z, one) == pytest.approx(_refs.ece(z.numpy(), one.numpy()), abs=1e-12)
    assert M.classwise_ece(z, one) == pytest.approx(_refs.classwise_ece(z, one), abs=1e-12)
    rep = M.calibration_report(z[:1], y[:1])  # N = 1
    c1 = float(conf[0])
    hit = float(pred[0] == int(y[0]))
    assert rep["n"] == 1 and rep["ece"] == pytest.approx(abs(hit - c1), abs=1e-12)
    assert rep["mce"] == rep["ece"] == rep["adaptive_ece"] == pytest.approx(rep["ece_l2"])
    assert rep["debiased_ece"] == 0.0  # a bin with one sample carries no debiased estimate
    assert all(math.isfinite(v) for v in rep.values())


def test_heavy_ties_never_split_across_mass_bins():
    # low-bit-like logits: 4 levels over 4 classes, so confidences take few distinct values
    g = torch.Generator().manual_seed(3)
    z = torch.round(torch.randn(2000, 4, generator=g)).clamp(-2, 1) * 0.75
    y = torch.randint(0, 4, (2000,), generator=g)
    conf, _ = row_pass.top_label(z, y)
    idx = bins.bin_mass(conf, 15)
    values, counts = torch.unique(conf, return_counts=True)
    assert values.numel() < 40 and counts.max() > 2000 / 15  # heavy ties indeed
    for v in values:
        assert torch.unique(idx[conf == v]).numel() == 1
    pred = _refs.top_label(z.numpy())[1]  # tied top logits: the first index is the prediction
    assert M.accuracy(z, y) == pytest.approx(np.mean(pred == y.numpy()), abs=1e-15)
    for binning in M.BINNINGS:
        want = _refs.ece(z.numpy(), y.numpy(), binning=binning)
        assert M.ece(z, y, binning=binning) == pytest.approx(want, abs=1e-6)


def test_mass_bins_are_equal_without_ties():
    conf = torch.rand(150, dtype=torch.float64)
    counts = torch.bincount(bins.bin_mass(conf, 15), minlength=15)
    assert (counts == 10).all()
    counts = torch.bincount(bins.bin_mass(torch.rand(10, dtype=torch.float64), 3), minlength=3)
    assert counts.tolist() == [3, 4, 3]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits_are_computed_in_float32(dtype):
    z, y = _random(n=300, c=6, dtype=dtype)
    rep_half = M.calibration_report(z, y)
    rep_32 = M.calibration_report(z.float(), y)
    assert rep_half == rep_32
    assert M.ece(z, y) == M.ece(z.float(), y)
    assert M.ece(z, y) == pytest.approx(_refs.ece(z.double().numpy(), y.numpy()), abs=1e-6)


def test_numpy_input_equals_torch_input():
    z, y = _random(n=200, c=4, dtype=torch.float32)
    assert M.calibration_report(z.numpy(), y.numpy()) == M.calibration_report(z, y)
    assert M.ece(z.numpy(), y.numpy().astype(np.int32)) == M.ece(z, y)
    zt = z.t().contiguous().t()  # non-contiguous
    assert M.ece(zt, y) == M.ece(z, y)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    z, y = _random(n=3000, c=10, dtype=torch.float32)
    cpu = M.calibration_report(z, y)
    gpu = M.calibration_report(z.cuda(), y.cuda())
    for key in cpu:
        assert gpu[key] == pytest.approx(cpu[key], abs=1e-5), key
    assert M.bootstrap_ci("ece", z.cuda(), y.cuda(), n_resamples=50) == pytest.approx(
        M.bootstrap_ci("ece", z, y, n_resamples=50), abs=1e-5
    )


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------
def test_bad_inputs_raise_with_actionable_messages():
    z, y = _random(n=20, c=3)
    bad = z.clone()
    bad[3, 1] = float("nan")
    bad[7, 0] = float("inf")
    bad[9, 2] = float("-inf")
    for fn in (M.ece, M.nll, M.calibration_report):
        with pytest.raises(ValueError, match="NaN or Inf in 3 of 20 rows"):
            fn(bad, y)
    with pytest.raises(ValueError, match=r"2-D with shape \(N, C\)"):
        M.ece(z[0], y)
    with pytest.raises(ValueError, match=r"1-D with shape \(N,\)"):
        M.ece(z, y[:, None])
    with pytest.raises(ValueError, match="shape mismatch"):
        M.ece(z, y[:-1])
    with pytest.raises(ValueError, match="empty"):
        M.ece(z[:0], y[:0])
    with pytest.raises(ValueError, match="at least 2 classes"):
        M.ece(z[:, :1], torch.zeros(20, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        M.ece(z, torch.full((20,), 3))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        M.ece(z, torch.full((20,), -1))
    with pytest.raises(TypeError, match="integer class indices"):
        M.ece(z, y.double())
    with pytest.raises(TypeError, match="floating-point"):
        M.ece(z.long(), y)
    with pytest.raises(TypeError, match=r"torch\.Tensor or a numpy\.ndarray"):
        M.ece(z.tolist(), y)
    with pytest.raises(ValueError, match="n_bins must be >= 1"):
        M.ece(z, y, n_bins=0)
    with pytest.raises(ValueError, match="allowed values: width, mass"):
        M.ece(z, y, binning="quantile")
    with pytest.raises(ValueError, match="allowed values: l1, l2, max"):
        M.ece(z, y, norm="linf")


# ----------------------------------------------------------------------------------------------
# bootstrap
# ----------------------------------------------------------------------------------------------
def _overconfident(n=1500, c=5, seed=1):
    z, y = _refs.calibrated_logits(n, c, seed=seed)
    return torch.from_numpy(z * 3.0), torch.from_numpy(y)


def test_bootstrap_interval_contains_estimate_and_is_deterministic():
    z, y = _overconfident()
    for name in ("ece", "accuracy", "nll", "adaptive_ece"):
        point = {"ece": M.ece, "accuracy": M.accuracy, "nll": M.nll}.get(name, M.adaptive_ece)(z, y)
        lo, hi = M.bootstrap_ci(name, z, y, n_resamples=300, seed=5)
        assert lo < point < hi, name
        assert (lo, hi) == M.bootstrap_ci(name, z, y, n_resamples=300, seed=5)
        assert (lo, hi) != M.bootstrap_ci(name, z, y, n_resamples=300, seed=6)
    lo90, hi90 = M.bootstrap_ci("ece", z, y, n_resamples=300, level=0.9, seed=5)
    lo95, hi95 = M.bootstrap_ci("ece", z, y, n_resamples=300, level=0.95, seed=5)
    assert lo95 <= lo90 < hi90 <= hi95


def test_bootstrap_fast_path_equals_a_numpy_loop_on_the_same_indices():
    z, y = _random(n=120, c=4, scale=2.0)
    zn, yn = z.numpy(), y.numpy()
    idx = boot._bootstrap_indices(120, 40, seed=11)
    refs = {
        "ece": lambda a, b: _refs.ece(a, b),
        "mce": lambda a, b: _refs.ece(a, b, norm="max"),
        "ece_l2": lambda a, b: _refs.ece(a, b, norm="l2"),
        "adaptive_ece": lambda a, b: _refs.ece(a, b, binning="mass"),
        "debiased_ece": lambda a, b: math.sqrt(max(0.0, _refs.debiased_ece_sq(a, b))),
        "nll": _refs.nll,
        "brier": _refs.brier,
        "accuracy": lambda a, b: float(np.mean(_refs.top_label(a)[1] == b)),
        "mean_confidence": lambda a, b: float(np.mean(_refs.top_label(a)[0])),
        "classwise_ece": _refs.classwise_ece,
        "aurc": _refs.aurc,
        "excess_aurc": _refs.excess_aurc,
    }
    assert sorted(refs) == M.bootstrap_metric_names()
    for name, ref in refs.items():
        slow = np.array([ref(zn[i], yn[i]) for i in idx])
        want = tuple(np.quantile(slow, [0.025, 0.975]))
        got = M.bootstrap_ci(name, z, y, n_resamples=40, seed=11)
        assert got == pytest.approx(want, abs=1e-10), name


def test_bootstrap_callable_uses_the_same_resamples_as_the_named_path():
    z, y = _random(n=150, c=5)
    assert M.bootstrap_ci(M.ece, z, y, n_resamples=60, seed=2) == pytest.approx(
        M.bootstrap_ci("ece", z, y, n_resamples=60, seed=2), abs=1e-12
    )


def test_paired_bootstrap_diff():
    z, y = _overconfident()
    for name in ("ece", "nll", "adaptive_ece", M.brier):
        assert M.paired_bootstrap_diff(name, z, z.clone(), y, n_resamples=100) == (0.0, 0.0, 0.0)
    est, lo, hi = M.paired_bootstrap_diff("ece", z, z / 3.0, y, n_resamples=200, seed=4)
    assert est == pytest.approx(M.ece(z, y) - M.ece(z / 3.0, y), abs=1e-12)
    assert 0 < lo < est < hi  # the over-confident logits are clearly worse
    idx = boot._bootstrap_indices(z.shape[0], 200, seed=4)
    slow = np.array([M.ece(z[i], y[i]) - M.ece(z[i] / 3.0, y[i]) for i in idx])
    assert (lo, hi) == pytest.approx(tuple(np.quantile(slow, [0.025, 0.975])), abs=1e-10)
    with pytest.raises(ValueError, match="same shape"):
        M.paired_bootstrap_diff("ece", z, z[:, :3], y % 3)


def test_paired_bootstrap_contrast_is_a_difference_of_differences():
    z, y = _overconfident()
    quad = [z, z / 3.0, z / 2.0, z / 4.0]
    est, lo, hi = M.paired_bootstrap_contrast("ece", quad, [1, -1, -1, 1], y, n_resamples=150)
    by_hand = M.ece(z, y) - M.ece(z / 3.0, y) - M.ece(z / 2.0, y) + M.ece(z / 4.0, y)
    assert est == pytest.approx(by_hand, abs=1e-12)
    idx = boot._bootstrap_indices(z.shape[0], 150, seed=0)
    slow = np.array([sum(w * M.ece(q[i], y[i]) for w, q in zip([1, -1, -1, 1], quad)) for i in idx])
    assert (lo, hi) == pytest.approx(tuple(np.quantile(slow, [0.025, 0.975])), abs=1e-10)
    # the same model on both sides of a difference cancels exactly, resample by resample
    assert M.paired_bootstrap_contrast("nll", [z, z, z, z], [1, -1, -1, 1], y) == (0.0, 0.0, 0.0)
    # a two-term contrast is the paired difference
    assert M.paired_bootstrap_contrast(
        "accuracy", [z, z / 3.0], [1, -1], y, n_resamples=80, seed=3
    ) == M.paired_bootstrap_diff("accuracy", z, z / 3.0, y, n_resamples=80, seed=3)
    with pytest.raises(ValueError, match="one weight per logits"):
        M.paired_bootstrap_contrast("ece", quad, [1, -1], y)
    with pytest.raises(ValueError, match="same shape"):
        M.paired_bootstrap_contrast("ece", [z, z[:, :3]], [1, -1], y % 3)


def test_bootstrap_arguments_are_validated():
    z, y = _random(n=30, c=3)
    with pytest.raises(ValueError, match="Did you mean 'ece'"):
        M.bootstrap_ci("ecee", z, y)
    with pytest.raises(ValueError, match="level"):
        M.bootstrap_ci("ece", z, y, level=1.5)
    with pytest.raises(ValueError, match="n_resamples"):
        M.bootstrap_ci("ece", z, y, n_resamples=0)
    with pytest.raises(TypeError, match="name or a callable"):
        M.bootstrap_ci(3, z, y)


# ----------------------------------------------------------------------------------------------
# probabilities are refused, never silently read as logits
# ----------------------------------------------------------------------------------------------
def test_probabilities_are_refused_and_log_probabilities_equal_logits():
    from quantcal.calibration import recal

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(500, 10, generator=g) * 3
    labels = torch.randint(0, 10, (500,), generator=g)
    probs = logits.softmax(1)
    for fn in (M.ece, M.nll, M.calibration_report, M.accuracy):
        with pytest.raises(ValueError, match=r"look like probabilities.*log-probabilities"):
            fn(probs, labels)
    with pytest.raises(ValueError, match="look like probabilities"):
        recal.TemperatureScaling().fit(probs, labels)
    one_hot = torch.nn.functional.one_hot(labels, 10).float()
    with pytest.raises(ValueError, match="look like probabilities"):
        M.ece(one_hot, labels)
    assert M.ece(probs.log(), labels) == pytest.approx(M.ece(logits, labels), abs=1e-6)
    # logits in [0, 1] that do not sum to 1 are logits
    small = torch.rand(500, 10, generator=g)
    assert 0 <= M.ece(small, labels) <= 1


def test_plot_reliability_draws_labelled_bins():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 5, (400,), generator=g)
    logits = torch.randn(400, 5, generator=g) + 2.5 * torch.nn.functional.one_hot(labels, 5)
    ax = M.plot_reliability(logits * 3, labels)  # sharpened: over-confident
    rel = M.reliability(logits * 3, labels)
    assert ax.get_xlabel() == "confidence" and "accuracy" in ax.get_ylabel()
    names = [t.get_text() for t in ax.get_legend().get_texts()]
    assert {"accuracy", "over-confident gap", "share of images", "perfect calibration"} <= set(
        names
    )
    assert "ECE" in ax.get_title()
    # the grey accuracy bars are the non-empty bins' accuracies
    bars = [p for p in ax.patches if p.get_facecolor()[:3] == matplotlib.colors.to_rgb("0.75")]
    full = rel.count > 0
    np.testing.assert_allclose(sorted(b.get_height() for b in bars), sorted(rel.accuracy[full]))
    _, ax2 = plt.subplots()
    assert M.plot_reliability(logits / 3, labels, ax=ax2, legend=False) is ax2  # under-confident
    assert ax2.get_legend() is None
    under = [
        p for p in ax2.patches if p.get_facecolor()[:3] == matplotlib.colors.to_rgb("tab:blue")
    ]
    assert under
    plt.close("all")


# ----------------------------------------------------------------------------------------------
# smooth ECE (Błasiok & Nakkiran 2024)
# ----------------------------------------------------------------------------------------------
def _smece_reference(conf, correct, sigma):
    """Direct O(N·T) re-derivation: the reflected Gaussian kernel as an explicit sum of images
    ``φ(t − f − 2m) + φ(t + f − 2m)``, evaluated at every grid point for every sample, and
    ``Σ_k |Σ_i r_i K(t_k, f_i)| / Σ_k Σ_i K(t_k, f_i)`` on ``T = max(200, round(10/σ))`` points."""
    f = np.asarray(conf, dtype=np.float64)
    r = f - np.asarray(correct, dtype=np.float64)
    t = np.linspace(0.0, 1.0, max(200, round(10 / sigma)))[:, None]
    images = int(np.ceil(6 * sigma)) + 1  # every image within 12σ of [0, 1]
    k = np.zeros((t.shape[0], f.shape[0]))
    for m in range(-images, images + 1):
        k += np.exp(-0.5 * ((t - f - 2 * m) / sigma) ** 2)
        k += np.exp(-0.5 * ((t + f - 2 * m) / sigma) ** 2)
    return float(np.abs(k @ r).sum() / k.sum())


def _smece_data(n=300, seed=0):
    """Confidences with ties, exact 0 and 1, and outcomes that are neither all 0 nor all 1."""
    rng = np.random.default_rng(seed)
    f = rng.random(n) ** 0.3
    f[: n // 10] = 1.0
    f[n // 10 : n // 8] = 0.0
    f[n // 8 : n // 6] = 0.75
    y = (rng.random(n) < f**1.5).astype(np.float64)
    return f, y


@pytest.mark.parametrize("sigma", [1e-3, 0.004, 0.02, 0.05, 0.0731, 0.2, 0.7, 2.5, 5.0])
def test_smooth_ece_matches_a_direct_kernel_sum(sigma):
    f, y = _smece_data(n=60 if sigma < 0.01 else 300, seed=int(sigma * 1000))
    want = _smece_reference(f, y, sigma)
    assert M.smooth_ece_from_confidences(f, y, bandwidth=sigma) == pytest.approx(want, abs=1e-12)
    z, labels = _random(n=200, c=6, scale=2.0, seed=3)
    conf, pred = _refs.top_label(z.numpy())
    want = _smece_reference(conf, pred == labels.numpy(), sigma)
    assert M.smooth_ece(z, labels, bandwidth=sigma) == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("scale", [0.5, 2.0, 6.0])
def test_smooth_ece_bandwidth_is_the_bisected_fixed_point(scale):
    z, y = _random(n=400, c=5, scale=scale, seed=7)
    conf, pred = _refs.top_label(z.numpy())
    hit = (pred == y.numpy()).astype(np.float64)
    value, sigma = smece._SmoothEce(conf, conf - hit).search()
    step = 2.0**-10
    assert sigma / step == int(sigma / step) and 2 * step <= sigma <= 1.0
    # bisection invariants: smECE_σ ≤ σ at σ*, and one step below, σ < smECE_σ (or σ < 0.001)
    assert _smece_reference(conf, hit, sigma) <= sigma
    below = sigma - step
    assert below < 1e-3 or below < _smece_reference(conf, hit, below)
    assert value == pytest.approx(_smece_reference(conf, hit, sigma), abs=1e-12)
    assert M.smooth_ece(z, y) == M.smooth_ece(z, y, bandwidth=sigma)
    assert M.smooth_ece(z, y) == pytest.approx(value, abs=1e-14)  # softmax rounding differs


def test_smooth_ece_properties():
    for seed, scale in [(0, 0.3), (1, 2.0), (2, 8.0), (3, 40.0)]:
        z, y = _random(n=500, c=10, scale=scale, seed=seed)
        assert 0.0 <= M.smooth_ece(z, y) <= 1.0
        assert 0.0 <= M.smooth_ece(z, y, bandwidth=0.01) <= 1.0
    zc, yc = _refs.calibrated_logits(20000, 10, seed=4)  # top-label calibrated by construction
    assert M.smooth_ece(zc, yc) < 0.02
    assert M.smooth_ece(zc * 3.0, yc) > 0.1  # the same model made over-confident
    # sample order does not matter
    z, y = _random(n=700, c=4, scale=2.0, seed=5)
    perm = torch.randperm(700, generator=torch.Generator().manual_seed(0))
    assert M.smooth_ece(z[perm], y[perm]) == pytest.approx(M.smooth_ece(z, y), abs=1e-14)
    # numpy and torch inputs, and float64 numpy confidences, give the same value
    assert M.smooth_ece(z.numpy(), y.numpy()) == M.smooth_ece(z, y)
    conf, correct = row_pass.top_label(z, y)
    assert M.smooth_ece_from_confidences(conf, correct) == M.smooth_ece(z, y)
    assert M.smooth_ece_from_confidences(conf.numpy(), correct.numpy()) == M.smooth_ece(z, y)


def test_smooth_ece_at_confidence_zero_and_one():
    z, _ = _random(n=50, c=5, seed=6)
    z = z * 1000.0  # every softmax saturates: confidence exactly 1.0
    pred = z.argmax(1)
    conf, _ = row_pass.top_label(z, pred)
    assert (conf == 1.0).all()
    assert M.smooth_ece(z, (pred + 1) % 5) == 1.0  # always wrong at confidence 1
    assert M.smooth_ece(z, pred) == 0.0  # always right at confidence 1
    assert M.smooth_ece(z, (pred + 1) % 5, bandwidth=0.05) == 1.0
    # a mix at exactly 0 and 1 (the lower-level function takes any (probability, outcome) pairs)
    f = np.array([0.0, 0.0, 1.0, 1.0, 1.0, 0.5])
    y = np.array([0.0, 1.0, 1.0, 0.0, 1.0, 1.0])
    for sigma in (0.01, 0.1, 0.6):
        want = _smece_reference(f, y, sigma)
        assert M.smooth_ece_from_confidences(f, y, bandwidth=sigma) == pytest.approx(
            want, abs=1e-12
        )
    assert M.smooth_ece_from_confidences(np.zeros(5), np.zeros(5)) == 0.0
    assert M.smooth_ece_from_confidences(np.zeros(5), np.ones(5)) == 1.0


def test_smooth_ece_single_sample_and_one_class():
    z, y = _random(n=30, c=4, seed=8)
    conf, pred = _refs.top_label(z.numpy())
    for i in range(3):  # one sample: the smoothed residual is r everywhere, so smECE = |r|
        gap = abs(float(pred[i] == int(y[i])) - conf[i])
        assert M.smooth_ece(z[i : i + 1], y[i : i + 1]) == pytest.approx(gap, abs=1e-14)
        assert M.smooth_ece(z[i : i + 1], y[i : i + 1], bandwidth=0.003) == pytest.approx(
            gap, abs=1e-14
        )
    # one class (C = 1) is refused like every metric here; its confidence would be 1, always
    # right, which the lower-level function scores 0
    with pytest.raises(ValueError, match="at least 2 classes"):
        M.smooth_ece(z[:, :1], torch.zeros(30, dtype=torch.long))
    assert M.smooth_ece_from_confidences(np.ones(30), np.ones(30, dtype=bool)) == 0.0


def test_smooth_ece_bad_inputs():
    z, y = _random(n=20, c=3)
    bad = z.clone()
    bad[4, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf in 1 of 20 rows"):
        M.smooth_ece(bad, y)
    with pytest.raises(ValueError, match="look like probabilities"):
        M.smooth_ece(torch.softmax(z, 1), y)
    with pytest.raises(ValueError, match="empty"):
        M.smooth_ece(z[:0], y[:0])
    with pytest.raises(ValueError, match="shape mismatch"):
        M.smooth_ece(z, y[:-1])
    for bandwidth in (0.0, -0.1, float("nan"), float("inf"), 1e-5):
        with pytest.raises(ValueError, match=r"bandwidth must be a finite number >= 0\.0001"):
            M.smooth_ece(z, y, bandwidth=bandwidth)
    for bandwidth in ("0.1", True, [0.1]):
        with pytest.raises(TypeError, match="bandwidth must be a float or None"):
            M.smooth_ece(z, y, bandwidth=bandwidth)
    f = np.linspace(0.1, 0.9, 20)
    hit = np.ones(20)
    with pytest.raises(ValueError, match="NaN or Inf in 1 of 20"):
        M.smooth_ece_from_confidences(np.where(f == f[7], np.nan, f), hit)
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        M.smooth_ece_from_confidences(f * 2.0, hit)
    with pytest.raises(ValueError, match="only 0/1"):
        M.smooth_ece_from_confidences(f, hit * 2)
    with pytest.raises(ValueError, match="shape mismatch"):
        M.smooth_ece_from_confidences(f, hit[:-1])
    with pytest.raises(ValueError, match=r"1-D with shape \(N,\)"):
        M.smooth_ece_from_confidences(f[:, None], hit)
    with pytest.raises(ValueError, match="empty"):
        M.smooth_ece_from_confidences(f[:0], hit[:0])
    with pytest.raises(TypeError, match="floating-point"):
        M.smooth_ece_from_confidences(np.ones(20, dtype=np.int64), hit)
    with pytest.raises(TypeError, match=r"torch\.Tensor or a numpy\.ndarray"):
        M.smooth_ece_from_confidences(f.tolist(), hit)


def test_smooth_ece_in_the_report_and_the_bootstrap():
    z, y = _random(n=400, c=6, dtype=torch.float32, seed=9)
    rep = M.calibration_report(z, y)
    keys = list(rep)
    assert keys[keys.index("debiased_ece") + 1] == "smooth_ece"
    assert rep["smooth_ece"] == pytest.approx(M.smooth_ece(z, y), abs=1e-12)
    lo, hi = M.bootstrap_ci(M.smooth_ece, z, y, n_resamples=30, seed=1)
    assert lo < rep["smooth_ece"] < hi


# relplot (the authors' package, `pip install relplot`) is the peer. It bins the samples onto a
# grid of 1000+ points, cuts its kernel at ±1/2 with one reflection per side, and adds 1e-4 to
# the density; quantcal sums the kernel exactly. With relplot's grid refined and the 1e-4 taken
# out, the two agree to rounding; its default agrees to its discretization error.
def _relplot_cases():
    cases = {}
    for n in (50, 500, 5000):
        for scale in (0.5, 1.5, 3.0):
            g = torch.Generator().manual_seed(n + int(10 * scale))
            z = torch.randn(n, 10, generator=g, dtype=torch.float64) * scale
            cases[f"random n={n} scale={scale}"] = (z, torch.randint(0, 10, (n,), generator=g))
    zc, yc = _refs.calibrated_logits(2000, 5, seed=0)
    cases["calibrated"] = (torch.from_numpy(zc), torch.from_numpy(yc))
    z = torch.randn(300, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    cases["all correct"] = (z, z.argmax(1))
    cases["all wrong"] = (z, (z.argmax(1) + 1) % 6)
    return cases


_RELPLOT_CASES = _relplot_cases()


def _fine_relplot(monkeypatch):
    relplot = pytest.importorskip("relplot")
    rm = relplot.metrics
    if not all(hasattr(rm, name) for name in ("ReflectedGaussianKernel", "smooth_ece")):
        pytest.skip("relplot internals changed (needs metrics.ReflectedGaussianKernel)")

    class Fine(rm.ReflectedGaussianKernel):
        def apply(self, f, y, x_eval, eval_points=None):
            return super().apply(f, y, x_eval, eval_points=10001)  # 2e-4 grid, not 1e-3

        def smooth(self, f, y, x_eval, eps=1e-4):
            return super().smooth(f, y, x_eval, eps=1e-300)

    monkeypatch.setattr(rm, "ReflectedGaussianKernel", Fine)
    return relplot


@pytest.mark.parametrize("case", list(_RELPLOT_CASES))
def test_smooth_ece_matches_relplot_on_a_fine_grid(case, monkeypatch):
    relplot = _fine_relplot(monkeypatch)
    z, y = _RELPLOT_CASES[case]
    f, hit = relplot.multiclass_logits_to_confidences(z.numpy(), y.numpy())
    for sigma in (0.02, 0.05, 0.1):  # relplot's cut at ±1/2 is beyond 5σ
        want = relplot.smECE_sigma(f, hit, sigma)
        assert M.smooth_ece(z, y, bandwidth=sigma) == pytest.approx(want, abs=1e-6), sigma
    if case in ("calibrated", "random n=500 scale=0.5"):  # σ* < 0.1: the whole search agrees
        want, sigma = relplot.smECE(f, hit, return_width=True)
        assert smece._SmoothEce(f, f - hit).search()[1] == sigma
        assert M.smooth_ece(z, y) == pytest.approx(want, abs=1e-6)


@pytest.mark.parametrize("case", [c for c in _RELPLOT_CASES if "scale=3.0" not in c])
def test_smooth_ece_agrees_with_relplot_default(case):
    relplot = pytest.importorskip("relplot")
    z, y = _RELPLOT_CASES[case]
    f, hit = relplot.multiclass_logits_to_confidences(z.numpy(), y.numpy())
    want, sigma = relplot.smECE(f, hit, return_width=True)
    assert smece._SmoothEce(f, f - hit).search()[1] == sigma
    # relplot's 1e-3 grid and (at σ* ~ 0.3) its kernel cut: up to 3e-5 on these inputs
    assert M.smooth_ece(z, y) == pytest.approx(want, abs=1e-4)


def test_relplot_counts_confidence_one_at_half_weight_is_pinned():
    # relplot reflects its binned masses about the end grid points without doubling the mass
    # on them, so a sample at exactly 0 or 1 gets half the kernel mass of an interior one.
    # Saturated float32 softmax gives exactly 1.0 often (low-bit models: most samples).
    relplot = pytest.importorskip("relplot")
    f = np.array([1.0, 1.0, 0.6, 0.6])
    y = np.array([0.0, 0.0, 1.0, 1.0])
    ours = M.smooth_ece_from_confidences(f, y, bandwidth=0.02)
    theirs = relplot.smECE_sigma(f, y, 0.02)
    assert ours == pytest.approx(_smece_reference(f, y, 0.02), abs=1e-12)
    # groups 20σ apart: |residual| per group (1 and 0.4), weighted by the group's mass on the
    # grid of T = 500 points; the end point counts fully there, so the group at 1 weighs
    # 1 + Δ·φ_σ(0) (Euler-Maclaurin), where relplot gives it half of that
    w1 = 1 + (1 / 499) / (0.02 * math.sqrt(2 * math.pi))
    assert ours == pytest.approx((2 * w1 * 1.0 + 2 * 0.4) / (2 * w1 + 2), abs=1e-9)
    assert theirs == pytest.approx((w1 * 1.0 + 2 * 0.4) / (w1 + 2), abs=1e-4)
    assert ours - theirs > 0.1
