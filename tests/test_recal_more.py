"""quantcal.recal, the rules the broad tests in test_recal.py leave open.

Each test pins one documented rule of ``quantcal.recal`` (module and class docstrings): the
parameter counts and trust thresholds of "When a fit can be trusted", the temperature solver's
documented bounds, evaluation counts and warnings, the state-dict round trip ("rebuilds an
identical recalibrator", plain JSON), and the clear errors on bad input. References are
re-derived here (closed-form optima, finite differences of a numpy NLL, counted NLL
evaluations), never read back from the code under test.
"""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch

import _refs
from quantcal.calibration import recal, recal_scaling, recal_splits
from quantcal.training import images as _images


def _nll(z, y, t):
    return _refs.nll(np.asarray(z, dtype=np.float64) / t, np.asarray(y))


def _dnll_dlogt(z, y, t, h=1e-5):
    """Central difference of the numpy NLL in log T (independent of the solver)."""
    return (_nll(z, y, t * math.exp(h)) - _nll(z, y, t * math.exp(-h))) / (2 * h)


def _fit_recording(r, z, y):
    """Fit, returning the warnings raised (all of them, recorded)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r.fit(z, y)
    return r, caught


def _one(caught, category=RuntimeWarning, *, from_fit=False):
    """The one warning recorded, its category checked. ``from_fit``: raised by ``fit`` itself,
    which points it at its caller (stacklevel), so it is not attributed to a recal module."""
    assert len(caught) == 1, [str(w.message) for w in caught]
    w = caught[0]
    assert w.category is category
    if from_fit:
        assert not w.filename.endswith(("recal.py", "recal_scaling.py", "recal_toplabel.py")), (
            w.filename
        )
    return str(w.message)


def _counting_ts_terms(monkeypatch):
    """Count NLL evaluations: ``n_iter`` is documented as the number of NLL evaluations."""
    calls = []
    real = recal_scaling._ts_terms

    def counted(*args):
        calls.append(args[-1])
        return real(*args)

    monkeypatch.setattr(recal_scaling, "_ts_terms", counted)
    return calls


def _two_class(n_right, n_wrong, gap):
    """C = 2 rows with logits (gap, 0): label 0 on ``n_right`` rows, 1 on ``n_wrong`` rows.

    NLL(β) = p·log(1 + e^{−gβ}) + (1 − p)·log(1 + e^{gβ}): the optimum is σ(gβ*) = p, i.e.
    T* = g / log(n_right / n_wrong).
    """
    n = n_right + n_wrong
    z = torch.zeros(n, 2, dtype=torch.float64)
    z[:, 0] = gap
    y = torch.zeros(n, dtype=torch.long)
    y[n_right:] = 1
    return z, y


# ----------------------------------------------------------------------------------------------
# "When a fit can be trusted": parameter counts, minimum images, notes
# ----------------------------------------------------------------------------------------------
def test_fit_parameters_count_what_each_recalibrator_fits():
    """none 0, temperature (and the fp32 temperature reused) 1, vector 2·C, matrix C² + C,
    histogram and isotonic 15; None for an unknown C or an unknown name."""
    assert recal.fit_parameters("none") == 0
    assert recal.fit_parameters("temperature") == 1
    assert recal.fit_parameters("temperature_fp32") == 1
    assert recal.fit_parameters("vector", 10) == 20
    assert recal.fit_parameters("vector", 3) == 6
    assert recal.fit_parameters("matrix", 10) == 110
    assert recal.fit_parameters("matrix", 3) == 12
    assert recal.fit_parameters("vector") is None and recal.fit_parameters("matrix") is None
    assert recal.fit_parameters("histogram", 10) == 15 == recal.fit_parameters("isotonic")
    assert recal.fit_parameters("no_such_method", 10) is None


def test_min_fit_images_is_500_and_50_per_parameter():
    """max(500, 50·k); 500 when k is unknown; 0 for none."""
    assert recal.min_fit_images("none", 10) == 0
    assert recal.min_fit_images("temperature") == 500
    assert recal.min_fit_images("temperature_fp32") == 500
    assert recal.min_fit_images("histogram") == 750 == recal.min_fit_images("isotonic")
    assert recal.min_fit_images("vector", 10) == 1000  # 50 · 20
    assert recal.min_fit_images("vector", 3) == 500  # 50 · 6 = 300 < 500
    assert recal.min_fit_images("matrix", 10) == 5500  # 50 · 110
    assert recal.min_fit_images("vector") == 500  # C unknown
    assert recal.min_fit_images("no_such_method", 10) == 500


def test_keeps_predictions_follows_preserves_argmax():
    assert recal.keeps_predictions("temperature_fp32") is True
    for name in ("none", "temperature", "histogram", "isotonic"):
        assert recal.keeps_predictions(name) is True
    for name in ("vector", "matrix", "no_such_method"):
        assert recal.keeps_predictions(name) is False


def test_fit_notes_flag_small_fits_with_what_was_fitted():
    assert recal.fit_notes("none", n_fit=1, n_classes=10, ece_diff_vs_none=(0.1, 0.05, 0.2)) == []
    assert recal.fit_notes("temperature") == []
    assert recal.fit_notes("temperature", n_fit=500) == []  # exactly the minimum is trusted
    (note,) = recal.fit_notes("temperature", n_fit=499)
    assert note.startswith("temperature was fitted on 499 images, fewer than the 500 this report")
    assert "(at least 500, and 50 per fitted parameter; it fits 1 parameter)" in note
    assert (
        "a larger recalibration split settles it (data.val_size; when cross-fitted on test, "
        "a larger test split)" in note
    )
    (note,) = recal.fit_notes("vector", n_fit=999, n_classes=10)
    assert "fewer than the 1000 this report trusts" in note and "it fits 20 parameters)" in note
    assert recal.fit_notes("vector", n_fit=1000, n_classes=10) == []
    (note,) = recal.fit_notes("vector", n_fit=100)  # C unknown: the count is not stated
    assert "fewer than the 500 this report trusts" in note and "it fits parameters)" in note
    (note,) = recal.fit_notes("histogram", n_fit=700, n_classes=10)
    assert "fewer than the 750" in note and "it fits 15 parameters)" in note


def test_fit_notes_flag_an_ece_rise_whose_interval_lies_above_zero():
    (note,) = recal.fit_notes("matrix", ece_diff_vs_none=(0.0123, 0.0111, 0.0206))
    assert note.startswith(
        "matrix raised the held-out ECE by +1.23 [+1.11, +2.06] points vs no recalibration (paired)"
    )
    assert note.endswith("over to the test images, and no verdict counts it as a repair")
    assert recal.fit_notes("matrix", ece_diff_vs_none=(0.01, 0.0, 0.02)) == []  # lo = 0
    assert recal.fit_notes("matrix", ece_diff_vs_none=(0.01, -0.001, 0.02)) == []
    for partial in ((None, 0.004, 0.02), (0.01, None, 0.02), (0.01, 0.004, None)):
        assert recal.fit_notes("matrix", ece_diff_vs_none=partial) == []
    both = recal.fit_notes("temperature", n_fit=10, ece_diff_vs_none=(0.02, 0.01, 0.03))
    assert len(both) == 2 and "fitted on 10 images" in both[0] and "raised" in both[1]


# ----------------------------------------------------------------------------------------------
# errors that say what was wrong
# ----------------------------------------------------------------------------------------------
def test_state_dict_errors_name_what_they_got():
    with pytest.raises(
        ValueError,
        match=r"^state must be a dict produced by a recalibrator's "
        r"state_dict\(\)\.$",
    ):
        recal.from_state_dict({"temperature": 2.0})  # a dict without "name"
    with pytest.raises(ValueError, match=r"state must be a dict produced"):
        recal.from_state_dict(["temperature"])
    with pytest.raises(ValueError, match=r"state_dict is for 'none', not 'temperature'"):
        recal.TemperatureScaling.from_state_dict(recal.Identity().state_dict())
    with pytest.raises(ValueError, match=r"state_dict is for 'list', not 'histogram'"):
        recal.HistogramBinning.from_state_dict(["histogram"])


def test_constructor_errors_name_the_bad_argument():
    for cls in (recal.TemperatureScaling, recal.VectorScaling):
        with pytest.raises(ValueError, match=r"tol must be > 0, got 0"):
            cls(tol=0.0)
        with pytest.raises(ValueError, match=r"max_iter must be >= 1, got 0"):
            cls(max_iter=0)
        assert cls(max_iter=1).max_iter == 1  # 1 is allowed
    for bad in (float("inf"), -1.0, float("nan")):
        with pytest.raises(ValueError, match=r"l2 must be a finite number >= 0"):
            recal.MatrixScaling(l2=bad)
    assert recal.MatrixScaling(l2=0.0).l2 == 0.0  # 0 is allowed
    with pytest.raises(ValueError, match=r"unknown binning 'quantile'"):
        recal.HistogramBinning(binning="quantile")


def test_not_fitted_and_wrong_width_errors_name_the_class():
    z = torch.randn(50, 4, dtype=torch.float64)
    y = torch.arange(50) % 4
    with pytest.raises(recal.NotFittedError, match=r"^TemperatureScaling is not fitted"):
        recal.TemperatureScaling()(z)
    r = recal.VectorScaling().fit(z, y)
    with pytest.raises(
        ValueError,
        match=r"^VectorScaling was fitted on C = 4 classes but got "
        r"logits with 3 columns",
    ):
        r(z[:, :3])
    again = recal.from_state_dict(json.loads(json.dumps(r.state_dict())))
    with pytest.raises(ValueError, match=r"^VectorScaling was fitted on C = 4 classes"):
        again(z[:, :3])  # the rebuilt one knows its C too


def test_non_finite_rows_are_counted_in_the_error():
    z = torch.randn(30, 4, dtype=torch.float64)
    y = torch.arange(30) % 4
    bad = z.clone()
    bad[3, 1] = float("nan")
    bad[7, 0] = float("inf")
    bad[7, 2] = float("nan")  # a second bad entry in the same row counts once
    with pytest.raises(ValueError, match=r"NaN or Inf in 2 of 30 rows"):
        recal.TemperatureScaling().fit(bad, y)
    r = recal.Identity().fit(z, y)
    with pytest.raises(ValueError, match=r"NaN or Inf in 2 of 30 rows"):
        r(bad)


def test_repr_names_the_class():
    assert repr(recal.TemperatureScaling.fixed(2.0)).startswith("TemperatureScaling({")


# ----------------------------------------------------------------------------------------------
# state dicts: plain JSON, and an identical recalibrator back
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name", ["none", "temperature", "vector", "matrix", "histogram", "isotonic"]
)
def test_unfitted_state_is_strict_json_and_rebuilds_unfitted(name):
    r = recal.get(name)()
    state = r.state_dict()
    text = json.dumps(state, allow_nan=False)  # plain JSON: no NaN
    again = recal.from_state_dict(json.loads(text))
    assert again.state_dict() == state
    with pytest.raises(recal.NotFittedError):
        again(torch.zeros(3, 4))
    if "converged" in state:
        assert state["converged"] is False and state["n_iter"] == 0  # nothing has run yet
    if name == "none":
        assert state["fitted"] is False
    if name == "temperature":
        assert state["temperature"] is None and state["nll"] is None
        assert state["grad_log_t"] is None
        assert math.isnan(again.nll) and math.isnan(again.grad_log_t)


def test_temperature_state_round_trip_keeps_every_attribute():
    z, y = _two_class(80, 20, gap=3.0)
    ts = recal.TemperatureScaling(tol=1e-3, max_iter=7).fit(z, y)
    assert ts.converged and ts.n_iter >= 1
    state = json.loads(json.dumps(ts.state_dict(), allow_nan=False))
    again = recal.from_state_dict(state)
    for attr in ("temperature", "n_iter", "grad_log_t", "converged", "nll", "tol", "max_iter"):
        assert getattr(again, attr) == getattr(ts, attr), attr
    assert again.tol == 1e-3 and again.max_iter == 7
    # a minimal state (just the temperature) rebuilds with the defaults and claims no fit
    bare = recal.TemperatureScaling.from_state_dict({"name": "temperature", "temperature": 2.0})
    default = recal.TemperatureScaling()
    assert (bare.tol, bare.max_iter) == (default.tol, default.max_iter)
    assert bare.n_iter == 0 and bare.converged is False
    assert math.isnan(bare.nll) and math.isnan(bare.grad_log_t)
    torch.testing.assert_close(bare(z), z / 2.0, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["vector", "matrix"])
def test_affine_state_round_trip_keeps_every_attribute(name):
    g = torch.Generator().manual_seed(5)
    z = torch.randn(120, 3, generator=g, dtype=torch.float64) * 2
    y = torch.arange(120) % 3
    r = recal.get(name)(l2=1e-3, tol=1e-5, max_iter=400).fit(z, y)
    state = json.loads(json.dumps(r.state_dict(), allow_nan=False))
    again = recal.from_state_dict(state)
    assert (again.l2, again.tol, again.max_iter) == (1e-3, 1e-5, 400)
    assert again.n_iter == r.n_iter >= 1 and again.converged is True
    assert again.grad_max == r.grad_max and again.n_classes == 3
    assert torch.equal(again(z), r(z))
    bare = recal.get(name).from_state_dict(
        {k: state[k] for k in ("name", "l2", "tol", "max_iter", "weight", "bias", "grad_max")}
    )
    assert bare.n_iter == 0 and bare.converged is False  # no diagnostics: claims no fit


def test_histogram_state_round_trip_keeps_bins_and_binning():
    z, y = _refs.calibrated_logits(300, 3, seed=1)
    r = recal.HistogramBinning(n_bins=7, binning="width").fit(z, y)
    again = recal.from_state_dict(json.loads(json.dumps(r.state_dict(), allow_nan=False)))
    assert again.n_bins == 7 and again.binning == "width"
    np.testing.assert_array_equal(again.values, r.values)
    np.testing.assert_array_equal(again.edges, r.edges)


def test_identity_state_records_fitted():
    z, y = torch.zeros(4, 2), torch.tensor([0, 1, 0, 1])
    assert recal.Identity().fit(z, y).state_dict() == {"name": "none", "fitted": True}


# ----------------------------------------------------------------------------------------------
# temperature scaling: the documented bounds, evaluations and warnings
# ----------------------------------------------------------------------------------------------
def test_temperature_constant_rows_give_t_1_without_solving(monkeypatch):
    """Constant rows (each its own constant): T = 1, no evaluation, converged, NLL = log C."""
    calls = _counting_ts_terms(monkeypatch)
    z = torch.arange(12, dtype=torch.float64)[:, None].repeat(1, 3)  # row i is all i
    y = torch.arange(12) % 3
    ts, caught = _fit_recording(recal.TemperatureScaling(), z, y)
    msg = _one(caught, from_fit=True)
    assert msg == (
        "temperature scaling: every logit row is constant, so every T gives the "
        "same NLL; using T = 1."
    )
    assert ts.temperature == 1.0 and ts.n_iter == 0 == len(calls)
    assert ts.converged is True and ts.grad_log_t == 0.0
    assert ts.nll == pytest.approx(math.log(3), abs=1e-15)


def test_temperature_separable_data_stop_at_t_min_with_its_gradient(monkeypatch):
    """Every label on its row's top logit (rows with different maxima and small margins)."""
    calls = _counting_ts_terms(monkeypatch)
    g = torch.Generator().manual_seed(3)
    y = torch.arange(40) % 4
    z = torch.randn(40, 4, generator=g, dtype=torch.float64) * 0.01 + 5 * torch.arange(40)[:, None]
    z[torch.arange(40), y] = z.amax(1) + 0.02 * torch.rand(40, generator=g, dtype=torch.float64)
    ts, caught = _fit_recording(recal.TemperatureScaling(), z, y)
    msg = _one(caught, from_fit=True)
    assert msg.startswith(
        "temperature scaling: the validation data are separable (every label has the top logit"
    )
    assert msg.endswith("using the bound T = 0.01.")
    assert ts.temperature == recal.T_MIN and ts.converged is False
    assert ts.n_iter == 1 == len(calls)  # one NLL evaluation, at the bound
    assert ts.nll == pytest.approx(_nll(z, y, 0.01), rel=1e-12)
    d = _dnll_dlogt(z, y, 0.01)
    assert abs(d) > 1e-3  # the data make the gradient at the bound clearly non-zero
    assert ts.grad_log_t == pytest.approx(d, rel=1e-5)


