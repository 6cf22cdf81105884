"""Pins for quantcal.metrics found by mutation testing: chunked row passes, the default device,
argument checks and their messages, wrappers forwarding their options, bootstrap resampling
against numpy's generator, the named fast paths on tied / top-heavy data, smooth ECE input dtypes.

References are independent: ``_refs`` (numpy re-derivations), by-hand numbers, numpy's
``default_rng`` for the documented resample stream, brute force for the FFT length.
"""

from __future__ import annotations

import math
import re
import warnings

import numpy as np
import pytest
import torch

import _refs
from quantcal.calibration import metrics as M
from quantcal.calibration import rows as row_pass
from quantcal.calibration import smooth as smece


def _random(n=600, c=7, scale=3.0, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(n, c, generator=g, dtype=torch.float64) * scale).to(dtype)
    y = torch.randint(0, c, (n,), generator=g)
    return z, y


def _calibrated(n=600, c=5, seed=0):
    """Calibrated logits: per-bin gaps of both signs, so the bin count changes ECE (random
    labels are over-confident in every bin, and then ECE = mean conf − accuracy for any bins)."""
    z, y = _refs.calibrated_logits(n, c, seed=seed)
    return torch.from_numpy(z), torch.from_numpy(y)


# ----------------------------------------------------------------------------------------------
# row passes: chunks, dtypes, the default device
# ----------------------------------------------------------------------------------------------
def test_chunked_row_passes_match_the_reference_and_count_bad_rows_once():
    # 512 columns: rows come in chunks of 2**20 / 512 = 2048, so 4500 rows take three chunks,
    # the last one shorter.
    z, y = _random(n=4500, c=512, scale=3.0, seed=1)
    zn, yn = z.numpy(), y.numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no resized-output warning on the short last chunk
        assert M.ece(z, y) == pytest.approx(_refs.ece(zn, yn), abs=1e-12)
    assert M.nll(z, y) == pytest.approx(_refs.nll(zn, yn), abs=1e-12)
    p = _refs.softmax(zn)
    onehot = np.zeros_like(p)
    onehot[np.arange(zn.shape[0]), yn] = 1.0
    assert M.brier(z, y) == pytest.approx(np.mean(((p - onehot) ** 2).sum(axis=1)), abs=1e-12)
    assert M.classwise_ece(z, y) == pytest.approx(_refs.classwise_ece(zn, yn), abs=1e-12)
    bad = z.clone()
    bad[10, 3] = float("nan")  # first chunk
    bad[4499, 0] = float("inf")  # last chunk
    for fn in (M.ece, M.nll, M.calibration_report):
        with pytest.raises(ValueError, match="NaN or Inf in 2 of 4500 rows"):
            fn(bad, y)


def test_row_passes_return_the_documented_dtypes():
    z, y = _random(n=50, c=4, dtype=torch.float16)
    conf, correct = row_pass.top_label(z, y)
    assert conf.dtype == torch.float32 and correct.dtype == torch.bool
    rows = row_pass.softmax_rows(z.double(), y, 6)
    assert rows.conf.dtype == torch.float64 and rows.correct.dtype == torch.bool
    assert rows.nll.dtype == rows.brier.dtype == torch.float64
    assert rows.classwise.shape == (3, 4 * 6) and rows.classwise.dtype == torch.float64


def test_results_do_not_depend_on_the_default_device():
    # CPU inputs give CPU work and the same numbers whatever torch.set_default_device says
    # (a notebook that sets "cuda" and scores CPU tensors); "meta" makes any stray allocation
    # on the default device fail loudly.
    z, y = _random(n=300, c=5, scale=2.0, dtype=torch.float32)
    fns = {
        "report": lambda: M.calibration_report(z, y),
        "adaptive": lambda: M.bootstrap_ci("adaptive_ece", z, y, n_resamples=20),
        "ece": lambda: M.bootstrap_ci("ece", z, y, n_resamples=20),
        "smooth": lambda: M.smooth_ece(z, y, bandwidth=0.05),
        "classwise": lambda: M.classwise_ece(z, y),
    }
    want = {k: f() for k, f in fns.items()}
    torch.set_default_device("meta")
    try:
        got = {k: f() for k, f in fns.items()}
    finally:
        torch.set_default_device(None)
    assert got == want


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.int16])
def test_any_integer_label_dtype_gives_the_same_metrics(dtype):
    z, y = _calibrated(n=200, c=5, seed=2)
    want = M.calibration_report(z, y)
    assert M.calibration_report(z, y.to(dtype)) == want
    assert M.classwise_ece(z, y.to(dtype)) == want["classwise_ece"]
    assert M.nll(z.numpy(), y.numpy().astype(np.int32)) == want["nll"]


