"""quantcal.recal: documented details that tests/test_recal.py leaves open.

Each test names the rule it pins (the module, class or function docstring of ``quantcal.recal``)
and checks it against an independent reference: a by-hand count or formula, numpy's NLL
(``_refs.nll``), a central difference of that NLL, or an edge case built so the answer is known.
"""

from __future__ import annotations

import json
import math
import re
import warnings

import numpy as np
import pytest
import torch

import _refs
from quantcal.calibration import recal, recal_scaling, recal_toplabel

NAMES = recal.available()
EPS64 = float(np.finfo(np.float64).eps)


def _data(n, c, *, scale, seed):
    z, y = _refs.calibrated_logits(n, c, seed=seed)
    return torch.from_numpy(z * scale), torch.from_numpy(y)


def _quiet_fit(r, z, y):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a healthy fit must not warn
        return r.fit(z, y)


def _exact(message):
    """A ``match`` pattern for exactly this message."""
    return "^" + re.escape(message) + "$"


# ----------------------------------------------------------------------------------------------
# "When a fit can be trusted": parameter counts, image floors, notes
# ----------------------------------------------------------------------------------------------
def test_fit_parameters_count_what_each_recalibrator_fits():
    """fit_parameters: none 0, temperature (and temperature_fp32) 1, vector 2·C, matrix C² + C,
    histogram and isotonic 15; None for an unknown C or an unknown name."""
    assert recal.fit_parameters("none", 10) == 0
    assert recal.fit_parameters("temperature") == 1
    assert recal.fit_parameters("temperature_fp32") == 1
    assert recal.fit_parameters("vector", 10) == 20
    assert recal.fit_parameters("matrix", 10) == 110
    assert recal.fit_parameters("matrix", 3) == 12
    assert recal.fit_parameters("vector") is None and recal.fit_parameters("matrix") is None
    assert recal.fit_parameters("histogram", 10) == 15
    assert recal.fit_parameters("isotonic") == 15
    assert recal.fit_parameters("platt") is None


def test_min_fit_images_is_the_larger_of_the_two_floors():
    """min_fit_images = max(500, 50 · parameters); 500 when the count is unknown; 0 for none."""
    assert recal.min_fit_images("none", 10) == 0
    assert recal.min_fit_images("temperature") == 500
    assert recal.min_fit_images("temperature_fp32") == 500
    assert recal.min_fit_images("vector", 10) == 1000  # 50 · 20
    assert recal.min_fit_images("vector", 4) == 500  # 50 · 8 = 400 < 500
    assert recal.min_fit_images("matrix", 10) == 5500  # 50 · 110
    assert recal.min_fit_images("histogram") == 750  # 50 · 15
    assert recal.min_fit_images("vector") == 500  # C unknown
    assert recal.min_fit_images("platt") == 500  # not a recalibrator


def test_keeps_predictions_follows_preserves_argmax():
    """keeps_predictions: preserves_argmax of the class; True for the fp32 temperature reused;
    False for a name that is not a recalibrator."""
    assert recal.keeps_predictions("temperature_fp32") is True
    for name in ("none", "temperature", "histogram", "isotonic"):
        assert recal.keeps_predictions(name) is True
    for name in ("vector", "matrix", "platt"):
        assert recal.keeps_predictions(name) is False


def test_fit_notes_flag_a_fit_on_too_few_images():
    """fit_notes: a fit on fewer than min_fit_images images gets a note naming the counts."""
    assert recal.fit_notes("none", n_fit=3, ece_diff_vs_none=(0.5, 0.4, 0.6)) == []
    assert recal.fit_notes("temperature", n_fit=500) == []  # exactly the floor: trusted
    assert recal.fit_notes("temperature") == []  # size unknown: no note
    (note,) = recal.fit_notes("temperature", n_fit=499)
    assert note.startswith("temperature was fitted on 499 images, fewer than the 500 this report ")
    assert "(at least 500, and 50 per fitted parameter; it fits 1 parameter): " in note
    assert note.endswith(
        "its fit may not reproduce on another sample, a larger recalibration split settles it "
        "(data.val_size; when cross-fitted on test, a larger test split)"
    )
    (note,) = recal.fit_notes("vector", n_fit=999, n_classes=10)
    assert "fewer than the 1000 " in note and "it fits 20 parameters)" in note
    assert recal.fit_notes("vector", n_fit=1000, n_classes=10) == []
    (note,) = recal.fit_notes("vector", n_fit=10, n_classes=1)  # 2 parameters: plural
    assert "it fits 2 parameters)" in note
    (note,) = recal.fit_notes("platt", n_fit=10)  # count unknown
    assert "fewer than the 500 " in note and "it fits parameters)" in note


