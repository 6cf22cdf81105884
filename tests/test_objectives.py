"""Training objectives: values and gradients against direct numpy re-derivations of each formula,
the limits that reduce to cross-entropy, bad input, and the study axis end to end on digits."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from quantcal import study
from quantcal.training import objectives
from quantcal.training.train import TrainConfig

# ------------------------------------------------------------------------------------------
# Independent re-derivations (float64 numpy; no code shared with quantcal.training.objectives)
# ------------------------------------------------------------------------------------------


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _onehot(y: np.ndarray, k: int) -> np.ndarray:
    return np.eye(k)[y]


def ref_ce(z, y):
    p = _softmax(z)
    n, k = z.shape
    value = -np.log(p[np.arange(n), y]).mean()
    grad = (p - _onehot(y, k)) / n
    return value, grad


def ref_label_smoothing(z, y, eps):
    p = _softmax(z)
    n, k = z.shape
    q = (1 - eps) * _onehot(y, k) + eps / k
    value = -(q * np.log(p)).sum(1).mean()
    grad = (p - q) / n  # sum_k q_k = 1
    return value, grad


def ref_focal(z, y, gamma):
    """FL = -(1-p)^g log p, p = softmax(z)_y; dFL/dz_k = dFL/dp * p (1[k=y] - p_k), with
    dFL/dp = g (1-p)^(g-1) log p - (1-p)^g / p (g held constant per sample)."""
    p_all = _softmax(z)
    n, k = z.shape
    gamma = np.broadcast_to(np.asarray(gamma, dtype=np.float64), (n,))
    p = p_all[np.arange(n), y]
    value = (-((1 - p) ** gamma) * np.log(p)).mean()
    with np.errstate(divide="ignore", invalid="ignore"):
        d_dp = (
            np.where(gamma > 0, gamma * (1 - p) ** (gamma - 1) * np.log(p), 0.0)
            - (1 - p) ** gamma / p
        )
    grad = d_dp[:, None] * p[:, None] * (_onehot(y, k) - p_all) / n
    return value, grad


def ref_mbls(z, y, margin, weight):
    ce_v, ce_g = ref_ce(z, y)
    n, _ = z.shape
    top = z.argmax(1)
    gaps = z.max(1, keepdims=True) - z
    active = gaps > margin
    value = ce_v + weight * (np.maximum(gaps - margin, 0).sum(1)).mean()
    g = np.zeros_like(z)
    g[np.arange(n), top] += active.sum(1)
    g -= active
    return value, ce_g + weight * g / n


def _value_and_grad(spec, z: np.ndarray, y: np.ndarray):
    zt = torch.tensor(z, dtype=torch.float64, requires_grad=True)
    obj = objectives.build(spec)
    loss = obj.loss(zt, torch.from_numpy(y))
    loss.backward()
    return float(loss.detach()), zt.grad.numpy()


def _logits(n=64, k=10, scale=3.0, seed=0):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, k)) * scale
    y = rng.integers(0, k, size=n)
    return z, y


# ------------------------------------------------------------------------------------------
# Values and gradients
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [0.1, 3.0, 30.0])
@pytest.mark.parametrize(
    ("spec", "ref"),
    [
        ("ce", ref_ce),
        ({"name": "label_smoothing", "epsilon": 0.1}, lambda z, y: ref_label_smoothing(z, y, 0.1)),
        ({"name": "label_smoothing", "epsilon": 0.6}, lambda z, y: ref_label_smoothing(z, y, 0.6)),
        ({"name": "focal", "gamma": 1}, lambda z, y: ref_focal(z, y, 1.0)),
        ({"name": "focal", "gamma": 3}, lambda z, y: ref_focal(z, y, 3.0)),
        ({"name": "mbls", "margin": 2, "weight": 0.5}, lambda z, y: ref_mbls(z, y, 2.0, 0.5)),
        ({"name": "mbls", "margin": 10, "weight": 0.1}, lambda z, y: ref_mbls(z, y, 10.0, 0.1)),
    ],
)
def test_value_and_gradient_match_the_formula(spec, ref, scale):
    z, y = _logits(scale=scale)
    value, grad = _value_and_grad(spec, z, y)
    ref_value, ref_grad = ref(z, y)
    assert value == pytest.approx(ref_value, rel=1e-10, abs=1e-12)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-8, atol=1e-12)


def test_flsd53_uses_gamma_5_below_0_2_and_3_above():
    z, y = _logits(n=200, scale=2.0)
    p = _softmax(z)[np.arange(len(y)), y]
    assert (p < 0.2).any() and (p >= 0.2).any()  # both regimes are exercised
    gamma = np.where(p < 0.2, 5.0, 3.0)
    value, grad = _value_and_grad("flsd53", z, y)
    ref_value, ref_grad = ref_focal(z, y, gamma)
    assert value == pytest.approx(ref_value, rel=1e-10)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-8, atol=1e-12)


def test_gradients_pass_gradcheck():
    z, y = _logits(n=6, k=5, scale=2.0)
    for spec in ("ce", "label_smoothing", "focal", {"name": "mbls", "margin": 1.0}):
        obj = objectives.build(spec)
        zt = torch.tensor(z, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda t, o=obj: o.loss(t, torch.from_numpy(y)), (zt,))


@pytest.mark.parametrize(
    "spec",
    [
        {"name": "focal", "gamma": 0},
        {"name": "label_smoothing", "epsilon": 0},
        {"name": "mbls", "weight": 0},
    ],
)
def test_limits_equal_cross_entropy(spec):
    z, y = _logits(scale=4.0)
    zt = torch.tensor(z, dtype=torch.float32)
    yt = torch.from_numpy(y)
    a = objectives.build(spec).loss(zt, yt)
    b = objectives.build("ce").loss(zt, yt)
    assert torch.allclose(a, b, rtol=1e-6, atol=0)


def test_mixup_matches_its_contract():
    """lam = max(b, 1-b), b ~ Beta(alpha, alpha), perm from the same generator; the loss mixes
    the two cross-entropies of the mixed batch's logits."""
    torch.manual_seed(0)
    x = torch.randn(12, 5, dtype=torch.float64)
    y = torch.randint(0, 4, (12,))
    w = torch.randn(5, 4, dtype=torch.float64)
    seed = (3, 1, 7)
    rng = np.random.default_rng(seed)
    b = rng.beta(0.4, 0.4)
    lam = max(b, 1 - b)
    perm = rng.permutation(12)
    mixed = lam * x.numpy() + (1 - lam) * x.numpy()[perm]
    z = mixed @ w.numpy()
    ref = lam * ref_ce(z, y.numpy())[0] + (1 - lam) * ref_ce(z, y.numpy()[perm])[0]
    loss, logits = objectives.build({"name": "mixup", "alpha": 0.4})(lambda t: t @ w, x, y, seed)
    assert float(loss.detach()) == pytest.approx(ref, rel=1e-12)
    np.testing.assert_allclose(logits.numpy(), z, rtol=1e-12)
    assert 0.5 <= lam <= 1.0