# ----------------------------------------------------------------------------------------------
# argument checks and their messages
# ----------------------------------------------------------------------------------------------
def test_input_messages_name_the_argument_and_the_problem():
    z, y = _random(n=20, c=3)
    kind = r" must be a torch\.Tensor or a numpy\.ndarray, got list"
    with pytest.raises(TypeError, match="^logits" + kind):
        M.ece(z.tolist(), y)
    with pytest.raises(TypeError, match="^labels" + kind):
        M.ece(z, y.tolist())
    with pytest.raises(TypeError, match=r"integer class indices, got dtype torch\.bool"):
        M.ece(z, y > 0)
    with pytest.raises(ValueError, match=r"^logits is empty \(N = 0\): metrics need"):
        M.ece(z[:0], y[:0])
    with pytest.raises(ValueError, match="logits has N = 20 rows but labels has 19 entries"):
        M.ece(z, y[:-1])
    bad = y.clone()
    bad[2], bad[5] = 3, 5
    with pytest.raises(ValueError, match=r"; 2 label\(s\) do not \(min 0, max 5\)"):
        M.ece(z, bad)
    for n_bins in (2.5, True, "15"):
        with pytest.raises(TypeError, match=r"^n_bins must be an int >= 1, got"):
            M.ece(z, y, n_bins=n_bins)
    for fn in (M.ece, M.debiased_ece_sq):
        with pytest.raises(ValueError, match=r"^unknown binning 'quantile'; allowed values"):
            fn(z, y, binning="quantile")
    with pytest.raises(ValueError, match=r"^unknown norm 'linf'; allowed values"):
        M.ece(z, y, norm="linf")


def test_two_classes_are_enough():
    # a binary problem as the two columns [0, s]
    g = torch.Generator().manual_seed(4)
    s = torch.randn(300, generator=g, dtype=torch.float64) * 2
    z = torch.stack([torch.zeros_like(s), s], dim=1)
    y = (torch.rand(300, generator=g) < torch.sigmoid(s)).long()
    assert M.ece(z, y, n_bins=10) == pytest.approx(_refs.ece(z.numpy(), y.numpy(), 10), abs=1e-12)


def test_probability_refusal_message_and_what_is_not_refused():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(40, 4, generator=g), 1)
    y = torch.randint(0, 4, (40,), generator=g)
    message = (
        "these look like probabilities (every row lies in [0, 1] and sums to 1), but "
        "metrics and recalibrators take logits: softmax applied to probabilities is not the "
        "model's confidence. Pass the logits, or log-probabilities (probs.log(), which have "
        "the same softmax); if the model ends with a softmax, take the layer before it."
    )
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        M.ece(probs, y)
    # only the first 1024 rows are read: probabilities there are refused whatever follows
    head = torch.softmax(torch.randn(1024, 4, generator=g), 1)
    with pytest.raises(ValueError, match="look like probabilities"):
        M.ece(torch.cat([head, torch.tensor([[5.0, -3.0, 0.0, 1.0]])]), torch.zeros(1025).long())
    # rows in [0, 1] that do not sum to 1, and rows summing to 1 outside [0, 1], are logits
    above_one = torch.tensor([[1.00005, 0.0]] * 40)  # sums to 1 within 1e-4, an entry above 1
    assert M.accuracy(above_one, torch.zeros(40).long()) == 1.0
    half = torch.full((40, 2), 0.25)  # sums 0.5
    acc = float((y % 2 == 0).double().mean())  # the tie predicts class 0
    assert M.ece(half, y % 2, n_bins=4) == pytest.approx(abs(0.5 - acc), abs=1e-12)
    outside = torch.tensor([[2.0, -1.0]] * 40)  # sums to 1, not in [0, 1]
    conf = 1.0 / (1.0 + math.exp(-3.0))
    assert M.ece(outside, torch.zeros(40).long()) == pytest.approx(1.0 - conf, abs=1e-6)


