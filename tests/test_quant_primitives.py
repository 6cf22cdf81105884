"""quant.primitives, quant.observers and quant.config against torch's fake-quant ops and numpy."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from quantcal.quant import config as qconfig
from quantcal.quant import observers as qobs
from quantcal.quant import primitives as P

BITS = [2, 4, 8, 12, 16]


def _weight(shape=(6, 4, 3, 3), seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * torch.logspace(-2, 1, shape[0]).reshape(-1, 1, 1, 1)
    w[2] = 0.0  # an all-zero channel
    return w


# ----------------------------------------------------------------------------- weights


@pytest.mark.parametrize("bits", BITS)
def test_weight_fake_quant_equals_torch_op(bits):
    w = _weight()
    scale = P.weight_scale_per_channel(w, bits)
    q_max = 2 ** (bits - 1) - 1
    # numpy re-derivation of the scales; the zero channel is guarded to 1.0
    amax = np.abs(w.numpy()).reshape(6, -1).max(axis=1)
    expected = np.where(amax > 0, amax / q_max, 1.0).astype(np.float32)
    np.testing.assert_allclose(scale.numpy(), expected, rtol=1e-6)
    ours = P.fake_quantize_per_channel(w, scale, bits)
    ref = torch.fake_quantize_per_channel_affine(
        w, scale, torch.zeros(6, dtype=torch.int32), 0, -q_max, q_max
    )
    assert torch.equal(ours, ref)
    assert torch.equal(ours[2], torch.zeros_like(ours[2]))
    assert torch.isfinite(ours).all()
    q = P.quantize_per_channel(w, scale, bits)
    assert q.abs().max() <= q_max
    assert torch.equal(P.dequantize_per_channel(q, scale), ours)


@pytest.mark.parametrize("bits,limit", [(8, 255), (4, 15), (2, 3)])
def test_weight_channel_has_at_most_2b_minus_1_values(bits, limit):
    w = torch.randn(3, 4096)
    out = P.fake_quantize_per_channel(w, P.weight_scale_per_channel(w, bits), bits)
    for c in range(3):
        assert out[c].unique().numel() <= limit
    # the channel maximum is represented exactly (scale = max|W| / q_max)
    assert torch.allclose(out.abs().amax(1), w.abs().amax(1), rtol=1e-6)


def test_weight_axis_for_linear_and_other_axis():
    w = torch.randn(5, 7)
    s0 = P.weight_scale_per_channel(w, 8, axis=0)
    s1 = P.weight_scale_per_channel(w, 8, axis=1)
    assert s0.shape == (5,) and s1.shape == (7,)
    ref = torch.fake_quantize_per_channel_affine(
        w, s1, torch.zeros(7, dtype=torch.int32), 1, -127, 127
    )
    assert torch.equal(P.fake_quantize_per_channel(w, s1, 8, axis=1), ref)


def test_weight_bad_input():
    w = torch.randn(4, 3)
    with pytest.raises(ValueError, match="bits"):
        P.weight_scale_per_channel(w, 1)
    with pytest.raises(ValueError, match="bits"):
        P.weight_scale_per_channel(w, 17)
    with pytest.raises(TypeError, match="int"):
        P.weight_scale_per_channel(w, 8.0)
    with pytest.raises(ValueError, match="scale must have shape"):
        P.fake_quantize_per_channel(w, torch.ones(3), 8)
    with pytest.raises(TypeError, match="floating-point"):
        P.weight_scale_per_channel(torch.ones(4, 3, dtype=torch.int64), 8)
    with pytest.raises(ValueError, match="axis"):
        P.weight_scale_per_channel(w, 8, axis=2)


# ----------------------------------------------------------------------------- activations


@pytest.mark.parametrize(
    "lo,hi", [(-1.3, 2.7), (0.0, 6.0), (0.5, 3.0), (-4.0, -1.0), (-1e-3, 1e-3), (0.0, 0.0)]
)
@pytest.mark.parametrize("bits", BITS)
def test_activation_qparams_and_fake_quant(lo, hi, bits):
    scale, zp = P.activation_qparams(lo, hi, bits)
    q_max = 2**bits - 1
    lo0, hi0 = min(lo, 0.0), max(hi, 0.0)
    if hi0 > lo0:
        # numpy re-derivation (float32 scale, integer zero-point)
        s_ref = np.float32((hi0 - lo0) / q_max)
        assert scale == float(s_ref)
        assert zp == int(np.clip(np.rint(np.float32(-lo0) / s_ref), 0, q_max))
    else:
        assert (scale, zp) == (1.0, 0)
    assert isinstance(zp, int) and 0 <= zp <= q_max
    x = torch.linspace(lo0 - 1.0, hi0 + 1.0, 5001)
    x = torch.cat([x, torch.zeros(3)])
    ours = P.fake_quantize_per_tensor(x, scale, zp, bits)
    ref = torch.fake_quantize_per_tensor_affine(x, scale, zp, 0, q_max)
    assert torch.equal(ours, ref)
    assert ours.unique().numel() <= 2**bits
    assert torch.equal(ours[-3:], torch.zeros(3))  # zero exactly representable
    q = P.quantize_per_tensor(x, scale, zp, bits)
    assert q.min() >= 0 and q.max() <= q_max
    assert torch.equal(P.dequantize_per_tensor(q, scale, zp), ours)
    fast = P.fake_quantize_per_tensor_fast(
        x, scale, float(torch.reciprocal(torch.tensor(scale))), zp, 0, q_max
    )
    assert torch.equal(fast, ref)


def test_activation_non_contiguous_input():
    # channel shuffle / chunk views (pytorch #75009): results must equal the contiguous ones
    x = torch.randn(2, 8, 5, 5)
    view = x.reshape(2, 2, 4, 5, 5).transpose(1, 2).reshape(2, 8, 5, 5)[:, ::2]
    chunk = x.chunk(2, dim=1)[1]
    scale, zp = P.activation_qparams(-3.0, 3.0, 8)
    for t in (view, chunk, x.permute(0, 2, 3, 1)):
        assert not t.is_contiguous()
        expected = P.fake_quantize_per_tensor(t.contiguous(), scale, zp, 8)
        assert torch.equal(P.fake_quantize_per_tensor(t, scale, zp, 8), expected)
        assert torch.equal(
            P.fake_quantize_per_tensor(t, scale, zp, 12),
            P.fake_quantize_per_tensor(t.contiguous(), scale, zp, 12),
        )


def test_activation_bad_input():
    with pytest.raises(ValueError, match="lo <= hi"):
        P.activation_qparams(1.0, -1.0, 8)
    with pytest.raises(ValueError, match="finite"):
        P.activation_qparams(float("nan"), 1.0, 8)
    with pytest.raises(ValueError, match="zero_point"):
        P.fake_quantize_per_tensor(torch.randn(3), 0.1, 300, 8)


# ----------------------------------------------------------------------------- observers


def test_registry_lists_the_estimators():
    assert {"minmax", "percentile", "mse"} <= set(qobs.available_observers())
    with pytest.raises(ValueError, match="Did you mean 'minmax'"):
        qobs.get_observer("minmaxx")


@pytest.mark.parametrize("name", qobs.available_observers())
def test_every_observer_contract(name):
    obs = qobs.get_observer(name, bits=8, percentile=99.9)
    with pytest.raises(ValueError, match="no values"):
        obs.range()
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(4, 3, 8, 8, generator=g) * (i + 1) for i in range(3)]
    for x in xs:
        obs.observe(x)
    lo, hi = obs.range()
    data = torch.cat([x.flatten() for x in xs])
    assert data.min() - 1e-6 <= lo <= hi <= data.max() + 1e-6
    assert lo < 0 < hi
    with pytest.raises(ValueError, match="NaN"):
        obs.observe(torch.tensor([float("nan")]))


def test_minmax_is_running_min_max():
    obs = qobs.get_observer("minmax")
    obs.observe(torch.tensor([0.5, 2.0]))
    obs.observe(torch.tensor([-1.0, 1.0]))
    assert obs.range() == (-1.0, 2.0)


def test_percentile_matches_numpy_on_pooled_data():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(20000, generator=g) * s + m for s, m in ((1.0, 0.0), (2.0, 1.0), (0.5, -1))]
    obs = qobs.get_observer("percentile", percentile=99.0, bins=4096)
    for x in xs:
        obs.observe(x)
    pooled = torch.cat(xs).numpy()
    lo, hi = obs.range()
    width = (pooled.max() - pooled.min()) / 4096
    assert abs(hi - np.percentile(pooled, 99.0)) < 3 * width
    assert abs(lo - np.percentile(pooled, 1.0)) < 3 * width
    full = qobs.get_observer("percentile", percentile=100.0)
    full.observe(xs[0])
    assert full.range() == (float(xs[0].min()), float(xs[0].max()))


def _quant_mse(x: torch.Tensor, lo: float, hi: float, bits: int) -> float:
    scale, zp = P.activation_qparams(lo, hi, bits)
    return float((P.fake_quantize_per_tensor(x, scale, zp, bits) - x).pow(2).mean())


def test_mse_observer_beats_minmax_on_heavy_tails_and_is_near_brute_force():
    g = torch.Generator().manual_seed(0)
    # ReLU of a heavy-tailed variable: half exact zeros, rare large values
    x = torch.relu(torch.randn(50000, generator=g) / torch.rand(50000, generator=g).sqrt())
    x = x.clamp(max=60.0)
    obs = qobs.get_observer("mse", bits=4)
    for part in x.chunk(3):
        obs.observe(part)
    lo, hi = obs.range()
    assert lo == 0.0
    mse_obs = _quant_mse(x, lo, hi, 4)
    mse_minmax = _quant_mse(x, float(x.min()), float(x.max()), 4)
    brute = min(_quant_mse(x, 0.0, float(t), 4) for t in torch.linspace(0.1, 60, 600))
    assert mse_obs < 0.8 * mse_minmax
    assert mse_obs <= 1.05 * brute


def test_observer_options_are_validated():
    with pytest.raises(ValueError, match="percentile"):
        qobs.get_observer("percentile", percentile=40)
    with pytest.raises(ValueError, match="bins"):
        qobs.get_observer("mse", bins=3)
    with pytest.raises(ValueError, match="bits"):
        qobs.get_observer("minmax", bits=1)


# ----------------------------------------------------------------------------- config


def test_precisions_and_parse():
    assert qconfig.PRECISIONS == ("fp32", "W8A8", "W4A8", "W4A4")
    assert qconfig.parse_precision("fp32") is None
    assert qconfig.parse_precision("FP32") is None
    for p in qconfig.PRECISIONS[1:]:
        assert qconfig.parse_precision(p).name == p
    cfg = qconfig.parse_precision("w6a16", observer="mse")
    assert (cfg.weight_bits, cfg.act_bits, cfg.observer) == (6, 16, "mse")
    assert qconfig.parse_precision(" W2A2 ").name == "W2A2"


@pytest.mark.parametrize("bad", ["W8", "int8", "W8A8x", "W1A8", "W8A17", "W0A0", "", "fp16"])
def test_parse_precision_rejects(bad):
    with pytest.raises(ValueError, match="accepted") as err:
        qconfig.parse_precision(bad)
    assert repr(bad) in str(err.value)


def test_parse_precision_type_and_override_errors():
    with pytest.raises(TypeError):
        qconfig.parse_precision(8)
    with pytest.raises(ValueError, match="weight_bits"):
        qconfig.parse_precision("W8A8", weight_bits=4)
    with pytest.raises(ValueError, match="Did you mean 'observer'"):
        qconfig.parse_precision("W8A8", observr="mse")


def test_quant_config_validation_and_round_trip():
    cfg = qconfig.QuantConfig(weight_bits=4, act_bits=8, observer="Percentile", percentile=99.9)
    assert cfg.observer == "percentile" and cfg.name == "W4A8"
    assert qconfig.QuantConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.weight_bits = 8
    with pytest.raises(ValueError, match=r"weight_bits.*2\.\.16"):
        qconfig.QuantConfig(weight_bits=1)
    with pytest.raises(ValueError, match="act_bits"):
        qconfig.QuantConfig(act_bits=32)
    with pytest.raises(ValueError, match=r"observer.*minmax"):
        qconfig.QuantConfig(observer="kl")
    with pytest.raises(ValueError, match="percentile"):
        qconfig.QuantConfig(percentile=101)
    with pytest.raises(ValueError, match="Did you mean 'act_bits'"):
        qconfig.QuantConfig.from_dict({"act_bit": 8})
    for bad in (4, 33, True, "32", 32.0):
        with pytest.raises(ValueError, match="bias_bits"):
            qconfig.QuantConfig(bias_bits=bad)
    assert qconfig.QuantConfig().bias_bits == 32
    assert qconfig.QuantConfig(bias_bits=None).bias_bits is None


# ----------------------------------------------------------------------------- biases


def _bias_reference(b: np.ndarray, s_x: float, s_w: np.ndarray, bits: int) -> np.ndarray:
    """Independent re-derivation: grid np.float32(s_x) * s_w, numpy round-half-even in float64."""
    scale = (np.float32(s_x) * s_w.astype(np.float32)).astype(np.float32)
    q_max = 2 ** (bits - 1) - 1
    q = np.clip(np.rint(b.astype(np.float64) / scale.astype(np.float64)), -q_max, q_max)
    return q.astype(np.float32) * scale


@pytest.mark.parametrize("bits", [8, 16, 32])
def test_bias_on_accumulator_grid_matches_numpy(bits):
    g = torch.Generator().manual_seed(3)
    s_w = torch.rand(6, generator=g) * 0.01 + 1e-4
    s_x = 0.0173
    bias = torch.randn(6, generator=g) * 3
    scale = (torch.tensor(s_x) * s_w).to(torch.float64)
    bias[0] = 0.0
    bias[1] = float(12.5 * scale[1])  # a tie: half to even (12)
    bias[2] = float(-7 * scale[2])  # exactly on the grid
    bias[3] = 1e6  # saturates below 32 bits
    out = P.fake_quantize_bias(bias, s_x, s_w, bits)
    ref = _bias_reference(bias.numpy(), s_x, s_w.numpy(), bits)
    assert np.array_equal(out.numpy(), ref)
    assert out[0] == 0.0 and out[2] == bias[2]
    assert out.dtype == bias.dtype
    steps = out.double() / (torch.tensor(s_x) * s_w).double()
    assert torch.allclose(steps, steps.round(), atol=1e-6)  # on the grid
    if bits < 32:
        assert steps[3].round() == 2 ** (bits - 1) - 1
    assert (out - bias).abs()[:3].max() <= 0.5 * (torch.tensor(s_x) * s_w)[:3].max()


def test_bias_bad_input():
    with pytest.raises(ValueError, match="one weight scale per channel"):
        P.fake_quantize_bias(torch.zeros(4), 0.1, torch.ones(3))
    with pytest.raises(ValueError, match="bias bits"):
        P.fake_quantize_bias(torch.zeros(3), 0.1, torch.ones(3), bits=4)
    with pytest.raises(TypeError, match="floating-point"):
        P.fake_quantize_bias(torch.zeros(3, dtype=torch.int32), 0.1, torch.ones(3))
