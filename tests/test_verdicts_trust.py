"""Verdicts a deployer can act on (issue 22), on hand-made rows: a repair judged on accuracy
too, an absolute ECE budget, the ≈ mark from the paired interval, recalibrator fits that cannot
be trusted, and the why-section and findings that must agree with their own numbers."""

from __future__ import annotations

import math

import pytest

from _results import hand_row
from _results import paired as _paired
from quantcal.calibration import recal
from quantcal.findings import claims
from quantcal.findings.verdicts import OUTCOMES, Budget, summary, verdicts
from quantcal.report.why import _decomposition, _nll_sentence, why_section

_row = hand_row


def _one(rows, budget=None):
    (v,) = verdicts(rows, budget)
    return v


# ---------------------------------------------------------------------------------------------
# 1. A recalibrator that changes predictions is judged on its accuracy too
# ---------------------------------------------------------------------------------------------
def test_vector_scaling_losing_accuracy_is_no_repair_temperature_is():
    """Temperature 2.5 % (line 2.8 %) at no accuracy cost; vector 1.0 % but 3 points less
    accurate: safe after recalibration with temperature, never 'cannot be repaired'."""
    rows = [
        _row("fp32", "none", 0.90, 0.020),
        _row("fp32", "temperature", 0.90, 0.018),
        _row("W8A8", "none", 0.90, 0.060),
        _row("W8A8", "temperature", 0.90, 0.025),
        _row("W8A8", "vector", 0.87, 0.010),
    ]
    v = _one(rows)
    assert v.outcome == "safe after recalibration"
    assert (v.recal, v.recal_fit) == ("temperature", "val")
    assert v.best_ece.value == pytest.approx(0.025)
    assert "cannot be repaired" not in v.reason
    assert "vector reaches 1.0 % but changes predictions and costs 3.0 points" in v.reason


def test_temperature_is_preferred_within_noise_of_a_lower_ece():
    rows = [
        _row("fp32", "none", 0.90, 0.020),
        _row("W8A8", "none", 0.90, 0.060),
        _row("W8A8", "temperature", 0.90, 0.024, half=0.01),
        _row("W8A8", "histogram", 0.90, 0.020),  # lower, but within temperature's noise
    ]
    v = _one(rows)
    assert v.recal == "temperature"
    assert "histogram 2.0 % is lower, within noise" in v.reason
    rows[-1] = _row("W8A8", "histogram", 0.90, 0.005)  # clearly lower: it is named
    assert _one(rows).recal == "histogram"


def test_a_recalibrator_that_gains_accuracy_is_said_and_can_rescue_the_cell():
    base = [
        _row("fp32", "none", 0.894, 0.02),
        _row("fp32", "temperature", 0.894, 0.015),
        _row("W4A4", "none", 0.219, 0.60),
        _row("W4A4", "temperature", 0.219, 0.14),
    ]
    v = _one([*base, _row("W4A4", "vector", 0.828, 0.02)])
    assert v.outcome == "not safe: accuracy lost"
    assert "vector changes predictions: accuracy 21.9 → 82.8 %" in v.reason
    assert "still 6.6 points short of fp32" in v.reason
    rows = [*base, _row("W4A4", "vector", 0.890, 0.02)]
    v = _one(rows)
    assert v.outcome == "safe after recalibration" and v.recal == "vector"
    assert "vector changes predictions: accuracy 21.9 → 89.0 %" in v.reason
    assert v.recal_accuracy.value == pytest.approx(0.890)
    assert any("wins back 67.1 points of accuracy" in s for s in summary(rows))


# ---------------------------------------------------------------------------------------------
# 2. An absolute budget: "safe as is" relative to a badly calibrated fp32 is not safe
# ---------------------------------------------------------------------------------------------
def _overconfident(w8_temperature=0.008):
    rows = [
        _row("fp32", "none", 0.90, 0.147, mean_confidence=0.99),
        _row("fp32", "temperature", 0.90, 0.014),
        _row("W8A8", "none", 0.90, 0.146, mean_confidence=0.99, **_paired(-0.001, -0.004, 0.002)),
    ]
    if w8_temperature is not None:
        rows.append(_row("W8A8", "temperature", 0.90, w8_temperature))
    return rows


