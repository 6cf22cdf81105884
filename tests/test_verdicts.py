"""Verdicts at each budget boundary, seed aggregation, and claims over two seeds."""

from __future__ import annotations

import math
from statistics import NormalDist

import pytest

from _results import hand_row
from quantcal.findings import claims
from quantcal.findings.rows import aggregate
from quantcal.findings.verdicts import Budget, verdicts

_row = hand_row  # seed=, ece_hi= ... by keyword


def _fp32(acc=0.80, ece=0.05, ts=0.02):
    return [_row("fp32", "none", acc, ece), _row("fp32", "temperature", acc, ts)]


#: These tests are about the relative budgets (vs fp32): the absolute ``max_ece`` (default 5 %,
#: which these fp32 models sit at) is lifted here and tested in test_verdicts_trust.py.
_RELATIVE = Budget(max_ece=1.0)


def _one(rows, budget=_RELATIVE):
    (v,) = verdicts(rows, budget)
    return v


@pytest.mark.parametrize(
    ("acc", "outcome"),
    [
        (0.80 - 0.0099, "safe as is"),  # just inside the 1-point accuracy budget
        (0.80 - 0.0101, "not safe: accuracy lost"),  # just outside
    ],
)
def test_accuracy_budget_boundary(acc, outcome):
    rows = [*_fp32(), _row("W8A8", "none", acc, 0.05), _row("W8A8", "temperature", acc, 0.02)]
    assert _one(rows).outcome == outcome


@pytest.mark.parametrize(
    ("ece", "outcome"),
    [
        (0.05 + 0.0099, "safe as is"),  # raw ECE within fp32 raw + 1 point
        (0.05 + 0.0101, "safe after recalibration"),  # just over: TS repairs it
    ],
)
def test_raw_ece_budget_boundary(ece, outcome):
    rows = [*_fp32(), _row("W8A8", "none", 0.8, ece), _row("W8A8", "temperature", 0.8, 0.025)]
    v = _one(rows)
    assert v.outcome == outcome
    if outcome == "safe after recalibration":
        assert (v.recal, v.recal_fit) == ("temperature", "val")
        assert "temperature (fitted on val)" in v.reason


@pytest.mark.parametrize(
    ("best", "outcome"),
    [
        (0.02 + 0.0099, "safe after recalibration"),  # within fp32's best (TS 2 %) + 1 point
        (0.02 + 0.0101, "not safe: confidence cannot be repaired"),
    ],
)
def test_repair_budget_boundary_against_fp32s_best(best, outcome):
    rows = [
        *_fp32(),
        _row("W4A4", "none", 0.80, 0.20),
        _row("W4A4", "temperature", 0.80, best + 0.01),
        _row("W4A4", "isotonic", 0.80, best),  # the best recalibrator is the one named
    ]
    v = _one(rows)
    assert v.outcome == outcome
    assert v.recal == "isotonic" and v.best_ece.value == pytest.approx(best)
    assert v.fp32_best_ece.value == pytest.approx(0.02)


def test_a_recalibrator_that_costs_accuracy_does_not_repair():
    rows = [
        *_fp32(),
        _row("W4A4", "none", 0.80, 0.20),
        _row("W4A4", "isotonic", 0.70, 0.02),  # calibrated, but 10 points less accurate
    ]
    assert _one(rows).outcome == "not safe: confidence cannot be repaired"


def test_no_recalibrator_measured_and_a_custom_budget():
    rows = [*_fp32(), _row("W4A8", "none", 0.78, 0.09)]
    assert _one(rows).outcome == "not safe: accuracy lost"
    v = _one(rows, Budget(max_accuracy_drop=0.05, max_ece_rise=0.05, max_ece=1.0))
    assert v.outcome == "safe as is"
    v = _one(rows, Budget(max_accuracy_drop=0.05, max_ece_rise=0.01, max_ece=1.0))
    assert v.outcome == "not safe: confidence cannot be repaired"
    assert "no recalibrator was measured" in v.reason
    with pytest.raises(ValueError, match="max_ece_rise must be a fraction"):
        Budget(max_ece_rise=-0.01)
    with pytest.raises(ValueError, match="max_accuracy_drop"):
        Budget(max_accuracy_drop=2)


def test_borderline_when_the_interval_crosses_the_line():
    rows = [*_fp32(), _row("W8A8", "none", 0.80, 0.058)]  # [5.3, 6.3] straddles 6.0
    v = _one(rows)
    assert v.outcome == "safe as is" and v.borderline
    rows = [*_fp32(), _row("W8A8", "none", 0.8, 0.05)]
    assert not _one(rows).borderline