def test_bootstrap_argument_checks():
    z, y = _random(n=30, c=3)
    for n_resamples in (10.0, True):
        with pytest.raises(TypeError, match=r"^n_resamples must be an int >= 1, got"):
            M.bootstrap_ci("ece", z, y, n_resamples=n_resamples)
    for level in (0.0, 1.0):
        with pytest.raises(ValueError, match="level must lie strictly between 0 and 1"):
            M.bootstrap_ci("ece", z, y, level=level)
    with pytest.raises(ValueError, match=r"^unknown metric 'ecee'\. Did you mean 'ece'"):
        M.bootstrap_ci("ecee", z, y)
    # one resample is allowed: both ends are that resample's value
    idx = np.random.default_rng(7).integers(0, 30, size=(1, 30))[0]
    want = float(np.mean(_refs.top_label(z.numpy()[idx])[1] == y.numpy()[idx]))
    assert M.bootstrap_ci("accuracy", z, y, n_resamples=1, seed=7) == (
        pytest.approx(want, abs=1e-15),
        pytest.approx(want, abs=1e-15),
    )
    with pytest.raises(ValueError, match=r"got 3 logits and 2 weights$"):
        M.paired_bootstrap_contrast("ece", [z, z, z], [1.0, -1.0], y)
    with pytest.raises(ValueError, match=r"logits\[0\] is \(30, 3\), logits\[1\] is \(30, 2\)\.$"):
        M.paired_bootstrap_contrast("ece", [z, z[:, :2], z], [1.0, -1.0, 1.0], y % 2)
    with pytest.raises(ValueError, match=r"logits\[0\] is \(30, 3\), logits\[2\] is \(30, 2\)\.$"):
        M.paired_bootstrap_contrast("ece", [z, z, z[:, :2]], [1.0, -1.0, 1.0], y % 2)


# ----------------------------------------------------------------------------------------------
# wrappers forward every option; defaults are the documented ones
# ----------------------------------------------------------------------------------------------
def test_wrappers_forward_bins_binning_and_norm():
    z, y = _calibrated(n=800, c=5, seed=3)
    zn, yn = z.numpy(), y.numpy()
    for norm in M.NORMS:
        want = _refs.ece(zn, yn, n_bins=7, norm=norm, binning="mass")
        assert M.adaptive_ece(z, y, n_bins=7, norm=norm) == pytest.approx(want, abs=1e-12)
    assert M.adaptive_ece(z, y) == pytest.approx(_refs.ece(zn, yn, binning="mass"), abs=1e-12)
    assert M.adaptive_ece(z, y) != pytest.approx(_refs.ece(zn, yn, 16, binning="mass"), abs=1e-6)
    want = _refs.ece(zn, yn, n_bins=9, norm="max", binning="mass")
    assert M.mce(z, y, n_bins=9, binning="mass") == pytest.approx(want, abs=1e-12)
    conf, pred = _refs.top_label(zn)
    hit = (pred == yn).astype(np.float64)
    sq = _refs.debiased_sq_of_bins(conf, hit, _refs.mass_bins(conf, 6), 6)
    assert M.debiased_ece_sq(z, y, n_bins=6, binning="mass") == pytest.approx(sq, abs=1e-12)
    assert M.debiased_ece(z, y, n_bins=6, binning="mass") == pytest.approx(
        math.sqrt(max(0.0, sq)), abs=1e-12
    )
    assert M.classwise_ece(z, y) == pytest.approx(_refs.classwise_ece(zn, yn, 15), abs=1e-12)
    rep = M.calibration_report(z, y)
    assert rep["ece"] == pytest.approx(_refs.ece(zn, yn, 15), abs=1e-12)
    assert rep["ece"] != pytest.approx(_refs.ece(zn, yn, 16), abs=1e-6)
    assert rep["classwise_ece"] == pytest.approx(_refs.classwise_ece(zn, yn, 15), abs=1e-12)


def test_debiased_bin_of_two_samples_uses_n_minus_one():
    # two samples at confidence 0.6 in one bin, one right and one wrong: acc 1/2 and
    # (acc − conf)² − acc(1 − acc)/(2 − 1) = 0.01 − 0.25; weight 2/3 (the third is alone).
    z = torch.from_numpy(_refs.rows_at_confidence(np.array([0.6, 0.6, 0.95]), 3))
    y = torch.tensor([0, 1, 0])
    want = 2 / 3 * ((0.5 - 0.6) ** 2 - 0.25)
    assert M.debiased_ece_sq(z, y, n_bins=10) == pytest.approx(want, abs=1e-12)
    assert want == pytest.approx(_refs.debiased_ece_sq(z.numpy(), y.numpy(), 10), abs=1e-12)


