"""The verdicts' documented rules pinned at their edges, on hand-made rows: the words a deployer
reads (reason, basis, the verdict table, the summary sentences) re-derived by hand from the
numbers, each budget compared at equality, missing columns and intervals, several datasets and
models, and the recalibrator named among several (the ``verdicts`` module docstring and the
README's "Verdicts" paragraph)."""

from __future__ import annotations

import pytest

from _results import hand_row
from _results import paired as _paired
from quantcal.findings.verdicts import Budget, summary, verdict_table, verdicts

_row = hand_row


def _one(rows, budget=None):
    (v,) = verdicts(rows, budget)
    return v


def _no_accuracy(r):
    """The row without its accuracy column (a runtime that reported only ECE)."""
    r.update(accuracy=None, accuracy_lo=None, accuracy_hi=None)
    return r


def _no_interval(r, key="ece"):
    r.update({f"{key}_lo": None, f"{key}_hi": None})
    return r


#: The fp32 model of most tests: 90 % accurate, ECE 2 %, no recalibrator measured (its best is
#: raw), so a quantized ECE passes at ≤ 3 % and at most 5 % absolute (the default budget).
_FP32 = _row("fp32", "none", 0.90, 0.020)

_TS_RAW_WHY = "fp32's best is raw, the rows pair temperature only with fp32 + temperature"


# ---------------------------------------------------------------------------------------------
# Budget
# ---------------------------------------------------------------------------------------------
def test_budget_fractions_include_zero_and_exclude_booleans():
    """ "a fraction in [0, 1]": 0 is one (a deployer who accepts no loss at all); True is not a
    number of points."""
    b = Budget(max_accuracy_drop=0.0, max_ece_rise=0.0, max_ece=0.0)
    assert (b.max_accuracy_drop, b.max_ece_rise, b.max_ece) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="max_ece must be a fraction"):
        Budget(max_ece=True)


# ---------------------------------------------------------------------------------------------
# Safe as is: the reason and the basis say the numbers that decided
# ---------------------------------------------------------------------------------------------
def test_safe_as_is_with_a_paired_difference_says_it_and_the_budget():
    fp32 = _row("fp32", "none", 0.90, 0.030)
    q = _row("W8A8", "none", 0.90, 0.035, **_paired(0.005, 0.001, 0.009))
    v = _one([fp32, q])
    assert v.outcome == "safe as is" and not v.borderline
    assert v.reason == (
        "ECE 3.5 % vs fp32 3.0 % (paired difference +0.50 [+0.10, +0.90] points; "
        "budget +1, at most 5 %); accuracy 90.0 % vs fp32 90.0 %"
    )
    assert v.basis == (
        "ΔECE vs fp32 +0.50 [+0.10, +0.90] points (paired) vs the budget +1; "
        "ECE 3.5 [3.0, 4.0] % vs the absolute 5 %"
    )
    assert v.fp32_ece.value == pytest.approx(0.030) and v.fp32_accuracy.value == 0.90
    # no recalibrator measured: none is named
    assert (v.recal, v.recal_fit) == ("", "")
    assert v.best_ece.value is None and v.recal_accuracy.value is None


def test_safe_as_is_without_a_paired_column_uses_the_cells_own_interval():
    fp32 = _row("fp32", "none", 0.90, 0.030)
    v = _one([fp32, _row("W8A8", "none", 0.90, 0.032)])
    assert v.outcome == "safe as is" and not v.borderline
    assert v.reason == (
        "ECE 3.2 % vs fp32 3.0 % (budget +1, at most 5 %); accuracy 90.0 % vs fp32 90.0 %"
    )
    assert v.basis == (
        "ECE 3.2 [2.7, 3.7] % vs 3.0 % +1 (its own interval: no ece_diff_vs_fp32); "
        "ECE 3.2 [2.7, 3.7] % vs the absolute 5 %"
    )


def test_a_paired_difference_without_an_interval_is_said_as_a_number():
    fp32 = _row("fp32", "none", 0.90, 0.030)
    v = _one([fp32, _row("W8A8", "none", 0.90, 0.038, ece_diff_vs_fp32=0.008)])
    assert v.outcome == "safe as is" and not v.borderline
    assert "(paired difference +0.80 points; budget +1, at most 5 %)" in v.reason
    assert v.basis.startswith("ΔECE vs fp32 +0.80 points (paired) vs the budget +1; ")


def test_an_ece_without_an_interval_is_judged_on_its_value():
    """No ``ece_lo``/``ece_hi``: point estimates decide and nothing is borderline."""
    q = _no_interval(_row("W8A8", "none", 0.90, 0.025))
    v = _one([_FP32, q])
    assert v.outcome == "safe as is" and not v.borderline
    assert v.basis == (
        "ECE 2.5 % vs 2.0 % +1 (its own interval: no ece_diff_vs_fp32); "
        "ECE 2.5 % vs the absolute 5 %"
    )


@pytest.mark.parametrize(
    ("d", "lo", "hi", "outcome"),
    [
        (0.012, 0.010, 0.014, "not safe: confidence cannot be repaired"),  # lo on the line
        (0.008, 0.004, 0.010, "safe as is"),  # hi on the line
    ],
)
def test_an_interval_ending_exactly_on_the_line_straddles_it(d, lo, hi, outcome):
    """≈ when the interval "straddles its budget line": an end on the line is in it."""
    q = _row("W8A8", "none", 0.90, 0.020 + d, **_paired(d, lo, hi))
    v = _one([_FP32, q])
    assert v.outcome == outcome and v.borderline