def test_fit_notes_flag_a_paired_ece_rise():
    """fit_notes: a held-out ECE change vs none whose paired interval lies above 0 is noted, in
    points with signs; an interval touching 0, or any missing number, is not."""
    (note,) = recal.fit_notes("histogram", ece_diff_vs_none=(0.02, 0.005, 0.035))
    assert note == (
        "histogram raised the held-out ECE by +2.00 [+0.50, +3.50] points vs no recalibration "
        "(paired): its fit does not carry over to the test images, and no verdict counts it as "
        "a repair"
    )
    for diff in [
        (0.02, 0.0, 0.04),
        (0.02, -0.01, 0.05),
        (0.01, 0.5, None),
        (None, 0.01, 0.02),
        (0.01, None, 0.02),
        None,
    ]:
        assert recal.fit_notes("histogram", ece_diff_vs_none=diff) == [], diff
    notes = recal.fit_notes("temperature", n_fit=100, ece_diff_vs_none=(0.01, 0.002, 0.02))
    assert len(notes) == 2 and "fitted on 100 images" in notes[0] and "+1.00" in notes[1]


# ----------------------------------------------------------------------------------------------
# state dicts: plain JSON, identical rebuilds, clear errors
# ----------------------------------------------------------------------------------------------
def test_state_for_another_recalibrator_is_refused_by_name():
    """_check_state: the error says which recalibrator the state is for."""
    with pytest.raises(ValueError, match=r"state_dict is for 'vector', not 'temperature'"):
        recal.TemperatureScaling.from_state_dict({"name": "vector"})
    with pytest.raises(ValueError, match=r"state_dict is for 'list', not 'histogram'"):
        recal.HistogramBinning.from_state_dict([("name", "histogram")])
    with pytest.raises(ValueError, match="state must be a dict produced by a recalibrator's"):
        recal.from_state_dict({"temperature": 2.0})  # a dict without a name
    with pytest.raises(ValueError, match="state must be a dict produced by a recalibrator's"):
        recal.from_state_dict([("name", "temperature")])


@pytest.mark.parametrize("name", NAMES)
def test_an_unfitted_recalibrator_has_a_plain_json_state(name):
    """state_dict() is plain JSON (no NaN) also before fit, rebuilds to the same state, and an
    unfitted recalibrator reports no parameters, no iterations, not converged."""
    fresh = recal.get(name)()
    state = fresh.state_dict()
    text = json.dumps(state, allow_nan=False)
    again = recal.from_state_dict(json.loads(text))
    assert again.state_dict() == state and not again.fitted and not fresh.fitted
    assert fresh.fitted is False
    params = {
        "none": (),
        "temperature": ("temperature",),
        "vector": ("weight", "bias", "n_classes"),
        "matrix": ("weight", "bias", "n_classes"),
        "histogram": ("edges", "values"),
        "isotonic": ("x_thresholds", "y_thresholds"),
    }[name]
    for attr in params:
        assert getattr(fresh, attr) is None, attr
    if name in ("temperature", "vector", "matrix"):
        assert state["n_iter"] == 0 and state["converged"] is False