def test_temperature_uninformative_logits_stop_at_t_max_with_its_gradient(monkeypatch):
    """NLL'(β → 0) = mean(mean_k z − z_y) ≥ 0 (here in [0, 1), rows at different levels)."""
    calls = _counting_ts_terms(monkeypatch)
    g = torch.Generator().manual_seed(4)
    y = torch.arange(30) % 3
    z = torch.randn(30, 3, generator=g, dtype=torch.float64) * 0.3 + 7 * torch.arange(30)[:, None]
    z[torch.arange(30), y] = z.amin(1) - 0.1  # the label always has the lowest logit
    assert 0 <= float((z.mean(1) - z[torch.arange(30), y]).mean()) < 1
    ts, caught = _fit_recording(recal.TemperatureScaling(), z, y)
    msg = _one(caught, from_fit=True)
    assert msg.startswith(
        "temperature scaling: the logits are no better than uniform (NLL keeps falling as T grows)"
    )
    assert msg.endswith("using the bound T = 100.")
    assert ts.temperature == recal.T_MAX and ts.converged is False
    assert ts.n_iter == 1 == len(calls)
    assert ts.nll == pytest.approx(_nll(z, y, 100.0), rel=1e-12)
    d = _dnll_dlogt(z, y, 100.0)
    assert abs(d) > 1e-4
    assert ts.grad_log_t == pytest.approx(d, rel=1e-4)


