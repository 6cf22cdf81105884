"""diagnose: gap decomposition, flips by fp32 confidence, histograms, NLL(T), vs hand counts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from quantcal.calibration import diagnose


def _logits_with(conf: list[float], pred: list[int], c: int = 3) -> torch.Tensor:
    """Logits whose softmax has top-label confidence ``conf[i]`` on class ``pred[i]`` and the
    rest spread evenly."""
    rows = []
    for p, k in zip(conf, pred):
        rest = (1 - p) / (c - 1)
        probs = [rest] * c
        probs[k] = p
        rows.append([math.log(q) for q in probs])
    return torch.tensor(rows, dtype=torch.float64)


def test_gap_decomposition_is_exact_and_matches_hand_numbers():
    labels = torch.tensor([0, 1, 2, 0])
    fp = _logits_with([0.9, 0.7, 0.5, 0.95], [0, 1, 2, 1])  # 3 of 4 right
    q = _logits_with([0.9, 0.8, 0.6, 0.95], [1, 1, 0, 1])  # 1 of 4 right
    g = diagnose.gap_decomposition(fp, q, labels)
    assert g["accuracy_fp32"] == pytest.approx(0.75) and g["accuracy_q"] == pytest.approx(0.25)
    assert g["confidence_fp32"] == pytest.approx((0.9 + 0.7 + 0.5 + 0.95) / 4)
    assert g["confidence_q"] == pytest.approx((0.9 + 0.8 + 0.6 + 0.95) / 4)
    assert g["gap_q"] - g["gap_fp32"] == pytest.approx(g["accuracy_term"] + g["confidence_term"])
    assert g["accuracy_term"] == pytest.approx(0.5)


def test_flips_by_confidence_counts_each_group_and_the_closed_last_edge():
    labels = torch.tensor([0, 0, 0, 0, 0])
    # fp32 confidences 0.1-ish is impossible with 3 classes; use 0.35, 0.5, 0.8 (edge), 1.0-ish
    fp = _logits_with([0.35, 0.5, 0.8, 0.999999, 0.65], [0, 1, 0, 0, 0])
    q = _logits_with([0.4, 0.5, 0.9, 0.9, 0.7], [1, 0, 0, 2, 0])
    groups = diagnose.flips_by_confidence(fp, q, labels)
    by = {(g["lo"], g["hi"]): g for g in groups}
    assert sum(g["n"] for g in groups) == 5
    assert by[(0.2, 0.4)]["n"] == 1 and by[(0.2, 0.4)]["right_to_wrong"] == 1.0
    assert by[(0.4, 0.6)]["n"] == 1 and by[(0.4, 0.6)]["wrong_to_right"] == 1.0
    assert by[(0.6, 0.8)]["n"] == 1 and by[(0.6, 0.8)]["flipped"] == 0.0
    # 0.8 exactly opens the last group; ~1.0 is in it too (closed on the right)
    assert by[(0.8, 1.0)]["n"] == 2 and by[(0.8, 1.0)]["flipped"] == 0.5
    assert math.isnan(by[(0.0, 0.2)]["flipped"]) and by[(0.0, 0.2)]["share"] == 0.0


def test_histogram_and_nll_against_numpy():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(200, 5, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, 5, (200,), generator=g)
    p = np.exp(z.numpy() - z.numpy().max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    conf = p.max(1)
    ref = np.bincount(np.minimum((conf * 20).astype(int), 19), minlength=20)
    assert diagnose.confidence_histogram(z) == ref.tolist()
    for t, got in zip((0.5, 1.0, 3.0), diagnose.nll_vs_temperature(z, y, (0.5, 1.0, 3.0))):
        zt = z.numpy() / t
        lse = np.log(np.exp(zt - zt.max(1, keepdims=True)).sum(1)) + zt.max(1)
        assert got == pytest.approx(float(np.mean(lse - zt[np.arange(200), y.numpy()])), rel=1e-12)


def test_diagnose_finds_the_temperature_of_scaled_logits_and_rejects_bad_input():
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 10, (4000,), generator=g)
    z = torch.randn(4000, 10, generator=g, dtype=torch.float64)
    z[torch.arange(4000), y] += 2.0
    t0 = diagnose.diagnose(z, z, y, z, y)["t_star"]
    d = diagnose.diagnose(z, z * 3, y, z * 3, y)  # the same logits 3x sharper: T* 3x larger
    step = 400 ** (1 / 60)  # the grid's ratio
    assert 3 * t0 / step <= d["t_star"] <= 3 * t0 * step and d["nll_rise_at_1.5x"] > 0
    assert d["fit_split"] == "val" and len(d["nll"]) == len(d["temperatures"])
    with pytest.raises(ValueError, match="same N"):
        diagnose.gap_decomposition(z, z[:10], y)
    with pytest.raises(ValueError, match="empty"):
        diagnose.flips_by_confidence(z[:0], z[:0], y[:0])
    with pytest.raises(ValueError, match="> 0"):
        diagnose.nll_vs_temperature(z, y, (0.0,))
