"""The common corruptions (quantcal.training.corruptions): shift specs, determinism, sizes,
severity ordering on a fixed classifier, Pillow's resampling, and, where the imagecorruptions
package is installed (``make test-corruptions``), equality with its definitions under its
ImageNet-C constants."""

from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from quantcal.training import corruptions_ops as ops
from quantcal.training.corruptions import (
    ALIASES,
    CORRUPTIONS,
    SEVERITIES,
    ShiftError,
    corrupt,
    expand_shifts,
    parse_shift,
)
from quantcal.training.corruptions_defs import DEFINITIONS

RANDOM = {
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "glass_blur",
    "motion_blur",
    "snow",
    "frost",
    "fog",
    "elastic_transform",
}


def _images(n: int, c: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Smooth-ish images: a random low-resolution pattern enlarged, plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, c, max(2, h // 4), max(2, w // 4), generator=g)
    x = torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
    x = x + 0.05 * torch.rand(n, c, h, w, generator=g)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


# -- specs ---------------------------------------------------------------------------------------


def test_names_match_definitions_and_hendrycks_order() -> None:
    assert tuple(d.name for d in DEFINITIONS) == CORRUPTIONS
    assert len(CORRUPTIONS) == 15 and SEVERITIES == (1, 2, 3, 4, 5)
    assert CORRUPTIONS[0] == "gaussian_noise" and CORRUPTIONS[-1] == "jpeg_compression"
    assert all(len(d.table) == 5 for d in DEFINITIONS)
    assert set(ALIASES.values()) <= set(CORRUPTIONS)


def test_parse_shift() -> None:
    assert parse_shift("gaussian_noise:3") == ("gaussian_noise", 3)
    assert parse_shift("jpeg:5") == ("jpeg_compression", 5)
    assert parse_shift(" Gaussian Noise : 2 ") == ("gaussian_noise", 2)
    assert parse_shift("elastic:1") == ("elastic_transform", 1)


@pytest.mark.parametrize(
    "spec, words",
    [
        ("gaussian_noise", ["needs a severity"]),
        ("blur:3", ["unknown corruption", "gaussian_noise", "jpeg_compression", "jpeg"]),
        ("fog:0", ["1..5", "0"]),
        ("fog:6", ["1..5", "6"]),
        ("fog:x", ["integer", "'x'"]),
        ("fog:2.0", ["integer"]),
        ("all:3", ["expand_shifts"]),
    ],
)
def test_parse_shift_errors(spec: str, words: list[str]) -> None:
    with pytest.raises(ShiftError) as err:
        parse_shift(spec)
    for word in words:
        assert word in str(err.value)
    assert isinstance(err.value, ValueError)


def test_expand_shifts() -> None:
    every = expand_shifts(["all"])
    assert len(every) == 75 and every[0] == "gaussian_noise:1" and every[-1] == "jpeg_compression:5"
    assert expand_shifts(["all:3"]) == [f"{n}:3" for n in CORRUPTIONS]
    assert expand_shifts(["fog"]) == [f"fog:{s}" for s in SEVERITIES]
    assert expand_shifts("jpeg:2") == ["jpeg_compression:2"]
    # deduplicated, in CORRUPTIONS order then severity, whatever the input order
    assert expand_shifts(
        ["jpeg:5", "fog:2", "gaussian:4", "fog:2", "fog:1", "jpeg_compression:5"]
    ) == [
        "gaussian_noise:4",
        "fog:1",
        "fog:2",
        "jpeg_compression:5",
    ]
    assert expand_shifts(["all:1", "contrast"])[:2] == ["gaussian_noise:1", "shot_noise:1"]
    assert len(expand_shifts(["all:1", "contrast"])) == 15 + 4
    assert expand_shifts([]) == []


@pytest.mark.parametrize("spec", ["nope", "all:0", "all:9", "fog:six", "", "fog:"])
def test_expand_shifts_errors(spec: str) -> None:
    with pytest.raises(ShiftError) as err:
        expand_shifts(["fog", spec])
    text = str(err.value)
    assert (
        ("valid names" in text and "gaussian_noise" in text)
        or "1..5" in text
        or "non-empty" in text
    )


# -- inputs and outputs --------------------------------------------------------------------------


def test_bad_input() -> None:
    x = _images(2, 3, 32, 32)
    with pytest.raises(ValueError, match="uint8"):
        corrupt(x.float(), "fog", 1)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        corrupt(x[0], "fog", 1)
    with pytest.raises(ValueError, match="1 or 3 channels"):
        corrupt(x[:, :2], "fog", 1)
    with pytest.raises(ValueError, match="at least"):
        corrupt(x[:, :, :2, :2], "fog", 1)
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        corrupt(x.numpy(), "fog", 1)
    with pytest.raises(ShiftError, match="valid names"):
        corrupt(x, "rain", 1)
    with pytest.raises(ShiftError, match=r"1\.\.5"):
        corrupt(x, "fog", 6)
    with pytest.raises(ValueError, match="seed"):
        corrupt(x, "fog", 1, seed=-1)
    with pytest.raises(ValueError, match="batch_size"):
        corrupt(x, "fog", 1, batch_size=0)


def test_empty_batch_gives_empty_tensor() -> None:
    out = corrupt(torch.zeros(0, 3, 32, 32, dtype=torch.uint8), "gaussian_noise", 3)
    assert out.shape == (0, 3, 32, 32) and out.dtype == torch.uint8


@pytest.mark.parametrize("shape", [(3, 1, 8, 8), (3, 3, 28, 28), (3, 3, 32, 32), (2, 3, 64, 48)])
def test_every_corruption_any_size(shape: tuple[int, int, int, int]) -> None:
    x = _images(*shape)
    for name in CORRUPTIONS:
        for severity in (1, 5):
            y = corrupt(x, name, severity)
            assert y.shape == x.shape and y.dtype == torch.uint8 and y.device.type == "cpu"
            # severity 1 of glass blur (sigma 0.05) is the identity; so is defocus at 8 px,
            # where its largest disk (radius 1.5 · 8/32 px) is smaller than a pixel
            if severity == 5 and not (name == "defocus_blur" and shape[2] == 8):
                assert not torch.equal(y, x), name


# -- determinism ---------------------------------------------------------------------------------


def test_deterministic_per_image() -> None:
    x = _images(10, 3, 32, 32, seed=3)
    for name in CORRUPTIONS:
        full = corrupt(x, name, 3, seed=7)
        assert torch.equal(full, corrupt(x, name, 3, seed=7))
        assert torch.equal(full, corrupt(x, name, 3, seed=7, batch_size=3))
        assert torch.equal(full[4:9], corrupt(x[4:9], name, 3, seed=7, start=4, batch_size=2))
        if name in RANDOM:
            assert not torch.equal(full, corrupt(x, name, 3, seed=8)), name
            assert not torch.equal(full[4:9], corrupt(x[4:9], name, 3, seed=7)), name


# -- severity ordering ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, np.ndarray, object]:
    """scikit-learn's digits at 32×32 RGB (bilinear), a logistic regression fitted on 1,400 of
    them, and the other 397 as the evaluation set."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    data = load_digits()
    x = torch.from_numpy(data.images).float()[:, None] / 16
    x = torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    perm = np.random.default_rng(0).permutation(len(x))
    train, test = perm[:1400], perm[1400:]
    model = LogisticRegression(max_iter=300, C=0.01)
    model.fit(_features(x[train]), data.target[train])
    return x[test], data.target[test], model


def _features(x: torch.Tensor) -> np.ndarray:
    return (x.float().mean(1) / 255).reshape(len(x), -1).numpy()


def test_severity_ordering(digits) -> None:
    x, y, model = digits
    clean = float((model.predict(_features(x)) == y).mean())
    assert clean > 0.9
    drops = []
    for name in CORRUPTIONS:
        acc, dist = [], []
        for severity in SEVERITIES:
            z = corrupt(x, name, severity)
            acc.append(float((model.predict(_features(z)) == y).mean()))
            dist.append(float((z.float() - x.float()).abs().mean()))
        # accuracy never rises by more than a few images from one severity to the next
        assert all(b <= a + 0.03 for a, b in itertools.pairwise(acc)), (name, acc)
        assert acc[-1] <= clean + 0.01, (name, acc)
        # damage in pixels grows with severity (a small slack for random draws); not frost's
        # from 3 on, where the darker image (c[0] 0.9 -> 0.75) offsets the added frost
        # elastic's, where Hendrycks' table shrinks the affine jitter (0.08 -> 0.03 of the side)
        # faster than its elastic field grows
        if name not in ("frost", "elastic_transform"):
            assert all(b >= a - 0.5 for a, b in itertools.pairwise(dist)), (name, dist)
            assert dist[-1] > dist[0], (name, dist)
        drops.append(acc[0] - acc[-1])
    assert np.mean(drops) > 0.05, drops


# -- Pillow and SciPy building blocks ------------------------------------------------------------


@pytest.mark.parametrize(
    "size_in, size_out", [((32, 32), (30, 30)), ((28, 20), (18, 13)), ((13, 9), (32, 24))]
)
def test_box_and_nearest_resize_equal_pillow(size_in, size_out) -> None:
    x = _images(4, 3, *size_in, seed=5)
    for mode, ours in ((Image.BOX, ops.pil_resize_box), (Image.NEAREST, ops.pil_resize_nearest)):
        got = ours(x.double(), *size_out).to(torch.uint8)
        for i in range(len(x)):
            im = Image.fromarray(x[i].permute(1, 2, 0).numpy()).resize(size_out[::-1], mode)
            assert np.array_equal(got[i].permute(1, 2, 0).numpy(), np.array(im)), mode


def test_pixelate_and_jpeg_follow_pillow() -> None:
    x = _images(3, 3, 32, 32, seed=6)
    for severity, c in zip(SEVERITIES, (0.95, 0.9, 0.85, 0.75, 0.65)):
        got = corrupt(x, "pixelate", severity)
        q = (80, 65, 58, 50, 40)[severity - 1]
        jpg = corrupt(x, "jpeg", severity)
        for i in range(len(x)):
            im = Image.fromarray(x[i].permute(1, 2, 0).numpy())
            small = im.resize((int(32 * c), int(32 * c)), Image.BOX).resize((32, 32), Image.BOX)
            assert np.array_equal(got[i].permute(1, 2, 0).numpy(), np.array(small))
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=q)
            ref = np.array(Image.open(buf))
            assert np.array_equal(jpg[i].permute(1, 2, 0).numpy(), ref)


def test_glass_blur_gather_equals_sequential_copies() -> None:
    """For δ = 1 the parallel gather equals the original's loop of copies run in order."""
    x = _images(3, 3, 16, 16, seed=2).double() / 255
    c = (0.0, 1, 2)
    rngs = [np.random.default_rng(i) for i in range(3)]
    defn = DEFINITIONS[CORRUPTIONS.index("glass_blur")]
    draws = [defn.sample(r, np.zeros((16, 16, 3)), c, 1.0) for r in rngs]
    stacked = {"dxy": np.stack([d["dxy"] for d in draws])}
    got = defn.apply(x, c, stacked, 1.0)
    for i in range(3):
        img = np.floor(x[i].permute(1, 2, 0).numpy() * 255)
        k = 0
        for it in range(2):
            k = 0
            for h in range(15, 1, -1):
                for w in range(15, 1, -1):
                    dx, dy = stacked["dxy"][i, it, k]
                    img[h, w] = img[h + dy, w + dx]
                    k += 1
        assert np.allclose(got[i].permute(1, 2, 0).numpy(), img)


# -- against imagecorruptions (make test-corruptions) ----------------------------------------------

# imagecorruptions/corruptions.py: its ImageNet-C constants, in the form our tables take
IMAGENET = {
    "gaussian_noise": [0.08, 0.12, 0.18, 0.26, 0.38],
    "shot_noise": [60, 25, 12, 5, 3],
    "impulse_noise": [0.03, 0.06, 0.09, 0.17, 0.27],
    "defocus_blur": [(3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)],
    "glass_blur": [(0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2)],
    "motion_blur": [(10, 3), (15, 5), (15, 8), (15, 12), (20, 15)],
    "zoom_blur": [(1.11, 0.01), (1.16, 0.01), (1.21, 0.02), (1.26, 0.02), (1.31, 0.03)],
    "snow": [
        (0.1, 0.3, 3, 0.5, 10, 4, 0.8),
        (0.2, 0.3, 2, 0.5, 12, 4, 0.7),
        (0.55, 0.3, 4, 0.9, 12, 8, 0.7),
        (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65),
        (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55),
    ],
    "fog": [(1.5, 2), (2.0, 2), (2.5, 1.7), (2.5, 1.5), (3.0, 1.4)],
    "brightness": [0.1, 0.2, 0.3, 0.4, 0.5],
    "contrast": [0.4, 0.3, 0.2, 0.1, 0.05],
    # alpha · max_dx (its uniform draws span ±0.005·H, ours ±1), sigma 0.01·H, no affine
    "elastic_transform": [(250 * f * 0.16, 0.32, 0.0) for f in (0.05, 0.065, 0.085, 0.1, 0.12)],
    "pixelate": [(f, "nearest") for f in (0.6, 0.5, 0.4, 0.3, 0.25)],
    "jpeg_compression": [25, 18, 15, 10, 7],
}
# largest allowed |difference| in levels, and the largest fraction of values that may differ
TOLERANCE = {
    "motion_blur": (1, 0.6),  # ImageMagick rounds (we follow), imagecorruptions truncates
    "snow": (2, 0.2),  # imagecorruptions blurs the layer before its 8-bit rounding
    "elastic_transform": (1, 0.01),
    "zoom_blur": (1, 0.01),  # float32 in the original
    "brightness": (1, 0.01),  # scikit-image's HSV round trip vs our ratio form
}


class _Replay:
    """The NumPy Generator methods our definitions draw with, answered from a legacy
    RandomState in imagecorruptions' call pattern (np.random.seed then module-level calls)."""

    def __init__(self, seed: int) -> None:
        self.rs = np.random.RandomState(seed)

    def normal(self, loc, scale, size):
        return self.rs.normal(size=size, loc=loc, scale=scale)

    def uniform(self, low, high, size=None):
        return self.rs.uniform(low, high, size)

    def random(self, size):
        return self.rs.random_sample(size)

    def poisson(self, lam):
        return self.rs.poisson(lam)

    def integers(self, low, high=None, size=None):
        if size is not None and size[-1] == 2:  # glass blur: one randint(size=(2,)) per pixel
            flat = [self.rs.randint(low, high, size=(2,)) for _ in range(int(np.prod(size[:-1])))]
            return np.array(flat, dtype=np.int64).reshape(size)
        return self.rs.randint(low, high, size)


@pytest.fixture(scope="module")
def imagecorruptions():
    ic = pytest.importorskip("imagecorruptions")
    import imagecorruptions.corruptions as icc

    # imagecorruptions 1.1.2 predates NumPy 2 (np.float_) and scikit-image 0.19's channel_axis
    if not hasattr(np, "float_"):
        np.float_ = np.float64
    gaussian = icc.gaussian

    def gaussian_compat(*args, multichannel=None, **kwargs):
        if multichannel:
            kwargs["channel_axis"] = -1
        return gaussian(*args, **kwargs)

    icc.gaussian = gaussian_compat
    return ic


@pytest.mark.parametrize("name", sorted(IMAGENET))
def test_equals_imagecorruptions(imagecorruptions, name, monkeypatch) -> None:
    x = _images(4, 3, 32, 32, seed=11)
    for severity in SEVERITIES:
        if name == "snow" and severity in (1, 4):
            # zooms 3 and 4.5 enlarge 32 px to 33 and 36: imagecorruptions blurs the whole
            # layer and keeps its top-left 32, make_cifar_c.py keeps the centre 32 first
            continue
        params = IMAGENET[name][severity - 1]
        ours = corrupt(x, name, severity, params=params, rng_for=lambda i: _Replay(100 + i))
        for i in range(len(x)):
            np.random.seed(100 + i)
            if name == "impulse_noise":  # scikit-image draws from an unseeded default_rng
                twin = np.random.RandomState(100 + i)
                monkeypatch.setattr(np.random, "default_rng", lambda seed=None, t=twin: t)
            ref = imagecorruptions.corrupt(
                x[i].permute(1, 2, 0).numpy(), corruption_name=name, severity=severity
            )
            monkeypatch.undo()
            got = ours[i].permute(1, 2, 0).numpy().astype(int)
            diff = np.abs(got - ref.astype(int))
            most, share = TOLERANCE.get(name, (0, 0.0))
            assert diff.max() <= most, (name, severity, diff.max())
            assert (diff > 0).mean() <= share, (name, severity, (diff > 0).mean())