def test_aggregate_one_seed_keeps_its_interval_two_seeds_combine_both_variances():
    one = aggregate([_row("W8A8", "none", 0.8, 0.10)], "ece")
    assert (one.value, one.lo, one.hi, one.n_seeds) == pytest.approx((0.10, 0.095, 0.105, 1))
    rs = [_row("W8A8", "none", 0.8, 0.10, seed=0), _row("W8A8", "none", 0.8, 0.14, seed=1)]
    two = aggregate(rs, "ece")
    z = NormalDist().inv_cdf(0.975)
    se = 0.005 / z
    between = ((0.10 - 0.12) ** 2 + (0.14 - 0.12) ** 2) / 1
    half = z * math.sqrt(se**2 / 2 + between / 2)
    assert two.value == pytest.approx(0.12) and two.n_seeds == 2
    assert (two.lo, two.hi) == pytest.approx((0.12 - half, 0.12 + half))
    assert aggregate([], "ece").value is None


def test_verdicts_and_claims_use_both_seeds():
    rows = []
    for seed, w4_ece in ((0, 0.12), (1, 0.16)):
        rows += [
            _row("fp32", "none", 0.80, 0.05, seed=seed),
            _row(
                "W4A4",
                "none",
                0.80,
                w4_ece,
                seed=seed,
                ece_diff_vs_fp32=w4_ece - 0.05,
                ece_diff_vs_fp32_lo=w4_ece - 0.06,
                ece_diff_vs_fp32_hi=w4_ece - 0.04,
            ),
        ]
    v = _one(rows)
    assert v.ece.value == pytest.approx(0.14) and v.ece.n_seeds == 2
    c = claims.precision_raises_ece(rows)
    assert c.tested and c.verdict.startswith("supported (1 of 1)")
    (rise,) = [n for n in c.rows if n["quantity"] == "ece_diff_vs_fp32"]
    assert rise["value"] == pytest.approx(0.09) and rise["n_seeds"] == 2
    assert "mean of 2 seeds" in c.evidence[0]


def test_claims_a_study_does_not_test_say_what_they_need():
    rows = [*_fp32(), _row("W8A8", "none", 0.8, 0.05)]
    by_key = {c.key: c for c in claims.evaluate(rows)}
    assert by_key["precision_raises_ece"].tested
    for key in ("ghostnet_most_robust", "range_sample_variance", "training_objectives"):
        assert not by_key[key].tested and by_key[key].verdict == "not tested"
    assert "ghostnet_vgg16" in by_key["ghostnet_most_robust"].evidence[0]
    assert [c.key for c in claims.evaluate(rows)] == [fn.__name__ for fn in claims.CLAIMS]


def test_every_claim_uses_both_seeds_the_same_way():
    """Two seeds of a study that tests every claim: each claim's numbers are means over both
    seeds (n_seeds == 2) with the shared aggregation, never the first seed's row."""
    rows = []
    for seed, shift in ((0, 0.0), (1, 0.02)):
        for arch in ("ghostnet_vgg16", "mobileone_s0"):
            for obj in ("ce", "focal"):
                base = {"arch": arch, "objective": obj, "seed": seed}
                rise = (0.01 if arch.startswith("ghost") else 0.2) + shift
                rows += [
                    _row("fp32", "none", 0.8, 0.05, **base),
                    _row("fp32", "temperature", 0.8, 0.03, **base, temperature=1.2),
                    _row(
                        "W4A4",
                        "none",
                        0.7,
                        0.05 + rise,
                        **base,
                        ece_diff_vs_fp32=rise,
                        ece_diff_vs_fp32_lo=rise - 0.01,
                        ece_diff_vs_fp32_hi=rise + 0.01,
                    ),
                    _row(
                        "W4A4",
                        "temperature",
                        0.7,
                        0.04 + shift,
                        **base,
                        temperature=2.0,
                        ece_diff_vs_none=-rise,
                        ece_diff_vs_none_lo=-rise - 0.01,
                        ece_diff_vs_none_hi=-rise + 0.01,
                        ece_diff_vs_fp32=0.01,
                        ece_diff_vs_fp32_lo=0.0,
                        ece_diff_vs_fp32_hi=0.02,
                    ),
                    _row("W4A4", "temperature_fp32", 0.7, 0.2 + shift, **base, temperature=1.2),
                ]
    results = {c.key: c for c in claims.evaluate(rows)}
    tested = [c for c in results.values() if c.tested]
    assert {c.key for c in tested} >= {
        "precision_raises_ece",
        "ghostnet_most_robust",
        "temperature_scaling_helps",
        "refit_temperature",
        "training_objectives",
    }
    for c in tested:
        assert c.rows, c.key
        assert all(n["n_seeds"] == 2 for n in c.rows), c.key
    (ghost,) = [
        n
        for n in results["ghostnet_most_robust"].rows
        if n["model"] == "ghostnet_vgg16@1" and n["quantity"] == "ece_diff_vs_fp32"
    ]
    assert ghost["value"] == pytest.approx(0.02)  # mean of 0.01 and 0.03
    assert results["ghostnet_most_robust"].verdict.startswith("supported")