def test_unfitted_defaults_match_the_signatures():
    """The documented defaults: temperature tol 1e-10, max_iter 100; affine l2 1e-4, tol 1e-6,
    max_iter 1000; histogram 15 bins, equal-mass; none unfitted."""
    assert recal.TemperatureScaling().state_dict() == {
        "name": "temperature",
        "temperature": None,
        "n_iter": 0,
        "grad_log_t": None,
        "converged": False,
        "nll": None,
        "tol": 1e-10,
        "max_iter": 100,
    }
    assert recal.VectorScaling().state_dict() == {
        "name": "vector",
        "l2": 1e-4,
        "tol": 1e-6,
        "max_iter": 1000,
        "weight": None,
        "bias": None,
        "n_iter": 0,
        "grad_max": None,
        "converged": False,
    }
    assert recal.HistogramBinning().state_dict() == {
        "name": "histogram",
        "n_bins": 15,
        "binning": "mass",
        "edges": None,
        "values": None,
    }
    assert recal.Identity().state_dict() == {"name": "none", "fitted": False}
    # a minimal temperature state (only what fixed() sets) rebuilds with the same defaults
    minimal = recal.TemperatureScaling.from_state_dict({"name": "temperature", "temperature": 2})
    assert minimal.state_dict() == recal.TemperatureScaling.fixed(2.0).state_dict()


@pytest.mark.parametrize(
    "make",
    [
        lambda: recal.TemperatureScaling(tol=1e-9, max_iter=50),
        lambda: recal.VectorScaling(l2=1e-3, tol=1e-7, max_iter=500),
        lambda: recal.MatrixScaling(l2=1e-2, tol=1e-7, max_iter=400),
        lambda: recal.HistogramBinning(n_bins=7, binning="width"),
        lambda: recal.HistogramBinning(n_bins=5),
        lambda: recal.IsotonicRegression(),
        lambda: recal.Identity(),
    ],
)
def test_a_fitted_state_rebuilds_every_field(make):
    """from_state_dict(state_dict()) rebuilds an identical recalibrator: every field of the state
    (settings, parameters, fit diagnostics) comes back, and so does the class-count check."""
    zv, yv = _data(400, 4, scale=2.5, seed=21)
    r = _quiet_fit(make(), zv, yv)
    state = json.loads(json.dumps(r.state_dict(), allow_nan=False))
    again = recal.from_state_dict(state)
    assert again.state_dict() == state
    assert torch.equal(again(zv), r(zv))
    if isinstance(r, recal.TemperatureScaling):
        assert state["converged"] is True and state["n_iter"] > 0 and state["nll"] > 0
        assert state["grad_log_t"] is not None and state["tol"] == 1e-9
    if isinstance(r, (recal.VectorScaling, recal.MatrixScaling)):
        assert state["converged"] is True and state["n_iter"] > 0
        assert 0 <= state["grad_max"] <= state["tol"]
        with pytest.raises(ValueError, match="fitted on C = 4 classes but got logits with 3"):
            again(zv[:, :3])


# ----------------------------------------------------------------------------------------------
# input checks and messages
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["none", "temperature", "vector", "histogram"])
def test_non_finite_rows_are_counted_in_the_error(name):
    """Bad input gets an error that says how many rows of how many are not finite."""
    z, y = _data(7, 4, scale=2.0, seed=22)
    bad = z.clone()
    bad[1, 0], bad[4, 2], bad[4, 3] = float("nan"), float("inf"), float("nan")
    with pytest.raises(ValueError, match="NaN or Inf in 2 of 7 rows"):
        recal.get(name)().fit(bad, y)
    zv, yv = _data(300, 4, scale=2.0, seed=23)
    r = _quiet_fit(recal.get(name)(), zv, yv)
    with pytest.raises(ValueError, match="NaN or Inf in 2 of 7 rows"):
        r(bad)


