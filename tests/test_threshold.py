"""The threshold-transfer rule (``quantcal.findings.threshold``) and its two building blocks in
``quantcal.calibration.selective``, on hand-made logits."""

from __future__ import annotations

import math

import pytest
import torch

from quantcal.calibration import selective
from quantcal.findings.threshold import OUTCOMES, threshold_transfer


def _pair(conf: list[float], right: list[bool]) -> tuple[torch.Tensor, torch.Tensor]:
    c = torch.tensor(conf, dtype=torch.float64)
    return torch.stack([torch.log(c), torch.log1p(-c)], 1), torch.tensor(
        [0 if r else 1 for r in right]
    )


VAL = _pair([0.95, 0.9, 0.85, 0.8, 0.7, 0.6], [True, True, True, True, False, False])


def test_threshold_for_risk_takes_the_largest_coverage_within_the_risk():
    assert selective.threshold_for_risk(*VAL, risk=0.0) == pytest.approx(0.8)
    assert selective.threshold_for_risk(*VAL, risk=0.2) == pytest.approx(0.7)  # 1 of 5
    assert selective.threshold_for_risk(*VAL, risk=1.0) == pytest.approx(0.6)
    first_wrong = _pair([0.9, 0.8], [False, True])
    assert selective.threshold_for_risk(*first_wrong, risk=0.4) == math.inf
    assert selective.threshold_for_risk(*first_wrong, risk=0.5) == pytest.approx(0.8)


def test_accepted_risk_counts_ties_at_the_threshold_and_nan_when_none():
    z, y = _pair([0.9, 0.8, 0.8, 0.6], [True, False, True, False])
    assert selective.accepted_risk(z, y, 0.8) == pytest.approx((1 / 3, 0.75))
    risk, coverage = selective.accepted_risk(z, y, math.inf)
    assert math.isnan(risk) and coverage == 0.0


def test_the_threshold_holds_when_the_quantized_model_ranks_like_fp32():
    r = threshold_transfer(VAL, VAL, VAL, target_risk=0.0)
    assert r.outcome == OUTCOMES[0] == "threshold holds"
    assert r.as_is == (0.0, pytest.approx(4 / 6)) and r.fp32_threshold == pytest.approx(0.8)


def test_an_over_confident_quantized_model_needs_the_threshold_re_set():
    # the wrong predictions became more confident than the fp32 threshold (0.8)
    q = _pair([0.97, 0.96, 0.95, 0.94, 0.85, 0.82], [True, True, True, True, False, False])
    r = threshold_transfer(VAL, q, q, target_risk=0.0, recalibrated_test=VAL[0])
    assert r.as_is == (pytest.approx(2 / 6), 1.0)
    assert r.reset_threshold == pytest.approx(0.94) and r.reset == (0.0, pytest.approx(4 / 6))
    assert r.recalibrated == (0.0, pytest.approx(4 / 6))  # recalibrated back to fp32's scale
    assert r.outcome == "re-set the threshold"


def test_a_target_no_threshold_reaches_is_unreachable():
    q = _pair([0.99, 0.9, 0.85, 0.8, 0.7, 0.6], [False, True, True, True, False, False])
    r = threshold_transfer(VAL, q, q, target_risk=0.1)
    assert r.reset_threshold == math.inf and math.isnan(r.reset[0]) and r.reset[1] == 0.0
    assert r.outcome == "target risk unreachable"
    # reachable on its validation images but not on test: unreachable too
    q_test = _pair([0.95, 0.9, 0.85, 0.8, 0.7, 0.6], [False, False, True, True, True, True])
    assert threshold_transfer(VAL, VAL, q_test, target_risk=0.0).outcome == OUTCOMES[2]


def test_bad_risk_is_refused():
    with pytest.raises(ValueError, match="risk must be in"):
        selective.threshold_for_risk(*VAL, risk=-0.1)