# ---------------------------------------------------------------------------------------------
# Cannot be repaired: what was tried, and the checks that failed
# ---------------------------------------------------------------------------------------------
def _unrepaired(*recals):
    return [_FP32, _row("W4A4", "none", 0.90, 0.045), *recals]


def test_cannot_be_repaired_names_the_best_recalibrator_and_the_failed_checks():
    """Raw ECE 4.5 % is over 2 + 1 (under 5 %); temperature lowers it to 4.0 %, still over the
    line: the basis holds the two failed relative checks, not the passed absolute ones."""
    v = _one(_unrepaired(_row("W4A4", "temperature", 0.90, 0.040)))
    assert v.outcome == "not safe: confidence cannot be repaired" and not v.borderline
    assert v.reason == (
        "raw ECE 4.5 %; the best recalibrator, temperature, reaches 4.0 %; fp32's best is "
        "2.0 % (budget +1, at most 5 %)"
    )
    assert v.basis == (
        "ECE 4.5 [4.0, 5.0] % vs 2.0 % +1 (its own interval: no ece_diff_vs_fp32); "
        f"ECE with temperature 4.0 [3.5, 4.5] % vs 2.0 % +1 (its own interval: {_TS_RAW_WHY})"
    )
    assert (v.recal, v.best_ece.value) == ("temperature", pytest.approx(0.040))


def test_cannot_be_repaired_says_when_no_recalibrator_lowers_the_ece():
    """A recalibrator that leaves ECE where it was (equal) does not lower it."""
    v = _one(_unrepaired(_row("W4A4", "temperature", 0.90, 0.045)))
    assert v.reason == (
        "raw ECE 4.5 %; no recalibrator lowers it (the best, temperature, reaches 4.5 %); "
        "fp32's best is 2.0 % (budget +1, at most 5 %)"
    )


def test_cannot_be_repaired_says_how_the_best_recalibrator_moved_accuracy():
    v = _one(_unrepaired(_row("W4A4", "vector", 0.894, 0.040)))
    assert v.outcome == "not safe: confidence cannot be repaired"
    assert v.reason == (
        "raw ECE 4.5 %; the best recalibrator, vector, reaches 4.0 % (vector changes "
        "predictions: accuracy 90.0 → 89.4 %); fp32's best is 2.0 % (budget +1, at most 5 %)"
    )


def test_cannot_be_repaired_without_any_recalibrator():
    v = _one(_unrepaired())
    assert v.reason == (
        "raw ECE 4.5 %; no recalibrator was measured; fp32's best is 2.0 % (budget +1, at most 5 %)"
    )
    assert (v.recal, v.recal_fit) == ("", "")


def test_cannot_be_repaired_names_the_usable_best_not_a_set_aside_lower_one():
    """Isotonic reaches less, but its fit measurably raised the held-out ECE: the best *usable*
    recalibrator (temperature) is the one said, and isotonic is said to be set aside."""
    raised = _paired(0.01, 0.002, 0.02, "ece_diff_vs_none")
    v = _one(
        _unrepaired(
            _row("W4A4", "isotonic", 0.90, 0.030, **raised),
            _row("W4A4", "temperature", 0.90, 0.040),
        )
    )
    assert v.outcome == "not safe: confidence cannot be repaired"
    assert v.recal == "temperature"
    assert v.reason == (
        "raw ECE 4.5 %; the best recalibrator, temperature, reaches 4.0 %; fp32's best is "
        "2.0 % (budget +1, at most 5 %) (isotonic raised the held-out ECE (+1.00 [+0.20, "
        "+2.00] points vs none, paired): not counted)"
    )


def test_cannot_be_repaired_when_every_recalibrator_is_set_aside():
    """Vector costs 5 points of accuracy, isotonic's fit raised ECE: no usable one; the lowest
    ECE of all (vector) is shown with why it does not count."""
    raised = _paired(0.01, 0.002, 0.02, "ece_diff_vs_none")
    v = _one(
        _unrepaired(
            _row("W4A4", "isotonic", 0.90, 0.035, **raised),
            _row("W4A4", "vector", 0.85, 0.030),
        )
    )
    assert v.outcome == "not safe: confidence cannot be repaired"
    assert v.recal == "vector"
    assert v.reason == (
        "raw ECE 4.5 %; no usable recalibrator (vector reaches 3.0 % but changes predictions "
        "and costs 5.0 points of accuracy (budget 1)); fp32's best is 2.0 % "
        "(budget +1, at most 5 %)"
    )


# ---------------------------------------------------------------------------------------------
# Safe after recalibration: the reason, the repair named among several
# ---------------------------------------------------------------------------------------------
def _over_line(*recals, fp32=(_FP32,)):
    """Raw ECE 6 %: over fp32's 2 % + 1 (and over 5 %)."""
    return [*fp32, _row("W8A8", "none", 0.90, 0.060), *recals]


def test_safe_after_recalibration_over_fp32s_line_vs_fp32s_recalibrated_best():
    fp32 = (_FP32, _row("fp32", "temperature", 0.90, 0.015))
    v = _one(_over_line(_row("W8A8", "temperature", 0.90, 0.020), fp32=fp32))
    assert v.outcome == "safe after recalibration"
    assert v.reason == (
        "raw ECE 6.0 % is over fp32's 2.0 % + 1; temperature (fitted on val) brings it to "
        "2.0 % vs fp32's best 1.5 % (with temperature); it keeps every prediction"
    )
    assert v.fp32_best_ece.value == pytest.approx(0.015)


