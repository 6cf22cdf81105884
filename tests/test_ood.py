"""Unknown inputs: the OOD scores and their AUROC / FPR at 95 % TPR
(``quantcal.calibration.ood``) against by-hand values and scikit-learn, and the built-in
synthetic sets (``quantcal.training.ood_sets``)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from quantcal.calibration import ood
from quantcal.training import data
from quantcal.training.ood_sets import SYNTHETIC_OOD, synthetic_ood


def test_scores_by_hand():
    z = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    e = math.exp
    assert ood.ood_score(z, "msp").tolist() == pytest.approx([e(2) / (e(2) + 1 + e(-1)), 1 / 3])
    assert ood.ood_score(z, "max_logit").tolist() == [2.0, 0.0]
    assert ood.ood_score(z, "energy").tolist() == pytest.approx(
        [math.log(e(2) + 1 + e(-1)), math.log(3)]
    )


@pytest.mark.parametrize("score", list(ood.OOD_SCORES))
def test_auroc_and_fpr95_match_scikit_learn(score):
    metrics = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(0)
    known = torch.round(torch.randn(700, 10, generator=g) * 3 * 4) / 4  # ties
    unknown = torch.round(torch.randn(500, 10, generator=g) * 2 * 4) / 4
    s = np.concatenate([ood.ood_score(known, score).numpy(), ood.ood_score(unknown, score).numpy()])
    is_known = np.r_[np.ones(700), np.zeros(500)]
    assert ood.ood_auroc(known, unknown, score) == pytest.approx(
        metrics.roc_auc_score(is_known, s), abs=1e-12
    )
    fpr, tpr, _ = metrics.roc_curve(is_known, s)
    assert ood.ood_fpr_at_tpr(known, unknown, score) == pytest.approx(
        fpr[np.searchsorted(tpr, 0.95 - 1e-12)], abs=1e-12
    )


def test_separable_and_identical_sets():
    known = torch.tensor([[5.0, 0.0], [4.0, 0.0]])
    unknown = torch.tensor([[0.1, 0.0], [0.0, 0.0]])
    assert ood.ood_auroc(known, unknown, "max_logit") == 1.0
    assert ood.ood_fpr_at_tpr(known, unknown, "max_logit") == 0.0
    assert ood.ood_auroc(known, known, "msp") == 0.5  # every pair tied
    assert ood.ood_fpr_at_tpr(known, known, "msp") == 1.0


def test_bad_input_is_refused():
    z = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="allowed values: msp, max_logit, energy"):
        ood.ood_auroc(z, z, "entropy")
    with pytest.raises(ValueError, match=r"logits is empty \(N = 0\)"):
        ood.ood_auroc(z, torch.zeros(0, 4))
    bad = z.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf in 1 of 3 rows"):
        ood.ood_auroc(z, bad)
    with pytest.raises(ValueError, match="tpr must be in"):
        ood.ood_fpr_at_tpr(z, z, tpr=0)


@pytest.fixture(scope="module")
def digits_test():
    return data.load_dataset("digits", seed=0).test


@pytest.mark.parametrize("name", SYNTHETIC_OOD)
def test_synthetic_sets_are_deterministic_and_shaped_like_the_reference(digits_test, name):
    a = synthetic_ood(name, digits_test, seed=0)
    b = synthetic_ood(name, digits_test, seed=0)
    assert torch.equal(a.images, b.images) and a.images.dtype == torch.uint8
    assert a.images.shape == digits_test.images.shape and a.source == f"synthetic:{name}"
    assert (a.labels == -1).all() and a.mean == digits_test.mean
    assert not torch.equal(a.images, digits_test.images)
    if name in ("gaussian_noise", "uniform_noise", "pixel_shuffled"):
        assert not torch.equal(synthetic_ood(name, digits_test, seed=1).images, a.images)


def test_pixel_shuffle_keeps_each_images_colours_and_blur_removes_detail(digits_test):
    ref = digits_test.images
    shuffled = synthetic_ood("pixel_shuffled", digits_test).images
    assert torch.equal(ref.flatten(2).sort(2).values, shuffled.flatten(2).sort(2).values)
    blurred = synthetic_ood("blurred", digits_test).images.float()

    def detail(x):  # mean absolute difference of neighbouring pixels
        return (x[..., 1:] - x[..., :-1]).abs().mean()

    assert detail(blurred) < 0.5 * detail(ref.float())
    assert abs(blurred.mean() - ref.float().mean()) < 0.1 * ref.float().mean()  # colours kept


def test_an_image_does_not_depend_on_the_others(digits_test):
    import dataclasses

    first = dataclasses.replace(
        digits_test,
        images=digits_test.images[:5],
        labels=digits_test.labels[:5],
        indices=digits_test.indices[:5],
    )
    for name in ("uniform_noise", "pixel_shuffled", "blurred"):
        assert torch.equal(
            synthetic_ood(name, first).images, synthetic_ood(name, digits_test).images[:5]
        )
    with pytest.raises(ValueError, match="built-in sets are gaussian_noise, uniform_noise"):
        synthetic_ood("fog", digits_test)


def test_ood_auroc_contrast_equals_a_loop_over_the_same_resamples():
    import numpy as np

    from quantcal.calibration import ood as ood_mod

    g = torch.Generator().manual_seed(3)
    known = torch.randn(60, 4, generator=g) * 3
    unknown = (torch.randn(40, 4, generator=g)).round()  # ties among the unknown scores
    other = known / 2
    est, lo, hi = ood_mod.ood_auroc_contrast(
        [(known, unknown), (other, unknown)], [1, -1], "energy", n_resamples=40, seed=5
    )
    rng = np.random.default_rng(5)
    ik, iu = rng.integers(0, 60, size=(40, 60)), rng.integers(0, 40, size=(40, 40))
    loop = [
        ood_mod.ood_auroc(known[a], unknown[b], "energy")
        - ood_mod.ood_auroc(other[a], unknown[b], "energy")
        for a, b in zip(ik, iu)
    ]
    assert (lo, hi) == pytest.approx(tuple(np.quantile(loop, [0.025, 0.975])), abs=1e-12)
    assert est == pytest.approx(
        ood_mod.ood_auroc(known, unknown, "energy") - ood_mod.ood_auroc(other, unknown, "energy")
    )
    same = ood_mod.ood_auroc_contrast([(known, unknown)] * 2, [1, -1], n_resamples=20)
    assert same == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="same images"):
        ood_mod.ood_auroc_contrast([(known, unknown), (known[:10], unknown)], [1, -1])
    with pytest.raises(ValueError, match="one weight per pair"):
        ood_mod.ood_auroc_contrast([(known, unknown)], [1, -1])


def test_blurred_blurs_each_channel_of_colour_images_like_scipy():
    """Regression: 3-channel images (the separable kernel was shaped for one channel)."""
    import dataclasses

    import numpy as np
    from scipy.ndimage import gaussian_filter1d

    from quantcal.training import data

    ref = data.load_dataset("digits").test
    g = torch.Generator().manual_seed(0)
    rgb = torch.randint(0, 256, (4, 3, 32, 32), generator=g, dtype=torch.uint8)
    split = dataclasses.replace(
        ref,
        images=rgb,
        labels=ref.labels[:4],
        indices=ref.indices[:4],
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
    )
    got = synthetic_ood("blurred", split).images
    x = rgb.double().numpy()
    for axis in (3, 2):  # sigma = 32 / 8 pixels, radius ceil(3 sigma), reflected borders
        x = gaussian_filter1d(x, sigma=4.0, axis=axis, mode="mirror", truncate=3.0)
    want = torch.from_numpy(np.clip(np.round(x), 0, 255))
    assert got.shape == rgb.shape and got.dtype == torch.uint8
    assert (got.double() - want).abs().max() <= 1
    assert not torch.equal(got[:, 0], got[:, 1])  # each channel its own
