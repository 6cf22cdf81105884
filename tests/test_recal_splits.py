"""Which images each recalibrator is fitted on (``quantcal.recal_splits``).

A normal study fits on the cell's validation logits and measures on its test logits; a
test-only source cross-fits two stratified halves of test. Both rules are stated in the
module's docstring and the README ("recal_fit"); these tests are written from them.
"""

import pytest
import torch

from quantcal import recal, recal_splits


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