def test_safe_after_recalibration_vs_fp32_raw_when_fp32_has_no_better_recalibrator():
    """fp32's temperature leaves its ECE where it was (equal): fp32's best is its raw ECE."""
    fp32 = (_FP32, _row("fp32", "temperature", 0.90, 0.020))
    v = _one(_over_line(_row("W8A8", "temperature", 0.90, 0.020), fp32=fp32))
    assert v.reason == (
        "raw ECE 6.0 % is over fp32's 2.0 % + 1; temperature (fitted on val) brings it to "
        "2.0 % vs fp32's best 2.0 % (raw); it keeps every prediction"
    )
    assert v.basis == (
        f"ECE with temperature 2.0 [1.5, 2.5] % vs 2.0 % +1 (its own interval: {_TS_RAW_WHY}); "
        "ECE with temperature 2.0 [1.5, 2.5] % vs the absolute 5 %"
    )


def test_safe_after_recalibration_over_the_absolute_budget_only():
    fp32 = _row("fp32", "none", 0.90, 0.045)
    q = _row("W8A8", "none", 0.90, 0.052)  # +0.7 vs fp32: within the line, over 5 %
    v = _one([fp32, q, _row("W8A8", "temperature", 0.90, 0.020)])
    assert v.outcome == "safe after recalibration"
    assert v.reason == (
        "raw ECE 5.2 % is over the absolute 5 %; temperature (fitted on val) brings it to "
        "2.0 % vs fp32's best 4.5 % (raw); it keeps every prediction"
    )


def test_a_recalibrator_that_keeps_predictions_is_never_said_to_change_them():
    """Temperature keeps every prediction even where its row's accuracy reads 0.4 points lower
    (a separately measured column): the reason says it keeps them."""
    v = _one(_over_line(_row("W8A8", "temperature", 0.896, 0.020)))
    assert v.outcome == "safe after recalibration" and v.recal == "temperature"
    assert v.reason.endswith("(raw); it keeps every prediction")


def test_a_prediction_changing_repair_at_the_same_accuracy_says_no_change():
    v = _one(_over_line(_row("W8A8", "vector", 0.90, 0.020)))
    assert v.outcome == "safe after recalibration"
    assert v.reason == (
        "raw ECE 6.0 % is over fp32's 2.0 % + 1; vector (fitted on val) brings it to "
        "2.0 % vs fp32's best 2.0 % (raw)"
    )


def test_a_recalibrator_costing_exactly_the_accuracy_budget_is_a_repair():
    """ "does not cost more than max_accuracy_drop" and "within max_accuracy_drop of fp32", at
    equality (binary-exact numbers: 0.875 − 0.8125 == 0.0625)."""
    fp32 = _row("fp32", "none", 0.875, 0.020)
    rows = [fp32, _row("W8A8", "none", 0.875, 0.060), _row("W8A8", "vector", 0.8125, 0.020)]
    v = _one(rows, Budget(max_accuracy_drop=0.0625))
    assert v.outcome == "safe after recalibration" and v.recal == "vector"


def test_a_recalibrator_one_decimal_point_under_fp32_is_within_a_one_point_budget():
    """0.90 − 0.89 is 0.01 in decimal (0.010000000000000009 in binary): within the budget."""
    rows = _over_line(_row("W8A8", "vector", 0.89, 0.020))
    rows[1] = _row("W8A8", "none", 0.89, 0.060)
    v = _one(rows)
    assert v.outcome == "safe after recalibration" and v.recal == "vector"


def test_a_recalibrator_without_an_accuracy_column():
    """Temperature keeps every prediction, so its accuracy is the cell's: it repairs. Vector
    changes them, so without its accuracy it cannot be shown to keep the budget: no repair."""
    ts = _no_accuracy(_row("W8A8", "temperature", 0.90, 0.020))
    rows = _over_line(ts)
    v = _one(rows)
    assert v.outcome == "safe after recalibration" and v.recal == "temperature"
    assert v.recal_accuracy.value is None
    assert summary(rows) == []
    rows = _over_line(
        _no_accuracy(_row("W8A8", "vector", 0.90, 0.020)),
        _row("W8A8", "temperature", 0.90, 0.025),
    )
    v = _one(rows)
    assert v.outcome == "safe after recalibration" and v.recal == "temperature"
    v = _one(_over_line(_no_accuracy(_row("W8A8", "vector", 0.90, 0.020))))
    assert v.outcome == "not safe: confidence cannot be repaired"


def test_a_recalibrator_with_no_ece_is_skipped_not_the_end_of_the_list():
    rows = _over_line(
        _row("W8A8", "isotonic", 0.90, float("nan")),
        _row("W8A8", "temperature", 0.90, 0.020),
    )
    v = _one(rows)
    assert v.outcome == "safe after recalibration" and v.recal == "temperature"


def test_the_repair_with_equal_or_higher_ece_is_not_said_to_be_lower():
    """Temperature, histogram (equal ECE) and isotonic (higher) all repair: temperature, the
    fewest parameters, is named, and nothing is "lower, within noise"."""
    v = _one(
        _over_line(
            _row("W8A8", "temperature", 0.90, 0.020),
            _row("W8A8", "histogram", 0.90, 0.020),
            _row("W8A8", "isotonic", 0.90, 0.025),
        )
    )
    assert v.recal == "temperature"
    assert v.reason == (
        "raw ECE 6.0 % is over fp32's 2.0 % + 1; temperature (fitted on val) brings it to "
        "2.0 % vs fp32's best 2.0 % (raw); it keeps every prediction"
    )