def test_constructor_checks_name_the_bad_setting():
    """Settings are checked with an error naming the setting; the boundary values are allowed."""
    for cls in (recal.TemperatureScaling, recal.VectorScaling, recal.MatrixScaling):
        with pytest.raises(ValueError, match=r"tol must be > 0, got 0"):
            cls(tol=0.0)
        with pytest.raises(ValueError, match=r"max_iter must be >= 1, got 0"):
            cls(max_iter=0)
        assert cls(max_iter=1).max_iter == 1
    for bad in (-1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match=r"l2 must be a finite number >= 0, got"):
            recal.VectorScaling(l2=bad)
    assert recal.VectorScaling(l2=0.0).l2 == 0.0  # no ridge is allowed
    assert recal.TemperatureScaling.fixed(1.0).temperature == 1.0  # T = 1 is a valid fixed T
    assert recal.TemperatureScaling.fixed(0.5).temperature == 0.5
    with pytest.raises(ValueError, match=r"unknown binning 'quantile'"):
        recal.HistogramBinning(binning="quantile")


def test_messages_name_the_recalibrator_class():
    """NotFittedError, the class-count error and repr name the class."""
    z, y = _data(300, 4, scale=2.0, seed=24)
    with pytest.raises(recal.NotFittedError, match=r"^TemperatureScaling is not fitted; call "):
        recal.TemperatureScaling()(z)
    v = _quiet_fit(recal.VectorScaling(), z, y)
    with pytest.raises(ValueError, match=r"^VectorScaling was fitted on C = 4 classes but got "):
        v(z[:, :3])
    assert repr(recal.TemperatureScaling.fixed(2.0)).startswith("TemperatureScaling({'name': ")
    assert repr(recal.Identity()) == "Identity({'name': 'none', 'fitted': False})"


# ----------------------------------------------------------------------------------------------
# temperature scaling: exact branches, counts and diagnostics
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def ts_evals(monkeypatch):
    """The β of every NLL evaluation (``_ts_terms`` call) of a temperature fit."""
    betas = []
    orig = recal_scaling._ts_terms

    def spy(zc, zc2, zy, beta):
        betas.append(beta)
        return orig(zc, zc2, zy, beta)

    monkeypatch.setattr(recal_scaling, "_ts_terms", spy)
    return betas


def _grad_log_t(z, y, t, h=1e-5):
    """dNLL/d log T at T by a central difference of numpy's NLL."""
    zn, yn = np.asarray(z), np.asarray(y)
    up, down = _refs.nll(zn / (t * math.exp(h)), yn), _refs.nll(zn / (t * math.exp(-h)), yn)
    return (up - down) / (2 * h)


def _two_class(n0, n1, gap):
    """Identical rows [gap, 0]: n0 labelled 0, n1 labelled 1 (optimal β = logit(n0/N) / gap)."""
    z = torch.tensor([[gap, 0.0]] * (n0 + n1), dtype=torch.float64)
    return z, torch.tensor([0] * n0 + [1] * n1)


def _check_at_bound(ts, z, y, t, evals):
    assert ts.temperature == t and ts.converged is False
    assert ts.n_iter == len(evals)
    assert ts.nll == pytest.approx(_refs.nll(z.numpy() / t, y.numpy()), abs=1e-12)
    assert ts.grad_log_t == pytest.approx(_grad_log_t(z, y, t), abs=1e-7)


def test_temperature_constant_rows_use_t_one_without_evaluating(ts_evals):
    """Constant rows: every T gives NLL = log C, zero gradient; T = 1 with no NLL evaluation."""
    z = torch.full((20, 4), 3.0, dtype=torch.float64)
    y = torch.arange(20) % 4
    msg = (
        "temperature scaling: every logit row is constant, so every T gives the same NLL; "
        "using T = 1."
    )
    with pytest.warns(RuntimeWarning, match=_exact(msg)):
        ts = recal.TemperatureScaling().fit(z, y)
    assert ts.temperature == 1.0 and ts.converged is True and ts.grad_log_t == 0.0
    assert ts.n_iter == 0 and ts_evals == []
    assert ts.nll == pytest.approx(math.log(4), abs=1e-15)