def test_mixup_with_alpha_near_zero_trains_exactly_like_cross_entropy():
    from quantcal.training import train
    from test_train import _net, _split

    split, make_net = _split(), _net
    cfg = dict(epochs=2, batch_size=8, lr=0.05, crop_padding=1, deterministic=True)
    a = train.train(make_net(), split, TrainConfig(**cfg), progress=False)
    b = train.train(
        make_net(),
        split,
        TrainConfig(objective={"name": "mixup", "alpha": 1e-6}, **cfg),
        progress=False,
    )
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k]), k
    c = train.train(
        make_net(),
        split,
        TrainConfig(objective={"name": "mixup", "alpha": 1.0}, **cfg),
        progress=False,
    )
    assert any(not torch.equal(v, c.model.state_dict()[k]) for k, v in a.model.state_dict().items())


@pytest.mark.parametrize("spec", ["ce", "label_smoothing", "focal", "flsd53", "mixup", "mbls"])
def test_every_objective_trains_under_bf16_autocast(spec):
    from quantcal.training import train
    from test_train import _net, _split

    split, make_net = _split(), _net
    res = train.train(
        make_net(),
        split,
        TrainConfig(objective=spec, epochs=1, batch_size=8, lr=0.05, amp="bf16"),
        device="cpu",
        progress=False,
    )
    assert np.isfinite(res.history[0]["loss"])


# ------------------------------------------------------------------------------------------
# Specs and bad input
# ------------------------------------------------------------------------------------------
def test_canonical_fills_defaults_and_labels_are_stable():
    assert objectives.canonical("focal") == {"name": "focal", "gamma": 3.0}
    assert objectives.canonical({"name": "FOCAL", "gamma": 3}) == {"name": "focal", "gamma": 3.0}
    assert objectives.label({"name": "mixup", "alpha": 0.2}) == "mixup(alpha=0.2)"
    assert objectives.label("ce") == "ce"
    assert set(objectives.available()) >= {
        "ce",
        "label_smoothing",
        "focal",
        "flsd53",
        "mixup",
        "mbls",
    }


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("focla", "did you mean 'focal'.*valid objectives: ce, flsd53, focal"),
        ("softmax_xent", "valid objectives"),
        ({"name": "label_smoothing", "epsilon": 1.0}, r"epsilon must be in \[0, 1\)"),
        ({"name": "label_smoothing", "epsilon": -0.1}, r"epsilon must be in \[0, 1\)"),
        ({"name": "focal", "gamma": -1}, r"gamma must be in \[0, 20\]"),
        ({"name": "mixup", "alpha": 0}, r"alpha must be in \(0, 10\]"),
        ({"name": "mixup", "alpha": float("nan")}, "finite number"),
        ({"name": "mbls", "margin": 0}, r"margin must be in \(0, inf\)"),
        ({"name": "focal", "gama": 2}, "takes no \\['gama'\\]; its parameters: gamma"),
        ({"gamma": 2}, "a name or a table with 'name'"),
        ({"name": "focal", "gamma": "3"}, "finite number"),
    ],
)
def test_bad_objectives_are_clear(spec, match):
    with pytest.raises(ValueError, match=match):
        objectives.canonical(spec)