def test_the_lower_recalibrators_passed_over_are_listed_with_why():
    """Vector is lowest but costs 3 points; histogram and isotonic are lower than temperature
    but within its noise (±1 point), and temperature fits fewer parameters."""
    v = _one(
        _over_line(
            _row("W8A8", "temperature", 0.90, 0.028, half=0.01),
            _row("W8A8", "histogram", 0.90, 0.020),
            _row("W8A8", "isotonic", 0.90, 0.021),
            _row("W8A8", "vector", 0.87, 0.010),
        )
    )
    assert v.recal == "temperature"
    assert v.reason == (
        "raw ECE 6.0 % is over fp32's 2.0 % + 1; temperature (fitted on val) brings it to "
        "2.8 % vs fp32's best 2.0 % (raw); it keeps every prediction (vector reaches 1.0 % "
        "but changes predictions and costs 3.0 points of accuracy (budget 1); histogram "
        "2.0 %, isotonic 2.1 % are lower, within noise)"
    )


def test_of_two_prediction_changing_repairs_the_one_with_fewer_parameters_is_named():
    """Vector (2·C = 20 parameters at C = 10) within noise of matrix (C² + C = 110)."""
    v = _one(
        _over_line(
            _row("W8A8", "matrix", 0.90, 0.020, n_classes=10),
            _row("W8A8", "vector", 0.90, 0.022, half=0.01, n_classes=10),
        )
    )
    assert v.recal == "vector"
    assert v.reason == (
        "raw ECE 6.0 % is over fp32's 2.0 % + 1; vector (fitted on val) brings it to 2.2 % vs "
        "fp32's best 2.0 % (raw) (matrix 2.0 % is lower, within noise; vector fits fewer "
        "parameters)"
    )


def test_a_known_parameter_count_ranks_before_an_unknown_one():
    """A recalibrator this version does not know (no parameter count) is not preferred over
    matrix scaling within noise of it."""
    v = _one(
        _over_line(
            _row("W8A8", "custom", 0.90, 0.020),
            _row("W8A8", "matrix", 0.90, 0.022, half=0.01, n_classes=10),
        )
    )
    assert v.recal == "matrix"


@pytest.mark.parametrize(
    ("ts_ece", "ts_half", "named"),
    [
        (0.028, 0.01, "temperature"),  # 0.8 above histogram, its half-interval 1.0: within
        (0.033, 0.01, "histogram"),  # 1.3 above, half-interval 1.0: histogram is named
    ],
)
def test_within_noise_is_at_most_half_the_interval(ts_ece, ts_half, named):
    """ "its ECE above the lowest by at most half its own interval": temperature is named over a
    lower histogram only within that distance."""
    v = _one(
        _over_line(
            _row("W8A8", "temperature", 0.90, ts_ece, half=ts_half),
            _row("W8A8", "histogram", 0.90, 0.020),
        ),
        Budget(max_ece_rise=0.05),
    )
    assert v.recal == named


def test_within_noise_at_exact_equality():
    """ECE above the lowest by exactly half its own interval is within noise (binary-exact:
    0.3125 − 0.25 == (0.375 − 0.25) / 2)."""
    rows = _over_line(
        _row("W8A8", "temperature", 0.90, 0.3125, half=0.0625),
        _row("W8A8", "histogram", 0.90, 0.25),
    )
    assert _one(rows, Budget(max_ece_rise=0.5, max_ece=1.0)).recal == "temperature"


def test_a_recalibrator_without_an_interval_has_no_noise():
    """Temperature 2.5 % with no interval is not within noise of histogram's 2.0 %."""
    rows = _over_line(
        _no_interval(_row("W8A8", "temperature", 0.90, 0.025)),
        _row("W8A8", "histogram", 0.90, 0.020),
    )
    assert _one(rows).recal == "histogram"


def test_temperature_is_preferred_over_a_lower_vector_within_its_noise():
    rows = _over_line(
        _row("W8A8", "vector", 0.90, 0.020),
        _row("W8A8", "temperature", 0.90, 0.024, half=0.01),
    )
    assert _one(rows).recal == "temperature"


# ---------------------------------------------------------------------------------------------
# Accuracy lost
# ---------------------------------------------------------------------------------------------
def test_accuracy_lost_says_the_points_and_is_borderline_on_its_own_interval():
    """88 ± 2 % vs fp32 90 % − 1: lost on the point estimate (2 points), and the drop's interval
    [0, 4] straddles the 1-point line."""
    v = _one([_FP32, _row("W4A4", "none", 0.88, 0.030)])
    assert v.outcome == "not safe: accuracy lost" and v.borderline
    assert v.reason == "accuracy 88.0 % vs fp32 90.0 %: 2.0 points lost, budget 1"
    assert v.basis == (
        "accuracy 88.0 [86.0, 90.0] % vs fp32 90.0 % − 1 (its own interval: no paired "
        "accuracy column)"
    )


def test_accuracy_lost_clearly_and_without_an_accuracy_interval():
    v = _one([_FP32, _row("W4A4", "none", 0.80, 0.030)])
    assert v.outcome == "not safe: accuracy lost" and not v.borderline
    q = _no_interval(_row("W4A4", "none", 0.85, 0.030), "accuracy")
    v = _one([_FP32, q])
    assert v.outcome == "not safe: accuracy lost" and not v.borderline
    assert v.basis == (
        "accuracy 85.0 % vs fp32 90.0 % − 1 (its own interval: no paired accuracy column)"
    )


def test_accuracy_lost_names_no_gain_when_no_recalibrator_gains():
    """Temperature keeps the accuracy and vector loses 0.5 point more: nothing won back, so the
    reason stops at the loss."""
    rows = [
        _FP32,
        _row("W4A4", "none", 0.80, 0.030),
        _row("W4A4", "temperature", 0.80, 0.020),
        _row("W4A4", "vector", 0.795, 0.020),
    ]
    v = _one(rows)
    assert v.outcome == "not safe: accuracy lost"
    assert v.reason == "accuracy 80.0 % vs fp32 90.0 %: 10.0 points lost, budget 1"