def test_temperature_separable_data_stop_at_t_min_with_its_nll_and_gradient(ts_evals):
    """Separable val (every label holds its row's top logit): T = T_MIN = 0.01, detected before
    solving; n_iter counts the one NLL evaluation, nll and grad_log_t are those at T = 0.01."""
    y = torch.arange(60) % 3
    z = torch.nn.functional.one_hot(y, 3).double() * 0.02  # at T = 0.01 the margin is 2
    z[::2] += 1.0  # a per-row shift changes nothing
    msg = (
        "temperature scaling: the validation data are separable (every label has the top "
        "logit, so NLL keeps falling as T -> 0); using the bound T = 0.01."
    )
    with pytest.warns(RuntimeWarning, match=_exact(msg)):
        ts = recal.TemperatureScaling().fit(z, y)
    _check_at_bound(ts, z, y, 0.01, ts_evals)
    assert ts_evals == [100.0]


def test_temperature_no_better_than_uniform_stops_at_t_max(ts_evals):
    """NLL'(β → 0) = mean(mean_k z_k − z_y) ≥ 0 (here 0.6, and exactly 0): T = T_MAX = 100,
    detected before solving, with the NLL and gradient at T = 100."""
    y = torch.arange(30) % 3
    z = -0.9 * torch.nn.functional.one_hot(y, 3).double()  # mean_k z_k − z_y = 0.6
    msg = (
        "temperature scaling: the logits are no better than uniform (NLL keeps falling as T "
        "grows); using the bound T = 100."
    )
    with pytest.warns(RuntimeWarning, match=_exact(msg)):
        ts = recal.TemperatureScaling().fit(z, y)
    _check_at_bound(ts, z, y, 100.0, ts_evals)
    assert ts_evals == [0.01]
    # the label's logit is exactly the row mean: NLL'(β → 0) = 0, still the T_MAX bound
    z = torch.tensor([[1.0, 0.0, -1.0]] * 10, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match=_exact(msg)):
        ts = recal.TemperatureScaling().fit(z, torch.ones(10, dtype=torch.long))
    assert ts.temperature == 100.0


@pytest.mark.parametrize(
    ("n0", "n1", "gap", "t", "why"),
    [
        (900, 100, 0.01, 0.01, "the validation data look separable (NLL keeps falling as T -> 0)"),
        (
            900,
            100,
            1000.0,
            100.0,
            "the logits are no better than uniform (NLL keeps falling as T grows)",
        ),
        (
            520,
            480,
            20.0,
            100.0,  # T* = 247, and NLL'(β) is below 1 at the bound
            "the logits are no better than uniform (NLL keeps falling as T grows)",
        ),
    ],
)
def test_temperature_optimum_beyond_the_interval_stops_at_the_nearer_bound(
    ts_evals, n0, n1, gap, t, why
):
    """An interior optimum outside [T_MIN, T_MAX] (T* = gap / logit(n0 / N): 0.0046, 455, 247)
    stops at the nearer bound with a warning, unconverged, with the NLL and gradient there.
    The second case starts where every softmax is one-hot (zero curvature, no Newton step)."""
    z, y = _two_class(n0, n1, gap)
    msg = f"temperature scaling: {why}; stopping at the bound T = {t:g}."
    with pytest.warns(RuntimeWarning, match=_exact(msg)):
        ts = recal.TemperatureScaling().fit(z, y)
    _check_at_bound(ts, z, y, t, ts_evals)
    assert ts_evals[0] == 1.0 and ts_evals[-1] == 1.0 / t
    assert all(0.01 <= b <= 100.0 for b in ts_evals)


@pytest.mark.parametrize("t_opt", [0.02, 50.0])
def test_temperature_interior_optimum_near_a_bound_is_found(t_opt):
    """An optimum inside the interval, near either end, is found and converged, also when the
    tolerance cannot be met and the bracket collapses at float64 resolution."""
    gap = math.log(9.0) * t_opt  # optimal β = logit(0.9) / gap = 1 / t_opt
    z, y = _two_class(900, 100, gap)
    for tol in (1e-10, 1e-300):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ts = recal.TemperatureScaling(tol=tol).fit(z, y)
        assert ts.converged is True
        assert ts.temperature == pytest.approx(t_opt, rel=1e-9)
        assert abs(_grad_log_t(z, y, ts.temperature)) < 1e-7


