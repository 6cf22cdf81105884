"""Which images each recalibrator is fitted on (``quantcal.calibration.recal_splits``).

A normal study fits on the cell's validation logits and measures on its test logits; a
test-only source cross-fits two stratified halves of test. Both rules are stated in the
module's docstring and the README ("recal_fit"); these tests are written from them.
"""

import warnings

import pytest
import torch

import _refs
from quantcal.calibration import recal, recal_splits
from quantcal.training import images as _images


def test_crossfit_folds_never_measure_an_image_with_its_own_fit():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(103) % 5
    folds = recal_splits.crossfit_folds(labels, seed=3)
    (a, b), (b2, a2) = folds
    assert torch.equal(a, a2) and torch.equal(b, b2)
    assert set(a.tolist()).isdisjoint(b.tolist()) and len(a) + len(b) == 103
    for c in range(5):  # stratified: each class split in halves (within one image)
        na, nb = int((labels[a] == c).sum()), int((labels[b] == c).sum())
        assert abs(na - nb) <= 1
    logits = torch.randn(103, 5, generator=g) * 2 + 3 * torch.nn.functional.one_hot(labels, 5)
    d = {"val_logits": logits, "val_labels": labels, "test_logits": logits, "test_labels": labels}
    z, t = recal_splits.recalibrate("temperature", d, d, folds=folds)
    ta = recal.TemperatureScaling().fit(logits[a], labels[a])
    tb = recal.TemperatureScaling().fit(logits[b], labels[b])
    assert torch.allclose(z[b], ta(logits[b])) and torch.allclose(z[a], tb(logits[a]))
    assert t == pytest.approx((ta.temperature + tb.temperature) / 2)


def _cell(seed, scale, n_val=300, n_test=200, c=4):
    """A cell's logits dict with distinct val and test sets (calibrated model times ``scale``)."""
    zv, yv = _refs.calibrated_logits(n_val, c, seed=seed)
    zt, yt = _refs.calibrated_logits(n_test, c, seed=seed + 100)
    return {
        "val_logits": torch.from_numpy(zv * scale),
        "val_labels": torch.from_numpy(yv),
        "test_logits": torch.from_numpy(zt * scale),
        "test_labels": torch.from_numpy(yt),
    }


def _fit_on_val_apply_to_test(method, fit_on, apply_to):
    """The documented rule, by hand: fit on fit_on's val, apply to apply_to's test."""
    r = recal.get(method)().fit(fit_on["val_logits"], fit_on["val_labels"])
    return r(apply_to["test_logits"]), getattr(r, "temperature", None)


@pytest.mark.parametrize("method", ["temperature", "vector", "histogram", "none"])
def test_a_normal_study_fits_on_the_cells_val_and_applies_to_its_test(method):
    """Module docstring: a normal study fits every recalibrator on the cell's own validation
    logits and applies it to its test logits; the temperature comes back (None for others)."""
    lg, fp32 = _cell(1, 3.0), _cell(2, 1.5)  # the quantized cell and a different fp32 model
    want, want_t = _fit_on_val_apply_to_test(method, lg, lg)
    z, t = recal_splits.recalibrate(method, lg, fp32)
    assert torch.equal(z, want)
    assert t == want_t and (t is None) == (method != "temperature")
    assert t is None or isinstance(t, float)
    # the same when the cell is the fp32 model itself (fitted through the default fp32_fit)
    z, t = recal_splits.recalibrate(method, fp32, fp32)
    want, want_t = _fit_on_val_apply_to_test(method, fp32, fp32)
    assert torch.equal(z, want) and t == want_t
    # fit_and_apply: fit on one dict's val, apply to another's test
    z, t = recal_splits.fit_and_apply(method, fp32, lg)
    want, want_t = _fit_on_val_apply_to_test(method, fp32, lg)
    assert torch.equal(z, want) and t == want_t


def test_temperature_fp32_applies_the_fp32_models_val_temperature():
    """temperature_fp32 applies the fp32 model's validation temperature to the cell's test
    logits (and returns it); fp32_fit, when given, supplies that fit."""
    lg, fp32 = _cell(3, 3.0), _cell(4, 1.5)
    t_fp32 = recal.TemperatureScaling().fit(fp32["val_logits"], fp32["val_labels"]).temperature
    t_cell = recal.TemperatureScaling().fit(lg["val_logits"], lg["val_labels"]).temperature
    assert abs(t_fp32 - t_cell) > 0.5  # the two rules give clearly different temperatures
    z, t = recal_splits.recalibrate("temperature_fp32", lg, fp32)
    assert t == t_fp32 and isinstance(t, float)
    assert torch.equal(z, lg["test_logits"] / t_fp32)
    calls = []

    def fp32_fit(method, f):
        calls.append((method, f))
        return None, 2.5

    z, t = recal_splits.recalibrate("temperature_fp32", lg, fp32, fp32_fit=fp32_fit)
    assert calls == [("temperature", fp32)] and calls[0][1] is fp32
    assert t == 2.5 and torch.equal(z, lg["test_logits"] / 2.5)