def test_accuracy_won_back_but_its_ece_over_budget():
    rows = [
        _FP32,
        _row("W4A4", "none", 0.50, 0.300),
        _row("W4A4", "vector", 0.894, 0.090),
    ]
    v = _one(rows)
    assert v.outcome == "not safe: accuracy lost"
    assert v.reason == (
        "accuracy 50.0 % vs fp32 90.0 %: 40.0 points lost, budget 1; vector changes "
        "predictions: accuracy 50.0 → 89.4 %, but its ECE 9.0 % is over budget"
    )


def test_accuracy_won_back_to_exactly_the_budget_is_not_short():
    """fp32 87.5 %, vector 81.25 %: 6.25 points == max_accuracy_drop, so not "short"."""
    rows = [
        _row("fp32", "none", 0.875, 0.020),
        _row("W4A4", "none", 0.50, 0.300),
        _row("W4A4", "vector", 0.8125, 0.090),
    ]
    v = _one(rows, Budget(max_accuracy_drop=0.0625))
    assert v.outcome == "not safe: accuracy lost"
    assert v.reason.endswith(
        "; vector changes predictions: accuracy 50.0 → 81.2 %, but its ECE 9.0 % is over budget"
    )


def test_an_accuracy_change_of_five_images_in_ten_thousand_is_said():
    """0.0 → 0.05 %: a change that shows at the report's resolution (0.0 → 0.1 %)."""
    rows = [
        _FP32,
        _row("W4A4", "none", 0.0, 0.500),
        _row("W4A4", "vector", 0.0005, 0.500),
    ]
    v = _one(rows)
    assert v.reason.endswith(
        "; vector changes predictions: accuracy 0.0 → 0.1 %, still 90.0 points short of fp32"
    )


def test_safe_after_recalibration_where_accuracy_was_lost():
    rows = [
        _FP32,
        _row("W4A4", "none", 0.80, 0.030),
        _row("W4A4", "vector", 0.95, 0.020),
    ]
    v = _one(rows)
    assert v.outcome == "safe after recalibration" and v.recal == "vector"
    assert not v.borderline  # 95 ± 2 % is clear of fp32 90 % − 1
    assert v.reason == (
        "accuracy 80.0 % is 10.0 points under fp32's 90.0 %, but vector (fitted on val) brings "
        "it to 2.0 % vs fp32's best 2.0 % (raw); vector changes predictions: accuracy 80.0 → "
        "95.0 % (budget +1, at most 5 %)"
    )
    assert v.basis == (
        "accuracy after it 95.0 [93.0, 97.0] % vs fp32 90.0 % − 1 (its own interval: no paired "
        "accuracy column); ECE with vector 2.0 [1.5, 2.5] % vs 2.0 % +1 (its own interval: "
        "fp32's best is raw, the rows pair vector only with fp32 + vector); ECE with vector "
        "2.0 [1.5, 2.5] % vs the absolute 5 %"
    )


# ---------------------------------------------------------------------------------------------
# As trustworthy as fp32, which is not
# ---------------------------------------------------------------------------------------------
def _bad_fp32(*recals, **fp32_kw):
    """fp32 at ECE 10 % (over 5 %), with no recalibrator; W8A8 no worse."""
    return [
        _row("fp32", "none", 0.90, 0.100, **fp32_kw),
        _row("W8A8", "none", 0.90, 0.100),
        *recals,
    ]


_BAD_HEAD = (
    "ECE 10.0 % vs fp32 10.0 % (budget +1, at most 5 %): no worse than fp32, but fp32 itself "
    "is over the absolute budget 5 %"
)


def test_like_fp32_recalibrate_without_mean_confidence_and_fp32_best_raw():
    v = _one(_bad_fp32(_row("W8A8", "temperature", 0.90, 0.020)))
    assert v.outcome == "as trustworthy as fp32, which is not: recalibrate"
    assert v.reason == (
        f"{_BAD_HEAD}. Recalibrate: temperature (fitted on val) brings it to 2.0 % vs fp32's "
        "best 10.0 % (raw); it keeps every prediction"
    )


def test_like_fp32_recalibrate_with_a_prediction_changing_repair():
    v = _one(_bad_fp32(_row("W8A8", "vector", 0.90, 0.020)))
    assert v.outcome == "as trustworthy as fp32, which is not: recalibrate"
    assert v.reason == (
        f"{_BAD_HEAD}. Recalibrate: vector (fitted on val) brings it to 2.0 % vs fp32's "
        "best 10.0 % (raw)"
    )


@pytest.mark.parametrize(
    ("confidence", "side"),
    [
        (0.80, " (under-confident: mean confidence 10.0 points below accuracy)"),
        (0.95, " (over-confident: mean confidence 5.0 points above accuracy)"),
    ],
)
def test_like_fp32_says_which_side_fp32_errs_on(confidence, side):
    v = _one(_bad_fp32(mean_confidence=confidence))
    assert v.reason.startswith(f"{_BAD_HEAD}{side}; ")


@pytest.mark.parametrize("confidence", [0.90, 0.9004, 0.8996])
def test_a_mean_confidence_equal_to_accuracy_is_neither_side(confidence):
    """Over-confident means confidence above accuracy, under- below it; at the accuracy (to the
    0.1 points the reason prints) it is neither, not "0.0 points below"."""
    v = _one(_bad_fp32(mean_confidence=confidence))
    assert "-confident" not in v.reason
    assert v.reason.startswith(f"{_BAD_HEAD} (mean confidence within 0.1 points of accuracy); ")