def _newton_reference(z, y, beta):
    """NLL'(β) and NLL''(β) by hand: mean(E_p[z] − z_y) and mean(Var_p[z]), p = softmax(β z)."""
    zn, yn = z.numpy(), y.numpy()
    p = _refs.softmax(beta * zn)
    m1 = (p * zn).sum(1)
    var = (p * zn * zn).sum(1) - m1**2
    return float((m1 - zn[np.arange(len(yn)), yn]).mean()), float(var.mean())


@pytest.mark.parametrize(("scale", "expect_bisection"), [(0.5, False), (1e-3, True)])
def test_temperature_max_iter_counts_evaluations_and_returns_the_last_one(
    ts_evals, scale, expect_bisection
):
    """max_iter counts NLL evaluations; a fit that runs out warns that it did not converge and
    returns the last temperature it evaluated, with that point's nll and grad_log_t (the class
    docstring's attributes), and the warning shows the same |dNLL/dlogT|. The first evaluation is
    T = 1 (no recalibration), the second its safeguarded Newton step on β: the Newton step, or
    the geometric midpoint of the bracket when the step leaves it."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (300,), generator=g)
    z = (
        torch.randn(300, 3, generator=g, dtype=torch.float64)
        + 2 * torch.nn.functional.one_hot(y, 3)
    ) * scale  # under-confident: optimum β > 1
    d1, d2 = _newton_reference(z, y, 1.0)
    assert d1 < 0 and d2 < 1  # the bracket becomes [1, 100]
    step = 1.0 - d1 / d2
    assert (step >= 100.0) == expect_bisection
    want_beta = math.sqrt(1.0 * 100.0) if expect_bisection else step
    for max_iter, beta in ((1, 1.0), (2, want_beta)):
        ts_evals.clear()
        pattern = (
            rf"^temperature scaling did not converge in {max_iter} evaluations "
            r"\(\|dNLL/dlogT\| = "
        )
        with pytest.warns(RuntimeWarning, match=pattern) as rec:
            ts = recal.TemperatureScaling(max_iter=max_iter).fit(z, y)
        assert ts_evals == pytest.approx([1.0, want_beta][:max_iter], rel=1e-12)
        assert ts.temperature == pytest.approx(1.0 / beta, rel=1e-12)
        assert ts.n_iter == max_iter and ts.converged is False
        t = ts.temperature
        assert ts.nll == pytest.approx(_refs.nll(z.numpy() / t, y.numpy()), abs=1e-12)
        assert ts.grad_log_t == pytest.approx(_grad_log_t(z, y, t), abs=1e-7)
        shown = re.search(r"= ([^)]+)\)", str(rec[0].message)).group(1)
        assert shown == f"{abs(ts.grad_log_t):.3g}" and ts.grad_log_t != 0


def test_temperature_newton_counts_its_evaluations_and_converges_fast(ts_evals):
    """n_iter is the number of NLL evaluations; the safeguarded Newton iteration needs few of
    them (quadratic convergence) also when the curvature NLL'' is below 1."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (400,), generator=g)
    z = (
        torch.randn(400, 4, generator=g, dtype=torch.float64)
        + 1.5 * torch.nn.functional.one_hot(y, 4)
    ) * 0.5
    assert _newton_reference(z, y, 1.0)[1] < 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ts = recal.TemperatureScaling().fit(z, y)
    assert ts.converged and ts.n_iter == len(ts_evals) and ts.n_iter <= 10
    assert ts_evals[0] == 1.0
    assert abs(_grad_log_t(z, y, ts.temperature)) < 1e-7
    assert ts.nll == pytest.approx(_refs.nll(z.numpy() / ts.temperature, y.numpy()), abs=1e-12)
    assert abs(ts.grad_log_t) <= 1e-10