def _resampled(n, n_resamples, seed):
    """The documented stream: one default_rng(seed), integers in [0, n), row after row."""
    return np.random.default_rng(seed).integers(0, n, size=(n_resamples, n), dtype=np.int64)


def test_bootstrap_resamples_are_numpys_stream_across_blocks():
    # 5000 rows: a block holds 2**22 // 5000 = 838 resamples, so 900 take two blocks
    z, y = _calibrated(n=5000, c=3, seed=4)
    idx = _resampled(5000, 900, seed=3)
    pred = _refs.top_label(z.numpy())[1]
    hits = (pred == y.numpy()).astype(np.float64)
    want = tuple(np.quantile(hits[idx].mean(axis=1), [0.025, 0.975]))
    assert M.bootstrap_ci("accuracy", z, y, n_resamples=900, seed=3) == pytest.approx(
        want, abs=1e-15
    )


def test_bootstrap_defaults_are_1000_resamples_seed_0_level_95():
    z, y = _calibrated(n=150, c=4, seed=5)
    conf = _refs.top_label(z.numpy())[0]
    idx = _resampled(150, 1000, seed=0)
    reps = conf[idx].mean(axis=1)
    want = tuple(np.quantile(reps, [0.025, 0.975]))
    assert M.bootstrap_ci("mean_confidence", z, y) == pytest.approx(want, abs=1e-12)
    z2 = z * 1.7
    conf2 = _refs.top_label(z2.numpy())[0]
    diff = reps - conf2[idx].mean(axis=1)
    est = conf.mean() - conf2.mean()
    lo, hi = np.quantile(diff, [0.025, 0.975])
    want3 = tuple(pytest.approx(v, abs=1e-12) for v in (est, lo, hi))
    assert M.paired_bootstrap_diff("mean_confidence", z, z2, y) == want3
    assert M.paired_bootstrap_contrast("mean_confidence", [z, z2], [1.0, -1.0], y) == want3


def test_paired_diff_forwards_level_and_bins():
    z, y = _calibrated(n=300, c=4, seed=6)
    z2 = z * 2.0
    zn, z2n, yn = z.numpy(), z2.numpy(), y.numpy()
    idx = _resampled(300, 60, seed=2)
    slow = np.array([_refs.ece(zn[i], yn[i], 6) - _refs.ece(z2n[i], yn[i], 6) for i in idx])
    est = _refs.ece(zn, yn, 6) - _refs.ece(z2n, yn, 6)
    lo, hi = np.quantile(slow, [0.2, 0.8])
    got = M.paired_bootstrap_diff("ece", z, z2, y, n_resamples=60, seed=2, level=0.6, n_bins=6)
    assert got == (
        pytest.approx(est, abs=1e-12),
        pytest.approx(lo, abs=1e-12),
        pytest.approx(hi, abs=1e-12),
    )


def test_bootstrap_classwise_uses_the_requested_bins():
    z, y = _calibrated(n=100, c=3, seed=7)
    zn, yn = z.numpy(), y.numpy()
    idx = _resampled(100, 25, seed=1)
    slow = np.array([_refs.classwise_ece(zn[i], yn[i], 4) for i in idx])
    want = tuple(np.quantile(slow, [0.025, 0.975]))
    got = M.bootstrap_ci("classwise_ece", z, y, n_resamples=25, seed=1, n_bins=4)
    assert got == pytest.approx(want, abs=1e-12)


# ----------------------------------------------------------------------------------------------
# named fast paths on data that leaves the top bins empty and ties heavily
# ----------------------------------------------------------------------------------------------
def _tied_and_top_heavy(n=400, seed=8):
    """Four logit patterns (so confidences tie exactly) and 40 % saturated rows at conf 1.0:
    the saturated group sits at mid-rank 0.8 N, leaving the top equal-mass bins empty."""
    rng = np.random.default_rng(seed)
    patterns = np.array(
        [[0.0, 0.0, 0.0, 0.0], [0.5, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0]]
    )
    z = patterns[rng.integers(0, 4, n)]
    z[: int(0.4 * n)] = [0.0, -200.0, -200.0, -200.0]
    y = np.where(rng.random(n) < 0.6, 0, rng.integers(1, 4, n))
    return torch.from_numpy(z), torch.from_numpy(y)