def test_as_trustworthy_as_an_overconfident_fp32_says_so_and_how_to_repair():
    rows = _overconfident()
    v = _one(rows)
    assert v.outcome == "as trustworthy as fp32, which is not: recalibrate"
    assert v.outcome in OUTCOMES and v.safe
    assert "no worse than fp32, but fp32 itself is over the absolute budget 5 %" in v.reason
    assert "over-confident: mean confidence 9.0 points above accuracy" in v.reason
    assert "Recalibrate: temperature (fitted on val) brings it to 0.8 %" in v.reason
    (line,) = [s for s in summary(rows) if "over the absolute budget" in s]
    assert "ECE 14.7 %" in line and "takes every cell, fp32 included, to ≤ 1.4 %" in line
    # the budget can be lifted: then it is safe as is, as before
    assert _one(rows, Budget(max_ece=1.0)).outcome == "safe as is"


def test_as_trustworthy_as_fp32_without_a_repair():
    v = _one(_overconfident(w8_temperature=None))
    assert v.outcome == "as trustworthy as fp32, which is not: cannot be repaired"
    assert not v.safe
    assert "no usable recalibrator was measured" in v.reason


def test_report_colours_and_words_the_new_outcome(tmp_path):
    from _results import result_row, write_results
    from quantcal.report import html as report

    rows = [
        result_row("net", "fp32", "none", 0.147, 0, 0, 0, mean_confidence=0.99),
        result_row("net", "fp32", "temperature", 0.014, 0, 0, 0),
        result_row("net", "W8A8", "none", 0.146, -0.001, -0.004, 0.002, mean_confidence=0.99),
        result_row("net", "W8A8", "temperature", 0.008, 0, -0.005, 0.005),
    ]
    write_results(tmp_path, rows)
    text = report.write_report(tmp_path).read_text()
    assert "class='badge asfp32'>✔ as trustworthy as fp32, which is not: recalibrate<" in text
    assert "temperature → 0.8 %, fitted on val" in text
    assert "an ECE of at most 5 % whatever fp32" in text


def test_max_ece_is_a_study_key():
    from quantcal import study

    assert study.load_study(None).max_ece == 0.05
    assert study.load_study(None, {"report.max_ece": 0.1}).to_toml_dict()["report"] == {
        "max_accuracy_drop": 0.01,
        "max_ece_rise": 0.01,
        "max_ece": 0.1,
    }
    with pytest.raises(ValueError, match=r"report\.max_ece must be a number in"):
        study.load_study(None, {"report.max_ece": 1.5})
    with pytest.raises(ValueError, match="max_ece must be a fraction"):
        Budget(max_ece=-0.1)


# ---------------------------------------------------------------------------------------------
# 3. The ≈ mark follows the paired interval of the difference that decided
# ---------------------------------------------------------------------------------------------
def test_borderline_follows_the_paired_interval_not_the_cells_own():
    fp32 = [_row("fp32", "none", 0.99, 0.013)]
    # its own interval [0.5, 2.5] % crosses fp32 + 1 = 2.3 %; the paired one does not
    quiet = _row("W8A8", "none", 0.99, 0.0132, half=0.01, **_paired(0.0002, -0.0062, 0.0032))
    v = _one([*fp32, quiet])
    assert v.outcome == "safe as is" and not v.borderline
    assert "ΔECE vs fp32 +0.02 [-0.62, +0.32] points (paired)" in v.basis
    # a tight own interval, but the paired difference straddles the +1 line
    near = _row("W8A8", "none", 0.99, 0.022, half=0.0005, **_paired(0.009, 0.004, 0.014))
    v = _one([*fp32, near])
    assert v.outcome == "safe as is" and v.borderline
    assert v.basis.startswith("ΔECE vs fp32 +0.90 [+0.40, +1.40] points (paired)")
    # no paired column: the cell's own interval, and the basis says so
    v = _one([*fp32, _row("W8A8", "none", 0.99, 0.022)])
    assert v.borderline and "its own interval: no ece_diff_vs_fp32" in v.basis