def test_temperature_exactly_uninformative_logits_are_detected_before_solving(monkeypatch):
    """NLL'(0) = 0 exactly (the ≥ of the rule): the bound, one evaluation, no solve."""
    calls = _counting_ts_terms(monkeypatch)
    z, y = _two_class(25, 25, gap=2.0)  # NLL(β) = log 2cosh(β): optimum at β = 0
    ts, caught = _fit_recording(recal.TemperatureScaling(), z, y)
    assert "using the bound T = 100." in _one(caught, from_fit=True)
    assert ts.temperature == recal.T_MAX and ts.n_iter == 1 == len(calls)


def test_temperature_interior_optimum_beyond_t_max_stops_at_the_bound(monkeypatch):
    """Slightly informative logits: T* = g / log(p/(1−p)) ≈ 500 > T_MAX. The solver stops at
    T_MAX with a warning that names the reason; n_iter counts every NLL evaluation."""
    calls = _counting_ts_terms(monkeypatch)
    z, y = _two_class(501, 499, gap=2.0)
    ts, caught = _fit_recording(recal.TemperatureScaling(), z, y)
    msg = _one(caught)
    assert msg == (
        "temperature scaling: the logits are no better than uniform (NLL keeps "
        "falling as T grows); stopping at the bound T = 100."
    )
    assert ts.temperature == recal.T_MAX and ts.converged is False
    assert ts.n_iter == len(calls)
    assert ts.nll == pytest.approx(_nll(z, y, 100.0), rel=1e-12)
    assert ts.grad_log_t == pytest.approx(_dnll_dlogt(z, y, 100.0), rel=1e-4)