def test_bootstrap_fast_paths_on_ties_and_empty_top_bins():
    z, y = _tied_and_top_heavy()
    zn, yn = z.numpy(), y.numpy()
    idx = _resampled(400, 30, seed=9)
    slow = np.array([_refs.ece(zn[i], yn[i], binning="mass") for i in idx])
    got = M.bootstrap_ci("adaptive_ece", z, y, n_resamples=30, seed=9)
    assert got == pytest.approx(tuple(np.quantile(slow, [0.025, 0.975])), abs=1e-12)
    # low confidences only: the top width bins are empty in every resample
    z, y = _calibrated(n=200, c=6, seed=10)
    z = z * 0.3
    assert _refs.top_label(z.numpy())[0].max() < 13 / 15
    zn, yn = z.numpy(), y.numpy()
    idx = _resampled(200, 30, seed=9)
    refs = {
        "ece": lambda a, b: _refs.ece(a, b),
        "mce": lambda a, b: _refs.ece(a, b, norm="max"),
        "debiased_ece": lambda a, b: math.sqrt(max(0.0, _refs.debiased_ece_sq(a, b))),
    }
    for name, ref in refs.items():
        slow = np.array([ref(zn[i], yn[i]) for i in idx])
        got = M.bootstrap_ci(name, z, y, n_resamples=30, seed=9)
        assert got == pytest.approx(tuple(np.quantile(slow, [0.025, 0.975])), abs=1e-12), name


# ----------------------------------------------------------------------------------------------
# reliability diagram
# ----------------------------------------------------------------------------------------------
def test_reliability_with_empty_bins_warns_nothing():
    z, y = _calibrated(n=100, c=5, seed=11)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rel = M.reliability(z, y, n_bins=40)
    assert (rel.count == 0).any() and np.isnan(rel.accuracy[rel.count == 0]).all()


def test_plot_reliability_title_and_bars_use_the_requested_bins():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    z, y = _calibrated(n=500, c=5, seed=12)
    z = z * 2.5  # over-confident: ECE of several percent
    zn, yn = z.numpy(), y.numpy()
    ax = M.plot_reliability(z, y, n_bins=8)
    assert ax.get_title() == f"ECE {100 * _refs.ece(zn, yn, 8):.2f} %"
    assert ax.get_title() != f"ECE {100 * _refs.ece(zn, yn, 15):.2f} %"
    conf = _refs.top_label(zn)[0]
    nonempty = np.unique(_refs.width_bins(conf, 8)).size
    bars = [p for p in ax.patches if p.get_facecolor()[:3] == matplotlib.colors.to_rgb("0.75")]
    assert len(bars) == nonempty
    np.testing.assert_allclose(sorted(b.get_width() for b in bars), [1 / 8] * nonempty)
    plt.close("all")


# ----------------------------------------------------------------------------------------------
# smooth ECE: input dtypes, messages, the smallest bandwidth, the FFT length
# ----------------------------------------------------------------------------------------------
def _tie_logits32():
    """float32 logits whose confidences are exactly 1/k in float32 (k tied maxima, the rest
    at −60 which vanishes next to 1): conf 1/3 is 0.33333334f, not 1/3."""
    ks = [1, 2, 3, 5, 6, 7, 3, 2, 1, 5]
    z = torch.tensor([[0.0] * k + [-60.0] * (8 - k) for k in ks], dtype=torch.float32)
    conf = np.array([np.float32(1.0) / np.float32(k) for k in ks], dtype=np.float64)
    return z, torch.tensor([0, 1, 0, 0, 2, 0, 1, 0, 3, 4]), conf


def test_smooth_ece_computes_in_float64_from_low_precision_inputs():
    z, y, conf = _tie_logits32()
    hit = np.array([1, 0, 1, 1, 0, 1, 0, 1, 0, 0], dtype=np.float64)  # first index of the ties
    want = _smece_ref(conf, hit, 0.05)
    assert M.smooth_ece(z, y, bandwidth=0.05) == pytest.approx(want, abs=1e-13)
    conf32 = torch.from_numpy(conf).float()
    got = M.smooth_ece_from_confidences(conf32, torch.from_numpy(hit).bool(), bandwidth=0.05)
    assert got == pytest.approx(want, abs=1e-13)
    got = M.smooth_ece_from_confidences(conf32.bfloat16(), torch.from_numpy(hit).bfloat16())
    want = M.smooth_ece_from_confidences(conf32.bfloat16().double().numpy(), hit)
    assert got == want