def test_temperature_is_invariant_to_per_row_shifts():
    """The NLL is shift invariant per row, so adding a different constant to each row (even a
    huge one) changes neither T nor the NLL."""
    z, y = _data(500, 5, scale=3.0, seed=25)
    shift = torch.linspace(-800.0, 800.0, 500, dtype=torch.float64)[:, None]
    a = _quiet_fit(recal.TemperatureScaling(), z, y)
    b = _quiet_fit(recal.TemperatureScaling(), z + shift, y)
    assert b.temperature == pytest.approx(a.temperature, rel=1e-9)
    assert b.nll == pytest.approx(a.nll, rel=1e-9)
    sep = torch.nn.functional.one_hot(y, 5).double() * 0.02 + shift  # separable, shifted rows
    with pytest.warns(RuntimeWarning, match="are separable"):
        ts = recal.TemperatureScaling().fit(sep, y)
    assert ts.temperature == 0.01


def test_temperature_apply_is_a_division_in_the_output_dtype():
    """z ↦ z / T, computed in the output dtype: float32 input is divided in float32 exactly as
    ``z / T``, half input as ``z.float() / T``."""
    z, _ = _data(2000, 4, scale=3.0, seed=26)
    ts = recal.TemperatureScaling.fixed(0.3)
    z32 = z.float()
    assert torch.equal(ts(z32), z32 / 0.3)
    zh = z.half()
    assert torch.equal(ts(zh), zh.float() / 0.3)


# ----------------------------------------------------------------------------------------------
# vector and matrix scaling
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["vector", "matrix"])
def test_affine_fit_handles_a_class_missing_from_val(name):
    """The ridge keeps the fit well posed when a class never occurs in val: the missing class's
    bias goes down, and the fit still converges."""
    z, y = _data(600, 4, scale=2.0, seed=27)
    keep = y != 3
    r = _quiet_fit(recal.get(name)(), z[keep], y[keep])
    assert r.converged and r.n_classes == 4 and r.bias.shape == (4,)
    assert float(r.bias[3]) < float(r.bias[:3].min())


@pytest.mark.parametrize("cls", [recal.VectorScaling, recal.MatrixScaling])
def test_affine_fit_that_stops_early_warns_with_its_numbers(monkeypatch, cls):
    """A fit still above tol after its L-BFGS runs warns, naming the class, the gradient, tol and
    the iterations; n_iter is the sum of the runs' iterations (three runs: the first and up to two
    restarts)."""
    import scipy.optimize

    runs = []
    orig = scipy.optimize.minimize

    def spy(*args, **kwargs):
        res = orig(*args, **kwargs)
        runs.append(int(res.nit))
        return res

    monkeypatch.setattr(scipy.optimize, "minimize", spy)
    z, y = _data(300, 4, scale=3.0, seed=28)
    pattern = (
        rf"^{cls.__name__}: L-BFGS stopped with max \|gradient\| = \S+ > 1e-12 after "
        rf"(\d+) iterations\.$"
    )
    with pytest.warns(RuntimeWarning, match=pattern) as rec:
        r = cls(tol=1e-12, max_iter=1).fit(z, y)
    shown = int(re.search(pattern, str(rec[0].message)).group(1))
    assert len(runs) == 3 and shown == r.n_iter == sum(runs) >= 1
    assert r.converged is False and r.grad_max > 1e-12
    assert f"= {r.grad_max:.3g} >" in str(rec[0].message)


# ----------------------------------------------------------------------------------------------
# top-label maps
# ----------------------------------------------------------------------------------------------
def _two_class_at(confs):
    """float64 logits [x, 0] with softmax max = conf (conf > 1/2)."""
    c = np.asarray(confs, dtype=np.float64)
    z = np.stack([np.log(c / (1 - c)), np.zeros_like(c)], axis=1)
    return torch.from_numpy(z)


