"""quantcal.recal: every registered recalibrator, plus exactness of temperature scaling."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch

import _refs
from quantcal.calibration import metrics as M
from quantcal.calibration import recal, recal_toplabel

NAMES = recal.available()


def _data(n, c, *, scale, seed):
    """Logits from a calibrated generative model, multiplied by ``scale`` (> 1: over-confident)."""
    z, y = _refs.calibrated_logits(n, c, seed=seed)
    return torch.from_numpy(z * scale), torch.from_numpy(y)


def _fit(name, z, y):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a healthy fit must not warn
        return recal.get(name)().fit(z, y)


def _lbfgs_recipe(z, y):
    """The much-copied recipe: LBFGS(lr=0.01, max_iter=50) on T from T0 = 1.5, float32."""
    t = torch.nn.Parameter(torch.ones(1) * 1.5)
    opt = torch.optim.LBFGS([t], lr=0.01, max_iter=50)
    z32 = z.float()

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z32 / t, y)
        loss.backward()
        return loss

    opt.step(closure)
    return float(t.detach())


def _nll_at(z, y, t):
    return _refs.nll(z.numpy() / t, y.numpy())


# ----------------------------------------------------------------------------------------------
# registry-wide behaviour
# ----------------------------------------------------------------------------------------------
def test_registry_lists_the_methods():
    assert {"none", "temperature", "vector", "matrix", "histogram", "isotonic"} <= set(NAMES)
    for name in NAMES:
        cls = recal.get(name)
        assert cls.name == name and isinstance(cls.preserves_argmax, bool)
        assert isinstance(cls(), recal.Recalibrator)
    assert recal.get("temperature").preserves_argmax
    assert not recal.get("vector").preserves_argmax
    with pytest.raises(ValueError, match="Did you mean 'temperature'"):
        recal.get("temprature")


@pytest.mark.parametrize("name", NAMES)
def test_fit_on_val_improves_an_overconfident_model(name):
    zv, yv = _data(1500, 5, scale=3.0, seed=0)
    r = _fit(name, zv, yv)
    out = r(zv)
    before, after = M.calibration_report(zv, yv), M.calibration_report(out, yv)
    if name == "none":
        assert after == before
        return
    assert after["ece"] < 0.5 * before["ece"]
    assert after["nll"] < before["nll"]
    zt, yt = _data(1500, 5, scale=3.0, seed=1)  # and it generalises to held-out data
    assert M.ece(r(zt), yt) < 0.5 * M.ece(zt, yt)


@pytest.mark.parametrize("name", NAMES)
def test_near_identity_on_a_calibrated_model(name):
    zv, yv = _data(3000, 5, scale=1.0, seed=2)
    zt, yt = _data(3000, 5, scale=1.0, seed=3)
    r = _fit(name, zv, yv)
    out = r(zt)
    conf_before = torch.softmax(zt, 1).amax(1)
    conf_after = torch.softmax(out.double(), 1).amax(1)
    assert float((conf_after - conf_before).abs().mean()) < 0.05
    assert M.ece(out, yt) < M.ece(zt, yt) + 0.02
    if name == "temperature":
        assert r.temperature == pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize("name", NAMES)
def test_argmax_preserved_where_claimed(name):
    zv, yv = _data(800, 6, scale=3.0, seed=4)
    r = _fit(name, zv, yv)
    g = torch.Generator().manual_seed(0)
    zt = torch.randn(500, 6, generator=g, dtype=torch.float64) * 4
    zt[:50, 1] = zt[:50, 0]  # ties: the first index is the prediction
    out = r(zt)
    same = bool((out.argmax(1) == zt.argmax(1)).all())
    if recal.get(name).preserves_argmax:
        assert same
    elif name in ("vector", "matrix"):
        assert r.weight is not None  # claims nothing; just check it ran
    assert out.shape == zt.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_json_round_trip_gives_identical_outputs(name):
    zv, yv = _data(600, 4, scale=2.5, seed=5)
    r = _fit(name, zv, yv)
    state = json.loads(json.dumps(r.state_dict()))
    for again in (recal.get(name).from_state_dict(state), recal.from_state_dict(state)):
        assert type(again) is type(r)
        assert torch.equal(again(zv), r(zv))
    other = "none" if name != "none" else "temperature"
    with pytest.raises(ValueError, match="state_dict is for"):
        recal.get(other).from_state_dict(state)


@pytest.mark.parametrize("name", NAMES)
def test_bad_inputs_raise(name):
    zv, yv = _data(200, 4, scale=2.0, seed=6)
    fresh = recal.get(name)()
    with pytest.raises(recal.NotFittedError, match="not fitted"):
        fresh(zv)
    with pytest.raises(ValueError, match="shape mismatch"):
        fresh.fit(zv, yv[:-1])
    bad = zv.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf in 1 of 200 rows"):
        fresh.fit(bad, yv)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        fresh.fit(zv, yv + 4)
    r = _fit(name, zv, yv)
    with pytest.raises(ValueError, match="NaN or Inf"):
        r(bad)
    with pytest.raises(ValueError, match=r"2-D with shape \(N, C\)"):
        r(zv[0])
    if name in ("vector", "matrix"):
        with pytest.raises(ValueError, match="fitted on C = 4"):
            r(zv[:, :3])


@pytest.mark.parametrize("name", NAMES)
def test_output_types_follow_the_input(name):
    zv, yv = _data(300, 4, scale=2.0, seed=7)
    r = _fit(name, zv, yv)
    assert r(zv).dtype == torch.float64
    assert r(zv.float()).dtype == torch.float32
    assert r(zv.half()).dtype == torch.float32
    out_np = r(zv.numpy())
    assert isinstance(out_np, np.ndarray) and out_np.dtype == np.float64
    np.testing.assert_allclose(out_np, r(zv).numpy(), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# temperature scaling
# ----------------------------------------------------------------------------------------------
def _grid_log_t(z, y):
    """Dense grid over log T: 301 points on [log .05, log 20], refined to 1e-3 then 1e-5 steps."""
    zn, yn = z.numpy(), y.numpy()

    def nll_grid(log_ts):
        return np.array([_refs.nll(zn / math.exp(u), yn) for u in log_ts])

    grid = np.linspace(math.log(0.05), math.log(20.0), 301)
    for step in (1e-3, 1e-5):
        best = grid[np.argmin(nll_grid(grid))]
        width = 2 * (grid[1] - grid[0])
        grid = np.arange(best - width, best + width + step, step)
    return grid[np.argmin(nll_grid(grid))]


def test_temperature_reaches_the_exact_nll_optimum():
    z, y = _data(2000, 10, scale=6.0, seed=8)  # strongly over-confident
    ts = _fit("temperature", z, y)
    t = ts.temperature
    assert ts.converged and abs(ts.grad_log_t) < 1e-6 and ts.n_iter < 30
    # independent check of the gradient: central difference of the numpy NLL in log T
    h = 1e-4
    d = (_nll_at(z, y, t * math.exp(h)) - _nll_at(z, y, t * math.exp(-h))) / (2 * h)
    assert abs(d) < 1e-6
    assert ts.nll == pytest.approx(_nll_at(z, y, t), abs=1e-12)
    assert math.log(t) == pytest.approx(_grid_log_t(z, y), abs=1e-4)
    # the LBFGS recipe stops far away: about half of the optimal T, with a clearly worse NLL
    t_lbfgs = _lbfgs_recipe(z, y)
    assert t_lbfgs < 0.7 * t
    assert _nll_at(z, y, t_lbfgs) > _nll_at(z, y, t) + 0.05


def test_temperature_degenerate_inputs_end_at_documented_bounds():
    n = 60
    y = torch.arange(n) % 3
    separable = torch.nn.functional.one_hot(y, 3).double() * 5.0
    with pytest.warns(RuntimeWarning, match="separable"):
        ts = recal.TemperatureScaling().fit(separable, y)
    assert ts.temperature == pytest.approx(recal.T_MIN) and not ts.converged
    assert math.isfinite(ts.nll) and math.isfinite(ts.grad_log_t)

    constant = torch.ones(n, 3, dtype=torch.float64) * 2.0
    with pytest.warns(RuntimeWarning, match="constant"):
        ts = recal.TemperatureScaling().fit(constant, y)
    assert ts.temperature == 1.0 and ts.nll == pytest.approx(math.log(3))

    anti = -separable  # the true class always has the lowest logit: uniform is best
    with pytest.warns(RuntimeWarning, match="no better than uniform"):
        ts = recal.TemperatureScaling().fit(anti, y)
    assert ts.temperature == pytest.approx(recal.T_MAX)
    out = ts(anti)
    assert torch.isfinite(out).all()


def test_temperature_fixed_and_apply():
    z, _ = _data(100, 3, scale=2.0, seed=9)
    ts = recal.TemperatureScaling.fixed(2.5)
    torch.testing.assert_close(ts(z), z / 2.5, rtol=0, atol=0)
    assert recal.from_state_dict(ts.state_dict()).temperature == 2.5
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature must be"):
            recal.TemperatureScaling.fixed(bad)


# ----------------------------------------------------------------------------------------------
# top-label maps
# ----------------------------------------------------------------------------------------------
def test_top_label_output_has_the_requested_confidence_and_water_fills():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(400, 5, generator=g, dtype=torch.float64) * 3
    z[0] = torch.tensor([2.0, 1.99, -5.0, -5.0, -5.0])  # runner-up would exceed a low q
    z[1] = torch.tensor([40.0, -40.0, 0.0, 0.0, 0.0])  # extreme: softmax underflows in float32
    q = torch.rand(400, generator=g, dtype=torch.float64) * 0.8 + 0.2
    q[0], q[1], q[2], q[3] = 0.3, 1.0, 0.0, 1.0 / 5  # 1.0 / 0.0: clipped to the documented range
    out = recal_toplabel._with_top_confidence(z, q)
    p = torch.softmax(out, 1)
    assert torch.isfinite(out).all()
    assert (out.argmax(1) == z.argmax(1)).all()
    eta = recal_toplabel._ETA
    lo = 1.0 / (1.0 + 4 * (1.0 - eta))
    torch.testing.assert_close(p.amax(1), q.clamp(lo, 1 - eta), rtol=0, atol=1e-12)
    others = p.masked_fill(torch.nn.functional.one_hot(z.argmax(1), 5).bool(), -1.0)
    assert (others.amax(1) <= p.amax(1) * (1 - eta) * (1 + 1e-12)).all()
    # row 0: class 1 is capped at q(1 - eta), the rest goes to the three small classes equally
    torch.testing.assert_close(p[0, 1], torch.tensor(0.3 * (1 - eta), dtype=torch.float64))
    torch.testing.assert_close(p[0, 2:], torch.full((3,), (0.7 - 0.3 * (1 - eta)) / 3).double())
    # rows without capping keep the other classes' proportions
    p_in = torch.softmax(z[4], 0)
    ratio = p[4] / p_in
    top = int(z[4].argmax())
    rest = torch.cat([ratio[:top], ratio[top + 1 :]])
    if bool((rest.max() - rest.min()).abs() < 1e-9):
        torch.testing.assert_close(rest, torch.full_like(rest, (1 - q[4]) / (1 - p_in[top])))


def test_isotonic_matches_scikit_learn():
    sk = pytest.importorskip("sklearn.isotonic")
    zv, yv = _data(800, 4, scale=3.0, seed=10)
    zt, _ = _data(300, 4, scale=3.5, seed=11)
    r = _fit("isotonic", zv, yv)
    conf, pred = _refs.top_label(zv.numpy())
    iso = sk.IsotonicRegression(y_min=0, y_max=1, out_of_bounds="clip")
    iso.fit(conf, (pred == yv.numpy()).astype(float))
    want = np.clip(iso.predict(_refs.top_label(zt.numpy())[0]), 1 / (1 + 3 * (1 - 1e-6)), 1 - 1e-6)
    got = torch.softmax(r(zt), 1).amax(1).numpy()
    np.testing.assert_allclose(got, want, atol=1e-12)


def test_histogram_binning_values_and_empty_bins():
    zv, yv = _data(900, 4, scale=3.0, seed=12)
    conf, pred = _refs.top_label(zv.numpy())
    hit = (pred == yv.numpy()).astype(float)
    r = recal.HistogramBinning(n_bins=10, binning="width").fit(zv, yv)
    idx = _refs.width_bins(conf, 10)
    for b in range(10):
        m = idx == b
        want = hit[m].mean() if m.any() else (b + 0.5) / 10
        assert r.values[b] == pytest.approx(want, abs=1e-12)
    assert not (idx == 0).any() and r.values[0] == 0.05  # empty bin: its centre
    mass = recal.HistogramBinning(n_bins=10).fit(zv, yv)
    assert mass.values.shape == (10,) and np.all(np.diff(mass.edges) > 0)
    got = torch.softmax(mass(zv), 1).amax(1).numpy()
    idx = _refs.mass_bins(conf, 10)
    for b in range(10):
        np.testing.assert_allclose(got[idx == b], np.clip(hit[idx == b].mean(), 0.25, 1 - 1e-6))
    with pytest.raises(ValueError, match="allowed values: width, mass"):
        recal.HistogramBinning(binning="quantile")
    with pytest.raises(ValueError, match="n_bins must be >= 1"):
        recal.HistogramBinning(n_bins=0)


def test_histogram_mass_bins_keep_ties_together():
    z = torch.round(torch.randn(600, 3, generator=torch.Generator().manual_seed(2))) * 1.0
    y = torch.randint(0, 3, (600,), generator=torch.Generator().manual_seed(3))
    r = recal.HistogramBinning(n_bins=15).fit(z, y)
    conf = _refs.top_label(z.numpy())[0]
    q = torch.softmax(r(z), 1).amax(1).numpy()
    for v in np.unique(conf):
        assert np.ptp(q[conf == v]) < 1e-12  # one value per tied confidence


@pytest.mark.parametrize("name", ["vector", "matrix"])
def test_affine_fit_is_stationary_by_autograd(name):
    zv, yv = _data(500, 4, scale=3.0, seed=13)
    r = _fit(name, zv, yv)
    w = r.weight.clone().requires_grad_(True)
    b = r.bias.clone().requires_grad_(True)
    w0 = torch.ones(4).double() if name == "vector" else torch.eye(4).double()
    mapped = zv * w + b if name == "vector" else zv @ w.T + b
    loss = torch.nn.functional.cross_entropy(mapped, yv)
    loss = loss + 0.5 * r.l2 * (((w - w0) ** 2).sum() + (b**2).sum())
    loss.backward()
    assert max(float(w.grad.abs().max()), float(b.grad.abs().max())) < 1e-6
    assert r.converged and r.grad_max < 1e-6