def test_study_axis_validation():
    base = {"model": [{"arch": "shufflenetv2"}]}
    with pytest.raises(ValueError, match="twice"):
        study.load_study({**base, "train": {"objectives": ["ce", {"name": "ce"}]}})
    with pytest.raises(ValueError, match="given twice"):
        study.load_study({**base, "train": {"objectives": ["ce"], "objective": "focal"}})
    with pytest.raises(ValueError, match="valid objectives"):
        study.load_study({**base, "train": {"objectives": ["ce", "focl"]}})
    one = study.load_study({**base, "train": {"objective": "focal"}})
    assert one.objective_labels() == ["focal(gamma=3)"]
    assert study.load_study(base).objective_labels() == ["ce"]


# ------------------------------------------------------------------------------------------
# The preset's digits smoke form, end to end
# ------------------------------------------------------------------------------------------
def test_calibration_training_preset_runs_on_digits(tmp_path):
    out = tmp_path / "run"
    study.run_study(
        "calibration_training",
        out,
        quiet=True,
        overrides={
            "data.datasets": ["digits"],
            "data.val_size": 180,
            "data.ptq_calib_size": 100,
            "model": [{"arch": "shufflenetv2", "width": 0.1}],
            "train.epochs": 1,
            "train.batch_size": 64,
            "train.augment": False,
            "quant.precisions": ["fp32", "W4A4"],
            "metrics.bootstrap": 30,
        },
    )
    with open(out / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    labels = study.load_study("calibration_training").objective_labels()
    assert len(labels) == 6
    assert [r["objective"] for r in rows if r["precision"] == "fp32" and r["recal"] == "none"] == (
        labels
    )
    assert len(rows) == 6 * 2 * 3 and all(r["status"] == "ok" for r in rows)
    # Six different models: their fp32 logits differ.
    assert len({r["nll"] for r in rows if r["precision"] == "fp32" and r["recal"] == "none"}) == 6
    html = (out / "report.html").read_text()
    assert "Training for calibration keeps quantized models calibrated" in html
    assert "mixup(alpha=0.2)" in html


def test_objective_finding_verdicts_from_hand_made_rows():
    from quantcal.findings.claims import training_objectives

    def row(obj, prec, recal, diff, lo, hi):
        return {
            "status": "ok",
            "dataset": "d",
            "arch": "a",
            "width": 1.0,
            "objective": obj,
            "precision": prec,
            "recal": recal,
            "ece": 0.05 + diff,
            "ece_lo": 0.05 + lo,
            "ece_hi": 0.05 + hi,
            "accuracy": 0.9,
            "ece_diff_vs_fp32": diff,
            "ece_diff_vs_fp32_lo": lo,
            "ece_diff_vs_fp32_hi": hi,
            "ece_diff_vs_none": -0.01,
            "ece_diff_vs_none_lo": -0.02,
            "ece_diff_vs_none_hi": 0.0,
        }

    rows = []
    for obj, (lo, hi) in {
        "ce": (0.10, 0.20),
        "good": (0.01, 0.05),
        "bad": (0.25, 0.30),
        "same": (0.12, 0.18),
    }.items():
        rows += [row(obj, "fp32", "none", 0.0, 0.0, 0.0), row(obj, "W4A4", "none", lo, lo, hi)]
        rows += [row(obj, "W4A4", "temperature", 0.0, 0.0, 0.0)]
    f = training_objectives(rows)
    ev = " ".join(f.evidence)
    assert "d / a@1 / good" in ev and "supported" in ev and "contradicted" in ev
    assert f.verdict == "supported 1 of 3, contradicted 1 of 3, undecided 1 of 3"
    assert f.tested and {n["model"] for n in f.rows} >= {"a@1 good", "a@1 ce"}
    assert not training_objectives([r for r in rows if r["objective"] == "ce"]).tested