def test_temperature_interior_optimum_below_t_min_stops_at_the_bound(monkeypatch):
    """One wrong row with a tiny margin, many right rows with margin 0.1: β* ≈ 160 > 1/T_MIN."""
    calls = _counting_ts_terms(monkeypatch)
    z, y = _two_class(100, 1, gap=0.1)
    z[-1, 0] = 1e-6
    ts, caught = _fit_recording(recal.TemperatureScaling(), z, y)
    msg = _one(caught)
    assert msg == (
        "temperature scaling: the validation data look separable (NLL keeps falling "
        "as T -> 0); stopping at the bound T = 0.01."
    )
    assert ts.temperature == recal.T_MIN and ts.converged is False
    assert ts.n_iter == len(calls)
    assert ts.nll == pytest.approx(_nll(z, y, 0.01), rel=1e-12)
    assert ts.grad_log_t == pytest.approx(_dnll_dlogt(z, y, 0.01), rel=1e-4)


def test_temperature_optimum_near_t_max_is_interior_at_float_resolution():
    """A tolerance nothing reaches: the bracket collapses at the interior optimum, which is
    returned as converged (no warning) — also close to the bound, T* ≈ 55."""
    z, y = _two_class(700, 300, gap=math.log(7 / 3) * 55.0)  # T* = 55 exactly
    ts, caught = _fit_recording(recal.TemperatureScaling(tol=1e-300), z, y)
    assert caught == []
    assert ts.converged is True and ts.temperature == pytest.approx(55.0, rel=1e-9)
    z, y = _two_class(700, 300, gap=math.log(7 / 3) * 0.02)  # T* = 0.02, near T_MIN
    ts, caught = _fit_recording(recal.TemperatureScaling(tol=1e-300), z, y)
    assert caught == []
    assert ts.converged is True and ts.temperature == pytest.approx(0.02, rel=1e-9)