def test_borderline_after_recalibration_uses_the_recalibrated_paired_difference():
    fp32 = [_row("fp32", "none", 0.9, 0.03), _row("fp32", "temperature", 0.9, 0.02)]
    raw = _row("W4A4", "none", 0.9, 0.10)
    ts = _row("W4A4", "temperature", 0.9, 0.028, half=0.02, **_paired(0.008, 0.006, 0.009))
    v = _one([*fp32, raw, ts])
    assert v.outcome == "safe after recalibration" and not v.borderline
    assert "ΔECE vs fp32, both with temperature, +0.80 [+0.60, +0.90] points (paired)" in v.basis
    ts.update(_paired(0.008, 0.002, 0.014))
    assert _one([*fp32, raw, ts]).borderline
    # fp32's best is another recalibrator: no paired column for that difference, said so
    fp32.append(_row("fp32", "histogram", 0.9, 0.019))
    v = _one([*fp32, raw, ts])
    assert "fp32's best is with histogram" in v.basis and v.borderline


# ---------------------------------------------------------------------------------------------
# 4. Recalibrators fitted where they can be trusted
# ---------------------------------------------------------------------------------------------
def test_fit_notes_name_small_fits_and_fits_that_raised_ece():
    assert recal.min_fit_images("temperature") == 500
    assert recal.min_fit_images("vector", 10) == 1000  # 2·C parameters, 50 images each
    assert recal.min_fit_images("none") == 0
    assert recal.fit_notes("temperature", 5000, 10, (-0.01, -0.02, 0.0)) == []
    (small,) = recal.fit_notes("temperature", 180, 10)
    assert "fitted on 180 images, fewer than the 500" in small
    (worse,) = recal.fit_notes("temperature", 5000, 10, (0.012, 0.003, 0.019))
    assert "raised the held-out ECE by +1.20 [+0.30, +1.90] points" in worse
    assert recal.keeps_predictions("temperature") and not recal.keeps_predictions("vector")


def _small_val_rows():
    rows = [
        _row("fp32", "none", 0.97, 0.012, n_fit=None),
        _row("fp32", "temperature", 0.97, 0.014, n_fit=180, temperature=1.1),
    ]
    for p, raw, ts, d in (
        ("W8A8", 0.013, 0.025, (0.012, 0.003, 0.019)),  # T = 0.39: measurably worse
        ("W4A8", 0.015, 0.017, (0.002, -0.004, 0.008)),  # worse, within noise
        ("W4A4", 0.050, 0.020, (-0.030, -0.040, -0.020)),  # helped
    ):
        rows += [
            _row(p, "none", 0.97, raw),
            _row(
                p,
                "temperature",
                0.97,
                ts,
                n_fit=180,
                temperature=0.39,
                **_paired(*d, key="ece_diff_vs_none"),
            ),
        ]
    return rows


def test_a_small_val_fit_that_raised_ece_is_flagged_and_not_a_repair():
    rows = _small_val_rows()
    by = {v.precision: v for v in verdicts(rows)}
    w8 = by["W8A8"]
    assert any("raised the held-out ECE" in n for n in w8.notes)
    assert any("fitted on 180 images, fewer than the 500" in n for n in w8.notes)
    assert w8.outcome == "safe as is"  # judged as is; temperature is not what makes it safe
    w4 = by["W4A4"]
    assert w4.outcome == "safe after recalibration" and w4.recal == "temperature"
    assert "fitted on only 180 images, under the 500 trusted" in w4.reason
    lines = summary(rows)
    assert any("temperature on 180 images (500 needed) in 4 cell(s)" in s for s in lines)
    assert any("measurably raised the held-out ECE in 1 cell(s) (net@1 W8A8)" in s for s in lines)