def test_fp32_fit_is_used_only_for_the_fp32_model_itself():
    """fp32_fit(method, fp32) is the fp32 model's (memoised) fit: used when the cell is the fp32
    model, never for a quantized cell's own fit."""
    lg, fp32 = _cell(5, 3.0), _cell(6, 1.5)
    calls = []
    sentinel = (torch.zeros(3, 4), 1.25)

    def fp32_fit(method, f):
        calls.append((method, f))
        return sentinel

    assert recal_splits.recalibrate("vector", fp32, fp32, fp32_fit=fp32_fit) is sentinel
    assert calls == [("vector", fp32)]
    z, t = recal_splits.recalibrate("vector", lg, fp32, fp32_fit=fp32_fit)
    assert len(calls) == 1 and t is None
    assert torch.equal(z, _fit_on_val_apply_to_test("vector", lg, lg)[0])


def test_fit_warnings_become_notes_once():
    """Warnings of a fit are appended to ``notes`` (each message once), not raised."""
    lg = _cell(7, 2.0)
    y = lg["val_labels"]
    lg["val_logits"] = torch.nn.functional.one_hot(y, 4).double() * 0.02  # separable val
    notes = ["earlier note"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        z, t = recal_splits.recalibrate("temperature", lg, _cell(8, 1.0), notes)
        recal_splits.recalibrate("temperature", lg, _cell(8, 1.0), notes)
    assert t == recal.T_MIN and torch.equal(z, lg["test_logits"] / recal.T_MIN)
    assert len(notes) == 2 and notes[0] == "earlier note"
    assert "separable" in notes[1] and "T = 0.01" in notes[1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        recal_splits.recalibrate("temperature", lg, _cell(8, 1.0))  # no notes: still quiet


def test_fold_makes_a_test_part_the_val_split():
    """fold: val is test[fit_idx], test is test[apply_idx]; the original val is not used."""
    d = _cell(9, 2.0, n_test=10)
    fit_idx, apply_idx = torch.tensor([0, 3, 4, 8]), torch.tensor([1, 2, 5, 6, 7, 9])
    f = recal_splits.fold(d, fit_idx, apply_idx)
    assert set(f) == {"val_logits", "val_labels", "test_logits", "test_labels"}
    assert torch.equal(f["val_logits"], d["test_logits"][fit_idx])
    assert torch.equal(f["val_labels"], d["test_labels"][fit_idx])
    assert torch.equal(f["test_logits"], d["test_logits"][apply_idx])
    assert torch.equal(f["test_labels"], d["test_labels"][apply_idx])


def test_crossfit_folds_are_the_seeded_test_halves():
    """crossfit_folds: (A, B) are _images.test_halves(labels, seed); [(A, B), (B, A)]."""
    labels = torch.arange(60) % 4
    (a, b), (b2, a2) = recal_splits.crossfit_folds(labels, seed=7)
    want_a, want_b = _images.test_halves(labels, 7)
    assert torch.equal(a, want_a) and torch.equal(b, want_b)
    assert torch.equal(a2, a) and torch.equal(b2, b)


def test_crossfit_temperature_fp32_uses_the_fp32_models_folds():
    """With folds, temperature_fp32 fits the fp32 model on one part of its test split and
    applies that T to the cell's other part; the temperature returned is the folds' mean. A
    recalibrator without a temperature returns None."""
    lg, fp32 = _cell(10, 3.0, n_test=120), _cell(10, 1.5, n_test=120)  # same test images
    assert torch.equal(lg["test_labels"], fp32["test_labels"])
    folds = recal_splits.crossfit_folds(lg["test_labels"], seed=1)
    z, t = recal_splits.recalibrate("temperature_fp32", lg, fp32, folds=folds)
    temps = []
    for fit_idx, apply_idx in folds:
        ts = recal.TemperatureScaling().fit(
            fp32["test_logits"][fit_idx], fp32["test_labels"][fit_idx]
        )
        temps.append(ts.temperature)
        assert torch.equal(z[apply_idx], lg["test_logits"][apply_idx] / ts.temperature)
    assert t == pytest.approx(sum(temps) / 2, rel=1e-12) and temps[0] != temps[1]
    z, t = recal_splits.recalibrate("histogram", lg, fp32, folds=folds)
    assert t is None and z.shape == lg["test_logits"].shape
    for fit_idx, apply_idx in folds:
        h = recal.HistogramBinning().fit(lg["test_logits"][fit_idx], lg["test_labels"][fit_idx])
        assert torch.equal(z[apply_idx], h(lg["test_logits"][apply_idx]))


def test_crossfit_warnings_reach_the_notes():
    """Warnings of the fold fits are appended to ``notes`` too (each message once)."""
    y = torch.arange(40) % 4
    sep = torch.nn.functional.one_hot(y, 4).double() * 0.02
    d = {"val_logits": sep, "val_labels": y, "test_logits": sep, "test_labels": y}
    notes = []
    recal_splits.recalibrate(
        "temperature", d, d, notes, folds=recal_splits.crossfit_folds(y, seed=0)
    )
    assert len(notes) == 1 and "separable" in notes[0]