def test_temperature_newton_survives_a_zero_curvature_start():
    """Margins of 760 underflow every softmax at β = 1 (NLL'' = 0 there): the safeguard
    bisects instead of dividing by zero and still finds T* = g / log(n_right / n_wrong)."""
    z, y = _two_class(3000, 1, gap=760.0)
    ts, caught = _fit_recording(recal.TemperatureScaling(), z, y)
    assert caught == []
    assert ts.converged and ts.temperature == pytest.approx(760.0 / math.log(3000), rel=1e-8)


def test_temperature_newton_needs_few_evaluations(monkeypatch):
    """Newton's method on the convex NLL: a handful of evaluations, each counted in n_iter."""
    calls = _counting_ts_terms(monkeypatch)
    for gap in (0.5, 4.0, 40.0):
        t_star = gap / math.log(80 / 20)
        calls.clear()
        z, y = _two_class(80, 20, gap=gap)
        ts, caught = _fit_recording(recal.TemperatureScaling(), z, y)
        assert caught == []
        assert ts.temperature == pytest.approx(t_star, rel=1e-9)
        assert ts.n_iter == len(calls) <= 12, (gap, ts.n_iter)
        assert abs(ts.grad_log_t) <= 1e-10


def test_temperature_stops_after_max_iter_evaluations_with_a_warning(monkeypatch):
    calls = _counting_ts_terms(monkeypatch)
    z, y = _two_class(80, 20, gap=40.0)
    ts, caught = _fit_recording(recal.TemperatureScaling(max_iter=2), z, y)
    msg = _one(caught)
    assert ts.n_iter == 2 == len(calls) and ts.converged is False
    assert abs(ts.grad_log_t) > 1e-3
    assert msg == (
        f"temperature scaling did not converge in 2 evaluations (|dNLL/dlogT| = "
        f"{abs(ts.grad_log_t):.3g})."
    )
    calls.clear()
    ts, caught = _fit_recording(recal.TemperatureScaling(max_iter=1), z, y)
    assert "did not converge in 1 evaluations" in _one(caught)
    assert ts.n_iter == 1 == len(calls) and ts.converged is False