def test_a_fit_that_raised_ece_does_not_repair_even_when_under_the_line():
    fp32 = [_row("fp32", "none", 0.9, 0.02)]
    raw = _row("W8A8", "none", 0.9, 0.040)
    worse = _row("W8A8", "isotonic", 0.9, 0.025, **_paired(0.01, 0.002, 0.02, "ece_diff_vs_none"))
    v = _one([*fp32, raw, worse], Budget(max_ece_rise=0.01))
    assert v.outcome == "not safe: confidence cannot be repaired"
    assert "isotonic raised the held-out ECE" in v.reason


def test_claim3_counts_the_cells_temperature_made_worse_and_is_not_supported():
    # Raised in 2 of 3 cells, measurably in 1: most rises are within noise, so undecided.
    c = claims.temperature_scaling_helps(_small_val_rows())
    assert c.verdict.startswith("undecided: it raised ECE in 2 of 3 cells (1 measurably")
    assert "fitted on 180 images in 3 of 3 cells" in c.verdict
    assert any("net@1 W8A8 (measurably), net@1 W4A8" in e for e in c.evidence)
    # Measurably raised in 2 of 3: not supported.
    rows = _small_val_rows()
    for r in rows:
        if r["precision"] == "W4A8" and r["recal"] == "temperature":
            r.update(_paired(0.006, 0.001, 0.012, key="ece_diff_vs_none"))
    c = claims.temperature_scaling_helps(rows)
    assert c.verdict.startswith("not supported: it raised ECE in 2 of 3 cells (2 measurably")
    # mostly helped: the usual verdict, with the cells it made worse counted
    rows = [r for r in _small_val_rows() if r["precision"] != "W4A8"]
    rows += [
        _row("W4A2", "none", 0.9, 0.08),
        _row("W4A2", "temperature", 0.9, 0.03, **_paired(-0.05, -0.06, -0.04, "ece_diff_vs_none")),
    ]
    c = claims.temperature_scaling_helps(rows)
    assert not c.verdict.startswith("not supported")
    assert "it raised ECE in 1 of 3 cells (1 measurably" in c.verdict


# ---------------------------------------------------------------------------------------------
# 5. The why-section and the headings agree with their numbers
# ---------------------------------------------------------------------------------------------
def _diagnostic(t_star=13.4):
    temps = [0.1 * 1.1**i for i in range(61)]
    return {
        "dataset": "d",
        "arch": "net",
        "width": 1.0,
        "objective": "ce",
        "precision": "W4A4",
        "fit_split": "val",
        "temperatures": temps,
        "nll": [abs(math.log(t / t_star)) + 1.0 for t in temps],
        "t_star": t_star,
        "nll_star": 1.0,
        "nll_rise_at_1.5x": 0.4,
        "gap": {
            "gap_fp32": 0.01,
            "gap_q": 0.055,
            "accuracy_term": 0.005,
            "confidence_term": 0.04,
            "accuracy_fp32": 0.9,
            "accuracy_q": 0.895,
            "confidence_fp32": 0.91,
            "confidence_q": 0.95,
        },
        "flips": [
            {
                "lo": 0.0,
                "hi": 1.0,
                "n": 10,
                "share": 1.0,
                "flipped": 0.1,
                "right_to_wrong": 0.1,
                "wrong_to_right": 0.0,
            }
        ],
        "histogram_fp32": [1, 2, 3],
        "histogram_q": [1, 1, 4],
    }


def test_why_prints_the_fitted_temperature_not_the_grid_minimum():
    d = _diagnostic()
    text = _nll_sentence(d, 13.2)
    assert "fitted temperature T = 13.2" in text and "13.4" not in text
    assert "no temperature was fitted" in _nll_sentence(d, None)
    rows = [
        _row("fp32", "none", 0.9, 0.01),
        _row("W4A4", "none", 0.9, 0.20),
        _row("W4A4", "temperature", 0.9, 0.15, temperature=13.2),
    ]
    html, figs = why_section(rows, {"diagnostics": [d]}, Budget())
    body = html.split("<figure>")[0]
    assert "T = 13.2" in body and "13.4" not in body and len(figs) == 1