def test_like_fp32_cannot_be_repaired_says_what_the_best_usable_reaches():
    v = _one(_bad_fp32(_row("W8A8", "temperature", 0.90, 0.080)))
    assert v.outcome == "as trustworthy as fp32, which is not: cannot be repaired"
    assert v.reason == (
        f"{_BAD_HEAD}; no recalibrator brings it within budget (the best usable, temperature, "
        "reaches 8.0 %)"
    )
    v = _one(_bad_fp32())
    assert v.reason == (
        f"{_BAD_HEAD}; no recalibrator brings it within budget (no usable recalibrator was "
        "measured)"
    )


def test_fp32_exactly_at_max_ece_is_not_over_it():
    """ "fp32 itself is over max_ece": at 5 % exactly it is not, so a cell over 5 % is simply not
    safe, not "as trustworthy as fp32"."""
    rows = [_row("fp32", "none", 0.90, 0.05), _row("W8A8", "none", 0.90, 0.055)]
    assert _one(rows).outcome == "not safe: confidence cannot be repaired"
    assert summary(rows) == []


def test_worse_than_a_bad_fp32_is_not_as_trustworthy_as_it():
    rows = [_row("fp32", "none", 0.90, 0.147), _row("W8A8", "none", 0.90, 0.300)]
    assert _one(rows).outcome == "not safe: confidence cannot be repaired"


# ---------------------------------------------------------------------------------------------
# Fits: where and on how many images
# ---------------------------------------------------------------------------------------------
def test_a_cross_fitted_recalibrator_was_fitted_on_half_of_test():
    """No ``n_fit`` column: cross-fitted on test means half of ``n_test`` (361 // 2 = 180)."""
    ts = _row("W8A8", "temperature", 0.90, 0.020, recal_fit="test_crossfit", n_test=361)
    v = _one(_over_line(ts))
    assert (v.recal, v.recal_fit) == ("temperature", "test_crossfit")
    assert v.reason == (
        "raw ECE 6.0 % is over fp32's 2.0 % + 1; temperature (fitted on test_crossfit) brings it "
        "to 2.0 % vs fp32's best 2.0 % (raw); it keeps every prediction; fitted on only 180 "
        "images, under the 500 trusted"
    )
    (note,) = v.notes
    assert "temperature was fitted on 180 images, fewer than the 500" in note


@pytest.mark.parametrize(
    "kw",
    [
        {"recal_fit": "val", "n_test": 360},  # fitted on val: test's size says nothing
        {"recal_fit": "test_crossfit", "n_test": 360, "n_fit": 1000},  # n_fit is known
    ],
)
def test_the_test_split_size_is_used_only_for_an_unknown_cross_fit(kw):
    v = _one(_over_line(_row("W8A8", "temperature", 0.90, 0.020, **kw)))
    assert v.notes == () and v.reason.endswith("; it keeps every prediction")


def test_a_fit_without_a_split_column_is_on_val():
    v = _one(_over_line(_row("W8A8", "temperature", 0.90, 0.020, recal_fit=None)))
    assert v.recal_fit == "val" and "temperature (fitted on val)" in v.reason


def test_a_vector_fit_needs_fifty_images_per_parameter():
    """Vector at C = 10 fits 20 parameters: 1000 images, so 800 are too few."""
    vec = _row("W8A8", "vector", 0.90, 0.020, n_fit=800, n_classes=10)
    v = _one(_over_line(vec))
    assert v.outcome == "safe after recalibration" and v.recal == "vector"
    assert v.reason.endswith("(raw); fitted on only 800 images, under the 1000 trusted")
    (note,) = v.notes
    assert "vector was fitted on 800 images, fewer than the 1000" in note


# ---------------------------------------------------------------------------------------------
# Several cells: datasets, models, order, missing columns
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["dataset", "arch"])
def test_each_model_is_judged_against_its_own_fp32(key):
    """Two datasets (or two models): one's fp32 is at 2 %, the other's at 10 %; the same
    quantized 6 % is over the first's line and within the second's."""
    rows = [
        _row("fp32", "none", 0.90, 0.020, **{key: "a"}),
        _row("W8A8", "none", 0.90, 0.060, **{key: "a"}),
        _row("fp32", "none", 0.70, 0.100, **{key: "b"}),
        _row("W8A8", "none", 0.70, 0.100, **{key: "b"}),
    ]
    a, b = verdicts(rows)
    assert a.outcome == "not safe: confidence cannot be repaired"
    assert a.fp32_ece.value == pytest.approx(0.02) and a.ece.value == pytest.approx(0.06)
    assert b.outcome == "as trustworthy as fp32, which is not: cannot be repaired"
    assert b.fp32_accuracy.value == pytest.approx(0.70)


def test_a_model_without_fp32_is_skipped_and_the_next_one_judged():
    rows = [
        _row("W8A8", "none", 0.90, 0.020, arch="a"),
        _row("fp32", "none", 0.90, 0.020, arch="b"),
        _row("W8A8", "none", 0.90, 0.020, arch="b"),
    ]
    (v,) = verdicts(rows)
    assert v.model == "b@1" and v.outcome == "safe as is"


def test_verdicts_come_in_precision_order():
    """ "in model then precision order": fp32, W8A8, W4A8, W4A4 (most bits first)."""
    rows = [_FP32] + [_row(p, "none", 0.90, 0.020) for p in ("W4A4", "W8A8", "W4A8")]
    assert [v.precision for v in verdicts(rows)] == ["W8A8", "W4A8", "W4A4"]