def test_histogram_width_bins_apply_like_they_fit():
    """binning="width": B equal-width (lo, hi] bins with edges i/B; applying gives each sample
    its bin's val accuracy (the metrics' width bins), an empty bin its centre; a bin with one
    sample holds that sample's hit."""
    conf = np.array([0.55, 0.58, 0.62, 0.68, 0.69, 0.72])  # B = 4: only bin 2 is used
    y = torch.tensor([0, 1, 0, 0, 1, 0])  # hits 1, 0, 1, 1, 0, 1
    z = _two_class_at(conf)
    r = recal.HistogramBinning(n_bins=4, binning="width").fit(z, y)
    np.testing.assert_array_equal(r.edges, [0.0, 0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(r.values, [0.125, 0.375, 4 / 6, 0.875])  # empty: the centre
    r8 = recal.HistogramBinning(n_bins=8, binning="width").fit(z, y)
    np.testing.assert_allclose(r8.values[4:6], [2 / 3, 2 / 3])  # (.5, .625], (.625, .75]
    r10 = recal.HistogramBinning(n_bins=10, binning="width").fit(z, y)
    np.testing.assert_allclose(r10.values[5:8], [0.5, 2 / 3, 1.0])  # bin 7: one 0.72, a hit
    conf_t = np.array([0.52, 0.66, 0.74, 0.9, 0.98])
    got = torch.softmax(r10(_two_class_at(conf_t)), 1).amax(1).numpy()
    lo = 1 / (1 + (1 - 1e-6))
    want = np.clip(r10.values[_refs.width_bins(conf_t, 10)], lo, 1 - 1e-6)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)


def test_histogram_width_is_calibrated_on_its_own_val_set_at_a_bin_edge():
    """Histogram binning fits each bin's accuracy, so on its own val set every output confidence
    equals the accuracy of the samples that get it, also for a confidence a few ulps above an
    edge (which the metrics' width bins, and so the fit, count in the lower bin)."""
    x = math.log(3.0)
    while True:  # the softmax max just above 0.75, within the 8-ulp edge tolerance
        c = float(torch.softmax(torch.tensor([[x, 0.0]], dtype=torch.float64), 1).amax())
        if c > 0.75:
            break
        x = float(np.nextafter(x, np.inf))
    assert c * 4 * (1 - 8 * EPS64) <= 3
    edge_row = torch.tensor([[x, 0.0]], dtype=torch.float64)
    z = torch.cat([_two_class_at([0.6, 0.7, 0.8, 0.9]), edge_row.repeat(3, 1)])
    y = torch.tensor([0, 1, 0, 0, 0, 0, 0])  # hits 1, 0, 1, 1 and 1, 1, 1 at the edge
    r = recal.HistogramBinning(n_bins=4, binning="width").fit(z, y)
    q = torch.softmax(r(z), 1).amax(1).numpy()
    hit = np.array([1, 0, 1, 1, 1, 1, 1], dtype=float)
    assert len(np.unique(q)) == 2
    for v in np.unique(q):
        acc = np.clip(hit[q == v].mean(), 1 / (1 + (1 - 1e-6)), 1 - 1e-6)
        assert v == pytest.approx(acc, abs=1e-9)


def test_histogram_mass_edges_span_zero_to_one():
    """Equal-mass bins: edges start at 0 and end at 1, halfway between neighbouring bins."""
    zv, yv = _data(500, 4, scale=3.0, seed=29)
    r = recal.HistogramBinning(n_bins=6).fit(zv, yv)
    assert r.edges[0] == 0.0 and r.edges[-1] == 1.0 and len(r.edges) == 7
    assert recal.HistogramBinning().n_bins == 15  # "histogram binning its 15 bins"


def test_top_label_confidence_uses_the_logits_dtype_for_q():
    """_with_top_confidence: q is taken in the logits' precision, so a float32 q on float64
    logits gives max softmax == q to float64 accuracy."""
    z, _ = _data(50, 4, scale=2.0, seed=30)
    q = torch.linspace(0.3, 0.95, 50, dtype=torch.float32)
    p = torch.softmax(recal_toplabel._with_top_confidence(z, q), 1)
    torch.testing.assert_close(p.amax(1), q.double(), rtol=0, atol=1e-13)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", NAMES)
def test_outputs_stay_on_the_input_device(name):
    """Module docstring: the output has the input's device."""
    zv, yv = _data(300, 4, scale=2.0, seed=31)
    r = _quiet_fit(recal.get(name)(), zv, yv)
    out = r(zv.cuda())
    assert out.device.type == "cuda"
    torch.testing.assert_close(out.cpu(), r(zv), rtol=1e-9, atol=1e-9)