@pytest.mark.parametrize(
    ("acc", "conf", "gap_q", "says", "never"),
    [
        (0.005, 0.040, 0.055, "confidence distortion", "hardly moved"),  # +4.5 points
        (0.060, -0.010, 0.060, "accuracy collapse", "hardly moved"),
        (0.000, 0.004, 0.014, "hardly moved", "distortion"),
        (0.100, -0.097, 0.013, "fell together", "collapse"),
        (0.000, -0.030, -0.020, "under-confident", "hardly moved"),
        (-0.010, -0.020, 0.010, "less over-confident than fp32", "hardly moved"),
    ],
)
def test_the_gap_sentence_agrees_with_the_change(acc, conf, gap_q, says, never):
    g = {
        "gap_fp32": gap_q - acc - conf,
        "gap_q": gap_q,
        "accuracy_term": acc,
        "confidence_term": conf,
        "accuracy_fp32": 0.9,
        "accuracy_q": 0.9 - acc,
        "confidence_fp32": 0.9,
        "confidence_q": 0.9 + conf,
    }
    text = _decomposition(g, "W4A4")
    assert says in text and never not in text


def test_refit_or_reuse_takes_no_side_and_counts_both():
    rows = [_row("fp32", "none", 0.9, 0.02), _row("fp32", "temperature", 0.9, 0.015)]
    for p, reuse, refit in (("W8A8", 0.010, 0.020), ("W4A8", 0.011, 0.012), ("W4A4", 0.05, 0.03)):
        rows += [
            _row(p, "none", 0.9, 0.04),
            _row(p, "temperature", 0.9, refit, temperature=1.3),
            _row(p, "temperature_fp32", 0.9, reuse, temperature=1.1),
        ]
    c = claims.refit_temperature(rows)
    assert "rather than" not in c.statement and "or reuse" in c.statement
    assert c.verdict == (
        "see the numbers: refitting lower in 1 of 3 cells, reusing in 2 (reusing the fp32 "
        "temperature did better more often)"
    )


def test_attribution_names_the_worst_layers_kind_and_gives_accuracy_back_as_a_gain():
    from quantcal.quant.attribution import AttributionResult, LayerAttribution

    def layer(name, kind, nll, acc=0.0):
        return LayerAttribution(
            name,
            kind,
            (name,),
            alone_nll=nll,
            alone_ece=nll / 10,
            alone_accuracy=-acc,
            recovery_nll=nll / 2,
            recovery_ece=nll / 20,
            recovery_accuracy=-acc,  # quantized − all-but-this-layer: negative is a gain
        )

    res = AttributionResult(
        "W4A4",
        "layer",
        100,
        15,
        {"nll": 0.3, "ece": 0.02, "accuracy": 0.9},
        {"nll": 0.9, "ece": 0.2, "accuracy": 0.6},
        [
            layer("conv1", "conv 3x3", 0.5, acc=0.05),
            *(layer(f"layer1.{i}.conv", "conv 3x3", 0.01) for i in range(3)),
            layer("fc", "linear", 0.3),
        ],
    )
    rec = {"dataset": "d", "arch": "net", "width": 1.0, "objective": "ce", "seed": 0}
    c = claims.attribution_layer_types([], {"attribution": [{**rec, **res.as_dict()}]})
    head, line = c.evidence
    assert "largest mean NLL rise per layer" in head and "linear in 1 of 1" in head
    assert "the single most harmful layer is conv1 (conv 3x3" in line
    assert "a conv 3x3 layer: linear layers lead only on average" in line
    assert "+5.0 points of accuracy" in line and "+0.250 nats of NLL" in line