def test_a_cell_or_fp32_without_accuracy_has_no_verdict():
    q = _no_accuracy(_row("W8A8", "none", 0.90, 0.020))
    assert verdicts([_FP32, q]) == []
    assert verdict_table([_FP32, q]) == ""
    fp32 = _no_accuracy(_row("fp32", "none", 0.90, 0.020))
    assert verdicts([fp32, _row("W8A8", "none", 0.90, 0.020)]) == []


# ---------------------------------------------------------------------------------------------
# Summary sentences
# ---------------------------------------------------------------------------------------------
def _overconfident_fp32(w8_ts=0.008, w4_ts=0.010, fp32_ts=0.014, **kw):
    rows = [
        _row("fp32", "none", 0.90, 0.147, mean_confidence=0.99, **kw),
        _row("W8A8", "none", 0.90, 0.146, **kw),
        _row("W4A4", "none", 0.90, 0.150, **kw),
    ]
    for p, ts in (("fp32", fp32_ts), ("W8A8", w8_ts), ("W4A4", w4_ts)):
        if ts is not None:
            rows.append(_row(p, "temperature", 0.90, ts, **kw))
    return rows


_OVER = (
    "net@1: the fp32 model itself is over the absolute budget, ECE 14.7 % (over-confident: mean "
    "confidence 9.0 points above accuracy); quantized cells no worse than it are marked “as "
    "trustworthy as fp32, which is not”"
)


def test_summary_of_an_fp32_model_over_the_absolute_budget():
    assert summary(_overconfident_fp32()) == [
        f"{_OVER}. Temperature scaling takes every cell, fp32 included, to ≤ 1.4 %."
    ]
    assert summary(_overconfident_fp32(w4_ts=0.09)) == [
        f"{_OVER}. Temperature scaling leaves up to 9.0 %."
    ]
    # at exactly max_ece temperature scaling does take every cell within it
    assert summary(_overconfident_fp32(w4_ts=0.05)) == [
        f"{_OVER}. Temperature scaling takes every cell, fp32 included, to ≤ 5.0 %."
    ]
    # a cell without temperature scaling: nothing said about it
    assert summary(_overconfident_fp32(w8_ts=None)) == [f"{_OVER}."]


def test_summary_speaks_of_every_model_over_the_budget_not_only_the_first():
    rows = [
        _row("fp32", "none", 0.90, 0.020, arch="fine"),
        _row("W8A8", "none", 0.90, 0.020, arch="fine"),
        *_overconfident_fp32(arch="net"),
    ]
    assert summary(rows) == [
        f"{_OVER}. Temperature scaling takes every cell, fp32 included, to ≤ 1.4 %."
    ]


@pytest.mark.parametrize("key", ["dataset", "arch"])
def test_summary_reads_each_models_own_fp32(key):
    """The model over the budget on one dataset (or among two models) is said with its own
    ECE, and the well-calibrated one is not said at all."""
    value = "net" if key == "arch" else "d"
    rows = [
        *_overconfident_fp32(**{key: value}),
        _row("fp32", "none", 0.90, 0.020, **{key: "other"}),
        _row("W8A8", "none", 0.90, 0.020, **{key: "other"}),
    ]
    assert summary(rows) == [
        f"{_OVER}. Temperature scaling takes every cell, fp32 included, to ≤ 1.4 %."
    ]


def test_summary_of_accuracy_won_back_by_more_than_the_budget_only():
    """Vector wins back 6.25 points (more than a 1-point budget: said; exactly a 6.25-point
    budget: not more than it); temperature never changes predictions."""
    rows = [
        _row("fp32", "none", 0.875, 0.020),
        _row("W4A4", "none", 0.8125, 0.030),
        _row("W4A4", "vector", 0.875, 0.020),
    ]
    assert summary(rows) == [
        "net@1 W4A4: vector changes predictions and wins back 6.2 points of accuracy "
        "(81.2 → 87.5 %, fp32 87.5 %)."
    ]
    assert summary(rows, Budget(max_accuracy_drop=0.0625)) == []
    rows[-1] = _row("W4A4", "vector", 0.8125, 0.020)  # no accuracy won back
    assert summary(rows, Budget(max_accuracy_drop=0.0625)) == []


def test_summary_follows_the_budget_that_named_the_recalibrator():
    """With the default budget only vector repairs (and wins 5 points back); with a 5-point ECE
    rise temperature repairs too, is within its noise of vector and is named: nothing won."""
    rows = [
        _row("fp32", "none", 0.80, 0.020),
        _row("W8A8", "none", 0.80, 0.060),
        _row("W8A8", "vector", 0.85, 0.025),
        _row("W8A8", "temperature", 0.80, 0.040, half=0.02),
    ]
    assert _one(rows).recal == "vector"
    assert len(summary(rows)) == 1
    budget = Budget(max_ece_rise=0.05)
    assert _one(rows, budget).recal == "temperature"
    assert summary(rows, budget) == []


def _small_fits(**kw):
    raised = _paired(0.01, 0.002, 0.02, "ece_diff_vs_none")
    return [
        _row("fp32", "none", 0.90, 0.020, n_classes=10, **kw),
        _row("W8A8", "none", 0.90, 0.060, n_classes=10, **kw),
        _row("W8A8", "temperature", 0.90, 0.020, n_fit=180, n_classes=10, **raised, **kw),
        _row("W4A4", "none", 0.90, 0.060, n_classes=10, **kw),
        _row("W4A4", "temperature", 0.90, 0.020, n_fit=200, n_classes=10, **raised, **kw),
        _row("W4A4", "vector", 0.90, 0.025, n_fit=800, n_classes=10, **kw),
    ]