def test_temperature_not_converged_reports_nll_and_gradient_at_its_temperature():
    z, y = _two_class(80, 20, gap=40.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ts = recal.TemperatureScaling(max_iter=2).fit(z, y)
    assert ts.nll == pytest.approx(_nll(z, y, ts.temperature), rel=1e-9)
    assert ts.grad_log_t == pytest.approx(_dnll_dlogt(z, y, ts.temperature), rel=1e-4)


def test_temperature_gradient_has_the_sign_of_dnll_dlogt():
    """A loose tolerance stops before the optimum: grad_log_t is dNLL/d log T there."""
    z, y = _two_class(80, 20, gap=40.0)
    ts = recal.TemperatureScaling(tol=1e-2).fit(z, y)
    d = _dnll_dlogt(z, y, ts.temperature)
    assert ts.converged and abs(d) > 1e-6
    assert ts.grad_log_t == pytest.approx(d, rel=1e-3)


def test_temperature_fixed_accepts_any_positive_t():
    z = torch.tensor([[1.0, -2.0, 0.5]])
    torch.testing.assert_close(recal.TemperatureScaling.fixed(0.5)(z), z * 2, rtol=0, atol=0)


def test_temperature_half_input_is_scaled_in_float32():
    """float32 output for non-float64 input: half logits are divided in float32, not half."""
    z = torch.tensor([[1.0, 2.0, 3.0], [0.1, 0.7, -0.3]]).half()
    out = recal.TemperatureScaling.fixed(3.0)(z)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, z.float() / 3.0, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# vector and matrix scaling
# ----------------------------------------------------------------------------------------------
def test_affine_fit_when_the_last_class_never_occurs():
    """The ridge keeps the problem well posed "also when a class never occurs in val"."""
    g = torch.Generator().manual_seed(6)
    z = torch.randn(90, 4, generator=g, dtype=torch.float64)
    y = torch.arange(90) % 3  # class 3 never occurs
    for name in ("vector", "matrix"):
        r = recal.get(name)().fit(z, y)
        assert r.converged and r.n_classes == 4 and r(z).shape == (90, 4)
        assert float(torch.softmax(r(z), 1)[:, 3].mean()) < 0.05  # learns that 3 is rare


def test_affine_n_iter_counts_the_lbfgs_iterations(monkeypatch):
    import scipy.optimize

    runs = []
    real = scipy.optimize.minimize

    def recording(*args, **kwargs):
        res = real(*args, **kwargs)
        runs.append(int(res.nit))
        return res

    monkeypatch.setattr(scipy.optimize, "minimize", recording)
    g = torch.Generator().manual_seed(7)
    z = torch.randn(100, 3, generator=g, dtype=torch.float64) * 3
    y = torch.arange(100) % 3
    r = recal.VectorScaling().fit(z, y)
    assert r.converged and len(runs) == 1 and r.n_iter == runs[0] >= 1


def test_affine_warns_when_lbfgs_stops_above_tol(monkeypatch):
    """The RuntimeWarning names the class, the gradient left and the tolerance."""
    g = torch.Generator().manual_seed(8)
    z = torch.randn(100, 3, generator=g, dtype=torch.float64) * 3
    y = torch.arange(100) % 3
    r, caught = _fit_recording(recal.MatrixScaling(max_iter=1), z, y)
    msg = _one(caught, from_fit=True)
    assert r.converged is False and r.grad_max > 1e-6
    assert msg == (
        f"MatrixScaling: L-BFGS stopped with max |gradient| = {r.grad_max:.3g} > 1e-06 "
        f"after {r.n_iter} iterations."
    )
    assert r.n_iter >= 1


def test_affine_lbfgs_runs_at_most_3_times(monkeypatch):
    """The docstring: "L-BFGS runs at most 3 times, the first run and 2 restarts"."""
    import scipy.optimize

    runs = []
    real = scipy.optimize.minimize

    def recording(*args, **kwargs):
        runs.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(scipy.optimize, "minimize", recording)
    g = torch.Generator().manual_seed(8)
    z = torch.randn(100, 3, generator=g, dtype=torch.float64) * 3
    y = torch.arange(100) % 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        recal.MatrixScaling(max_iter=1, tol=1e-300).fit(z, y)
    assert len(runs) == 1 + 2  # the first run and 2 restarts


# ----------------------------------------------------------------------------------------------
# histogram binning
# ----------------------------------------------------------------------------------------------
def test_histogram_defaults_to_15_bins():
    """Histogram binning's default is the 15 bins that "When a fit can be trusted" counts."""
    z, y = _refs.calibrated_logits(3000, 4, seed=2)
    r = recal.HistogramBinning().fit(z, y)
    assert r.values.shape == (15,) and r.edges.shape == (16,)


def test_histogram_width_bins_and_their_edges():
    """Equal-width (lo, hi] bins: edges i/B; a one-sample bin keeps its own accuracy; bins
    above the largest confidence are empty and keep their centres."""
    # C = 2 rows with top-label confidences 0.55 (x4, 2 right), 0.62 (x1, right), 0.66 (x1, wrong)
    conf = np.array([0.55, 0.55, 0.55, 0.55, 0.62, 0.66])
    z = torch.from_numpy(np.stack([np.log(conf / (1 - conf)), np.zeros(6)], 1))
    y = torch.tensor([0, 0, 1, 1, 0, 1])
    r = recal.HistogramBinning(n_bins=10, binning="width").fit(z, y)
    np.testing.assert_allclose(r.edges, np.linspace(0.0, 1.0, 11), rtol=0, atol=1e-15)
    want = (np.arange(10) + 0.5) / 10  # empty bins: centres
    want[5], want[6] = 0.5, 0.5  # (0.5, 0.6]: 2 of 4 right; (0.6, 0.7]: 1 of 2 right
    np.testing.assert_allclose(r.values, want, rtol=0, atol=1e-15)
    one = recal.HistogramBinning(n_bins=20, binning="width").fit(z, y)
    assert one.values[12] == 1.0 and one.values[13] == 0.0  # single samples: their own hit
    # applying uses the same bins: q is the bin's value (clipped to [1/(1 + (1-η)), 1 - η])
    out = torch.softmax(one(z), 1).amax(1).numpy()
    np.testing.assert_allclose(out[4:], [1 - 1e-6, 1 / (1 + (1 - 1e-6))], rtol=0, atol=1e-12)


def test_histogram_width_apply_bins_like_the_metrics():
    """Apply puts a confidence in the bin the fit would: the metrics' rule ceil(B·c(1 − 8ε)) − 1
    (a confidence within a few ulps above an edge belongs to the lower bin)."""
    z, y = _refs.calibrated_logits(500, 3, seed=3)
    r = recal.HistogramBinning(n_bins=10, binning="width").fit(z, y)
    r.values = np.arange(10) / 10.0 + 0.01  # make every bin's value distinct
    conf = np.array([0.5, np.nextafter(0.5, 1.0), 0.55, 0.0, 1.0])
    np.testing.assert_array_equal(r._q(conf), r.values[[4, 4, 5, 0, 9]])


def test_histogram_mass_edges_run_from_0_to_1():
    z, y = _refs.calibrated_logits(400, 3, seed=4)
    r = recal.HistogramBinning(n_bins=8).fit(z, y)
    assert r.edges[0] == 0.0 and r.edges[-1] == 1.0 and r.edges.shape == (9,)


# ----------------------------------------------------------------------------------------------
# quantcal.calibration.recal_splits: which images each recalibrator is fitted on (module docstring)
# ----------------------------------------------------------------------------------------------
def _cell(seed, n=96, c=4, scale=2.5):
    """A logits dict with distinct val and test splits (over-confident, so T > 1)."""
    zv, yv = _refs.calibrated_logits(n, c, seed=seed)
    zt, yt = _refs.calibrated_logits(n, c, seed=seed + 100)
    return {
        "val_logits": torch.from_numpy(zv * scale),
        "val_labels": torch.from_numpy(yv),
        "test_logits": torch.from_numpy(zt * scale),
        "test_labels": torch.from_numpy(yt),
    }


def test_fold_takes_val_from_the_fit_part_and_test_from_the_apply_part():
    d = _cell(0)
    fit_idx, apply_idx = torch.tensor([5, 1, 7]), torch.tensor([0, 2])
    f = recal_splits.fold(d, fit_idx, apply_idx)
    assert set(f) == {"val_logits", "val_labels", "test_logits", "test_labels"}
    assert torch.equal(f["val_logits"], d["test_logits"][[5, 1, 7]])
    assert torch.equal(f["val_labels"], d["test_labels"][[5, 1, 7]])
    assert torch.equal(f["test_logits"], d["test_logits"][[0, 2]])
    assert torch.equal(f["test_labels"], d["test_labels"][[0, 2]])


def test_crossfit_folds_are_the_seeded_test_halves():
    labels = torch.arange(60) % 3
    (a, b), (b2, a2) = recal_splits.crossfit_folds(labels, seed=11)
    ra, rb = _images.test_halves(labels, 11)
    assert torch.equal(a, ra) and torch.equal(b, rb) and torch.equal(a2, ra) and torch.equal(b2, rb)
    again = recal_splits.crossfit_folds(labels, seed=11)
    assert torch.equal(again[0][0], a)
    others = [recal_splits.crossfit_folds(labels, seed=s)[0][0] for s in (12, 13, 14)]
    assert any(not torch.equal(o, a) for o in others)  # the seed matters


def test_fit_and_apply_fits_on_val_and_returns_the_temperature_only_for_temperature():
    fit_on, apply_to = _cell(1), _cell(2)
    z, t = recal_splits.fit_and_apply("temperature", fit_on, apply_to)
    ref = recal.TemperatureScaling().fit(fit_on["val_logits"], fit_on["val_labels"])
    assert isinstance(t, float) and t == ref.temperature
    torch.testing.assert_close(z, apply_to["test_logits"] / ref.temperature, rtol=0, atol=0)
    for name in ("vector", "histogram", "none"):
        z, t = recal_splits.fit_and_apply(name, fit_on, apply_to)
        ref = recal.get(name)().fit(fit_on["val_logits"], fit_on["val_labels"])
        assert t is None and torch.equal(z, ref(apply_to["test_logits"]))


def test_recalibrate_fits_a_quantized_cell_on_its_own_val():
    """A cell that is not the fp32 one is fitted on its own val, not on the fp32 model's."""
    lg, fp32 = _cell(3), _cell(4)
    z, t = recal_splits.recalibrate("vector", lg, fp32)
    ref = recal.VectorScaling().fit(lg["val_logits"], lg["val_labels"])
    assert t is None and torch.equal(z, ref(lg["test_logits"]))
    z, t = recal_splits.recalibrate("temperature", lg, fp32)
    ref = recal.TemperatureScaling().fit(lg["val_logits"], lg["val_labels"])
    assert t == ref.temperature
    torch.testing.assert_close(z, lg["test_logits"] / ref.temperature, rtol=0, atol=0)


def test_recalibrate_the_fp32_cell_uses_the_memoised_fp32_fit():
    fp32 = _cell(5)
    seen = []

    def memo(method, d):
        seen.append((method, d))
        return "memoised", 1.5

    assert recal_splits.recalibrate("matrix", fp32, fp32, fp32_fit=memo) == ("memoised", 1.5)
    assert seen == [("matrix", fp32)]


def test_recalibrate_temperature_fp32_applies_the_fp32_models_temperature():
    lg, fp32 = _cell(6, scale=1.0), _cell(7, scale=4.0)
    t_fp32 = recal.TemperatureScaling().fit(fp32["val_logits"], fp32["val_labels"]).temperature
    t_own = recal.TemperatureScaling().fit(lg["val_logits"], lg["val_labels"]).temperature
    assert abs(t_fp32 - t_own) > 0.5  # the two fits tell the rule apart
    z, t = recal_splits.recalibrate("temperature_fp32", lg, fp32)
    assert isinstance(t, float) and t == t_fp32
    torch.testing.assert_close(z, lg["test_logits"] / t_fp32, rtol=0, atol=0)
    seen = []

    def memo(method, d):  # the runner's memoised fp32 fit is asked for "temperature"
        seen.append((method, d))
        return None, 3.0

    z, t = recal_splits.recalibrate("temperature_fp32", lg, fp32, fp32_fit=memo)
    assert seen == [("temperature", fp32)] and t == 3.0
    torch.testing.assert_close(z, lg["test_logits"] / 3.0, rtol=0, atol=0)


def test_crossfit_temperature_fp32_uses_the_fp32_models_fit_on_the_other_half():
    """Cross-fitted: each half of the quantized model's test gets the fp32 model's T fitted on
    the fp32 model's other half (never its own val, never the quantized model's logits)."""
    lg, fp32 = _cell(8, scale=1.0), _cell(9, scale=4.0)
    folds = recal_splits.crossfit_folds(lg["test_labels"], seed=2)
    (a, b), _ = folds
    notes = []
    z, t = recal_splits.recalibrate("temperature_fp32", lg, fp32, notes, folds=folds)
    ta = recal.TemperatureScaling().fit(fp32["test_logits"][a], fp32["test_labels"][a])
    tb = recal.TemperatureScaling().fit(fp32["test_logits"][b], fp32["test_labels"][b])
    torch.testing.assert_close(z[b], lg["test_logits"][b] / ta.temperature, rtol=0, atol=0)
    torch.testing.assert_close(z[a], lg["test_logits"][a] / tb.temperature, rtol=0, atol=0)
    assert t == pytest.approx((ta.temperature + tb.temperature) / 2, rel=1e-12)
    assert notes == []
    z, t = recal_splits.recalibrate("histogram", lg, fp32, folds=folds)
    assert t is None  # no temperature in either fold
    ha = recal.HistogramBinning().fit(lg["test_logits"][a], lg["test_labels"][a])
    assert torch.equal(z[b], ha(lg["test_logits"][b]))


def test_recalibrate_passes_the_fits_warnings_to_notes_once():
    """Warnings of the fit are appended to notes (each message once), also when cross-fitted."""
    y = torch.arange(40) % 4
    sep = torch.nn.functional.one_hot(y, 4).double() * 3.0  # separable: T at its bound, warned
    d = {"val_logits": sep, "val_labels": y, "test_logits": sep, "test_labels": y}
    notes = ["an earlier note"]
    recal_splits.recalibrate("temperature", d, _cell(10), notes)
    assert notes[0] == "an earlier note" and len(notes) == 2
    assert notes[1].startswith("temperature scaling: the validation data are separable")
    folds = recal_splits.crossfit_folds(y, seed=0)
    notes = []
    recal_splits.recalibrate("temperature", d, _cell(10), notes, folds=folds)
    assert len(notes) == 1 and "separable" in notes[0]  # both folds warn the same: kept once
    recal_splits.recalibrate("temperature", d, d, None)  # no notes list: nothing to append to