def _smece_ref(f, correct, sigma):
    r = f - correct
    t = np.linspace(0.0, 1.0, max(200, round(10 / sigma)))[:, None]
    k = np.zeros((t.shape[0], f.shape[0]))
    images = int(np.ceil(6 * sigma)) + 1
    for m in range(-images, images + 1):
        k += np.exp(-0.5 * ((t - f - 2 * m) / sigma) ** 2)
        k += np.exp(-0.5 * ((t + f - 2 * m) / sigma) ** 2)
    return float(np.abs(k @ r).sum() / k.sum())


def test_smooth_ece_smallest_bandwidth_is_accepted():
    f = np.array([0.1, 0.35, 0.35, 0.8, 0.99, 1.0])
    hit = np.array([0.0, 1.0, 0.0, 1.0, 1.0, 0.0])
    got = M.smooth_ece_from_confidences(f, hit, bandwidth=1e-4)
    assert got == pytest.approx(_smece_ref(f, hit, 1e-4), abs=1e-12)


def test_smooth_ece_input_messages():
    f = np.linspace(0.1, 0.9, 10)
    hit = np.ones(10)
    with pytest.raises(TypeError, match=r"^confidence must be a torch\.Tensor or a numpy"):
        M.smooth_ece_from_confidences(f.tolist(), hit)
    with pytest.raises(TypeError, match=r"^correct must be a torch\.Tensor or a numpy"):
        M.smooth_ece_from_confidences(f, hit.tolist())
    with pytest.raises(ValueError, match=r"^confidence is empty \(N = 0\): metrics need"):
        M.smooth_ece_from_confidences(f[:0], hit[:0])
    with pytest.raises(TypeError, match=r"^correct must be boolean or 0/1, got dtype torch\.c"):
        M.smooth_ece_from_confidences(f, hit.astype(np.complex64))
    only = r"^correct must hold only 0/1 \(or False/True\) values\.$"
    with pytest.raises(ValueError, match=only):
        M.smooth_ece_from_confidences(f, hit * 0.5)


def test_fast_fft_len_is_the_smallest_5_smooth_length():
    def smooth(m):
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        return m == 1

    want, nxt = [], 1
    for n in range(1, 3001):
        while nxt < n or not smooth(nxt):
            nxt += 1
        want.append(nxt)
    assert [smece._fast_fft_len(n) for n in range(1, 3001)] == want
    assert smece._fast_fft_len(2**14 + 1) == min(
        m for m in range(2**14 + 1, 2**15 + 1) if smooth(m)
    )


def test_smooth_ece_where_the_residual_changes_sign_at_confidence_one():
    # one wrong sample at confidence 1 (residual +1) and 40 right ones at c < 1 (residual
    # c − 1), with c chosen so the unreflected residual Σ r_i φ((p − f_i)/σ) is 0 exactly at
    # p = 1: its values just below and just above 1 then have opposite signs, and the image
    # just beyond 1 must fold onto the grid point just below 1 before taking |·|.
    sigma, m = 0.05, 40

    def unreflected_at_one(c):
        return 1.0 + m * (c - 1.0) * math.exp(-0.5 * ((1.0 - c) / sigma) ** 2)

    lo, hi = 1.0 - 0.9 * sigma, 1.0 - 0.05 * sigma  # values of opposite sign
    assert unreflected_at_one(lo) * unreflected_at_one(hi) < 0
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        if unreflected_at_one(mid) * unreflected_at_one(lo) > 0:
            lo = mid
        else:
            hi = mid
    f = np.array([1.0] + [lo] * m)
    hit = np.array([0.0] + [1.0] * m)
    got = M.smooth_ece_from_confidences(f, hit, bandwidth=sigma)
    assert got == pytest.approx(_smece_ref(f, hit, sigma), abs=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_inputs_mixed_with_cpu_ones():
    z, y = _calibrated(n=300, c=5, seed=13)
    zc = z.cuda()
    assert M.ece(zc, y) == pytest.approx(M.ece(z, y), abs=1e-12)  # labels follow the logits
    assert M.smooth_ece(zc, y.cuda()) == pytest.approx(M.smooth_ece(z, y), abs=1e-12)
    conf, correct = row_pass.top_label(zc, y.cuda())
    assert M.smooth_ece_from_confidences(conf, correct) == pytest.approx(
        M.smooth_ece_from_confidences(conf.cpu(), correct.cpu()), abs=1e-12
    )
    got = M.paired_bootstrap_diff("ece", z, zc * 2, y, n_resamples=20)
    assert got == pytest.approx(M.paired_bootstrap_diff("ece", z, z * 2, y, n_resamples=20))