_SMALL_TAIL = (
    " (fp32 cells included). Their fits may not reproduce on another sample: a larger "
    "recalibration split settles it (data.val_size; when cross-fitted on test, a larger test "
    "split)."
)


def test_summary_of_small_fits_and_fits_that_raised_ece():
    assert summary(_small_fits()) == [
        "Fitted on fewer images than this report trusts (at least 500, and 50 per fitted "
        "parameter): temperature on 180–200 images (500 needed) in 2 cell(s); vector on 800 "
        f"images (1000 needed) in 1 cell(s){_SMALL_TAIL}",
        "temperature's fit measurably raised the held-out ECE in 2 cell(s) (net@1 W8A8, net@1 "
        "W4A4); the verdicts do not count it as a repair there.",
    ]


@pytest.mark.parametrize("key", ["dataset", "arch"])
def test_summary_counts_each_models_fits_on_its_own_rows(key):
    rows = [
        _row("fp32", "none", 0.90, 0.020, **{key: "a"}),
        _row("W8A8", "none", 0.90, 0.060, **{key: "a"}),
        _row("W8A8", "temperature", 0.90, 0.020, n_fit=180, **{key: "a"}),
        _row("fp32", "none", 0.90, 0.020, **{key: "b"}),
        _row("W8A8", "none", 0.90, 0.060, **{key: "b"}),
        _row("W8A8", "temperature", 0.90, 0.020, n_fit=200, **{key: "b"}),
    ]
    (line,) = summary(rows)
    assert "temperature on 180–200 images (500 needed) in 2 cell(s)" in line


# ---------------------------------------------------------------------------------------------
# The verdict table
# ---------------------------------------------------------------------------------------------
_FILE_ARCH = "/tmp/p@q/nets.py:build"  # a file:factory arch, with an "@" in its folder


def _table_rows():
    a = {"arch": "net"}
    b = {"arch": _FILE_ARCH, "width": 0.5, "objective": "focal"}
    return [
        _row("fp32", "none", 0.90, 0.020, **a),
        _row("fp32", "temperature", 0.90, 0.015, **a),
        _row("W8A8", "none", 0.90, 0.022, **a, **_paired(0.002, -0.003, 0.007)),
        _row("W8A8", "temperature", 0.90, 0.015, **a),
        _row("W4A4", "none", 0.90, 0.060, **a, **_paired(0.04, 0.035, 0.045)),
        _row("W4A4", "temperature", 0.90, 0.018, **a),
        _row("fp32", "none", 0.80, 0.030, **b),
        _row("W4A8", "none", 0.80, 0.038, **b),  # [3.3, 4.3] − 3.0 straddles +1
        _row("W4A4", "none", 0.70, 0.030, **b),
    ]


def test_verdict_table_lines():
    """One line per model and precision: the short model name (file:factory, then @width and
    the objective), the precision, the outcome, the recalibrator that repairs it and ≈."""
    assert verdict_table(_table_rows()) == "\n".join(
        [
            "verdicts (budget: accuracy -1, ECE +1 vs fp32, ECE at most 5 %):",
            "  net@1                   W8A8  safe as is",
            "  net@1                   W4A4  safe after recalibration (temperature -> 1.8 %)",
            "  nets.py:build@0.5 focal W4A8  safe as is ≈",
            "  nets.py:build@0.5 focal W4A4  not safe: accuracy lost",
        ]
    )


def test_verdict_table_follows_the_budget_and_ends_with_the_summary():
    """fp32 at ECE 8 %: within a 10 % budget (safe as is, nothing to say), over the default
    5 % (as trustworthy as fp32, and the summary sentence under the lines)."""
    rows = [
        _row("fp32", "none", 0.90, 0.080, mean_confidence=0.95),
        _row("W8A8", "none", 0.89, 0.082, **_paired(0.002, -0.001, 0.004)),
    ]
    budget = Budget(max_accuracy_drop=0.02, max_ece_rise=0.005, max_ece=0.1)
    assert verdict_table(rows, budget) == (
        "verdicts (budget: accuracy -2, ECE +0.5 vs fp32, ECE at most 10 %):\n"
        "  net@1 W8A8  safe as is"
    )
    assert verdict_table(rows).split("\n") == [
        "verdicts (budget: accuracy -1, ECE +1 vs fp32, ECE at most 5 %):",
        "  net@1 W8A8  as trustworthy as fp32, which is not: cannot be repaired",
        "  net@1: the fp32 model itself is over the absolute budget, ECE 8.0 % (over-confident: "
        "mean confidence 5.0 points above accuracy); quantized cells no worse than it are marked "
        "“as trustworthy as fp32, which is not”.",
    ]


def test_verdict_table_marks_as_trustworthy_as_fp32_recalibrated_with_its_recalibrator():
    rows = _bad_fp32(_row("W8A8", "temperature", 0.90, 0.020))
    lines = verdict_table(rows).split("\n")
    assert lines[1] == (
        "  net@1 W8A8  as trustworthy as fp32, which is not: recalibrate (temperature -> 2.0 %)"
    )


def test_verdict_table_gives_the_repaired_ece_in_percent():
    rows = [
        _FP32,
        _row("W8A8", "none", 0.90, 0.300),
        _row("W8A8", "temperature", 0.90, 0.150),
    ]
    lines = verdict_table(rows, Budget(max_ece_rise=0.2, max_ece=0.2)).split("\n")
    assert lines[1] == "  net@1 W8A8  safe after recalibration (temperature -> 15.0 %)"
