"""Pins of quant.primitives and quant.observers that the broad tests leave open: the documented
dtypes, devices and integer ranges at their edges, the messages that name what was wrong, the
defaults, and the histogram observers against float64 numpy re-derivations of their docstrings."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from quantcal.quant import observers as qobs
from quantcal.quant import primitives as P
from quantcal.quant.config import QuantConfig

TINY = torch.finfo(torch.float32).tiny


@pytest.fixture
def float64_default():
    """Run a test with torch's default dtype float64: the documented float32 grids must not
    follow the default dtype."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _near_ties(n: int = 4000, seed: int = 0) -> np.ndarray:
    """float64 values just off the rounding ties k + 0.5 (closer than float32 can resolve), so a
    computation in float64 rounds them differently from the float32 one the docs prescribe."""
    rng = np.random.default_rng(seed)
    k = rng.integers(-100, 100, n).astype(np.float64)
    off = rng.choice([-1.0, 1.0], n) * rng.uniform(1e-12, 1e-9, n)
    return (k + 0.5 + off) / 8.0


# ----------------------------------------------------------------------------- bit widths


@pytest.mark.parametrize("bits", range(2, 17))
def test_weight_int_dtype_is_the_smallest_container(bits):
    """Docstring: int8 up to 8 bits, else int16; the container holds the symmetric range."""
    dt = P.weight_int_dtype(bits)
    assert dt == (torch.int8 if bits <= 8 else torch.int16)
    assert torch.iinfo(dt).max >= 2 ** (bits - 1) - 1


def test_bit_width_errors_name_what_was_wrong():
    """Bad input gets a clear error: each message names the bit width it is about."""
    with pytest.raises(
        ValueError,
        match=r"^bits must be in \[2, 16\], got 1; use e\.g\. 8 for "
        r"int8 or 4 for int4$",
    ):
        P.check_bits(1)
    with pytest.raises(TypeError, match=r"^bits must be an int"):
        P.check_bits(8.0)
    with pytest.raises(ValueError, match=r"^weight bits must be in"):
        P.weight_qrange(17)
    with pytest.raises(ValueError, match=r"^weight bits must be in"):
        P.weight_int_dtype(1)
    with pytest.raises(ValueError, match=r"^activation bits must be in"):
        P.activation_qrange(17)
    with pytest.raises(ValueError, match=r"^activation bits must be in"):
        qobs.get_observer("minmax", bits=1)


@pytest.mark.parametrize(
    "call,name",
    [
        (lambda t: P.weight_scale_per_channel(t, 8), "weight"),
        (lambda t: P.weight_scale_per_tensor(t, 8), "weight"),
        (lambda t: P.quantize_per_channel(t, torch.ones(2), 8), "weight"),
        (lambda t: P.fake_quantize_per_channel(t, torch.ones(2), 8), "weight"),
        (lambda t: P.quantize_per_tensor(t, 0.1, 0, 8), "x"),
        (lambda t: P.fake_quantize_per_tensor(t, 0.1, 0, 8), "x"),
        (lambda t: P.quantize_bias(t.flatten()[:2], 0.1, torch.ones(2)), "bias"),
    ],
)
def test_non_float_input_errors_name_the_argument(call, name):
    """A non-float tensor or a non-tensor is a TypeError naming the argument and what it got."""
    with pytest.raises(
        TypeError,
        match=rf"^{name} must be a floating-point tensor, got dtype "
        r"torch\.int64$",
    ):
        call(torch.ones(2, 3, dtype=torch.int64))
    if name == "weight":
        with pytest.raises(TypeError, match=r"^weight must be a torch\.Tensor, got list$"):
            call([[1.0, 2.0]])


# ----------------------------------------------------------------------------- axes and shapes


def test_per_channel_needs_one_dimension_and_accepts_negative_axes():
    """A 0-d tensor is refused with a message saying why; a 1-D tensor (one value per channel)
    and the axis -dim are valid."""
    with pytest.raises(
        ValueError,
        match=r"^per-channel quantization needs a tensor with at least "
        r"one dimension$",
    ):
        P.weight_scale_per_channel(torch.tensor(1.0), 8)
    w = torch.tensor([0.5, -2.0, 0.0, 1e-3])
    s = P.weight_scale_per_channel(w, 8)
    expected = np.where(np.abs(w.numpy()) > 0, np.abs(w.numpy()) / 127, 1.0).astype(np.float32)
    assert s.shape == (4,) and np.array_equal(s.numpy(), expected)
    ref = torch.fake_quantize_per_channel_affine(
        w, s, torch.zeros(4, dtype=torch.int32), 0, -127, 127
    )
    assert torch.equal(P.fake_quantize_per_channel(w, s, 8), ref)
    w2 = torch.randn(3, 5)
    assert torch.equal(
        P.weight_scale_per_channel(w2, 8, axis=-2), P.weight_scale_per_channel(w2, 8, axis=0)
    )
    with pytest.raises(ValueError, match=r"axis -3 is out of range"):
        P.weight_scale_per_channel(w2, 8, axis=-3)


@pytest.mark.parametrize("bits", [8, 12])
def test_fake_quant_per_channel_on_axis_1_matches_torch_op(bits):
    """axis is honoured on both paths (the torch op to 8 bits, the own equivalent above)."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(4, 6, 3, generator=g) * torch.logspace(-1, 1, 6).reshape(1, 6, 1)
    s = P.weight_scale_per_channel(w, bits, axis=1)
    q_max = 2 ** (bits - 1) - 1
    ref = torch.fake_quantize_per_channel_affine(
        w, s, torch.zeros(6, dtype=torch.int32), 1, -q_max, q_max
    )
    assert torch.equal(P.fake_quantize_per_channel(w, s, bits, axis=1), ref)


def test_quantize_per_channel_clamps_to_the_narrow_symmetric_range():
    """q = clamp(round(W / s_c), -q_max, q_max): values beyond the scale's range saturate."""
    w = torch.tensor([[-100.0, -7.6, -3.0, 0.0, 2.4, 7.4, 100.0]])
    q = P.quantize_per_channel(w, torch.tensor([1.0]), 4)
    assert q.dtype == torch.int32
    assert q.tolist() == [[-7, -7, -3, 0, 2, 7, 7]]


# ----------------------------------------------------------------------------- per-tensor weights


@pytest.mark.parametrize("bits", [2, 8, 12])
def test_weight_scale_per_tensor_is_one_scale_repeated(bits):
    """s = max|W| / (2^(b-1) - 1) for the whole tensor, float32, repeated once per channel of
    ``axis`` (default 0); an all-zero tensor gets scale 1.0."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(5, 3, 2, generator=g) * 0.37
    q_max = 2 ** (bits - 1) - 1
    s_ref = np.float32(np.float32(np.abs(w.numpy()).max()) / np.float32(q_max))
    s = P.weight_scale_per_tensor(w, bits)
    assert s.dtype == torch.float32 and s.shape == (5,)
    assert np.array_equal(s.numpy(), np.full(5, s_ref, np.float32))
    s1 = P.weight_scale_per_tensor(w, bits, axis=1)
    assert s1.shape == (3,) and np.array_equal(s1.numpy(), np.full(3, s_ref, np.float32))
    assert P.weight_scale_per_tensor(w, bits, axis=-1).shape == (2,)
    # the same number as per-channel scales of the tensor seen as one channel
    assert s[0] == P.weight_scale_per_channel(w.reshape(1, -1), bits)[0]
    zero = P.weight_scale_per_tensor(torch.zeros(4, 3), bits)
    assert zero.dtype == torch.float32 and torch.equal(zero, torch.ones(4))
    # float64 weights: the scale is still float32 (of the float32 weights)
    s64 = P.weight_scale_per_tensor(w.double(), bits)
    assert s64.dtype == torch.float32 and torch.equal(s64, s)
    # independent scales: writing into one copy does not change the others
    s[0] = 7.0
    assert s[1] == s_ref


def test_weight_scale_per_tensor_bad_input():
    with pytest.raises(TypeError, match=r"^weight must be a floating-point tensor"):
        P.weight_scale_per_tensor(torch.ones(3, 2, dtype=torch.int32), 8)
    with pytest.raises(ValueError, match=r"^weight bits must be in"):
        P.weight_scale_per_tensor(torch.ones(3, 2), 17)
    with pytest.raises(ValueError, match=r"axis 2 is out of range"):
        P.weight_scale_per_tensor(torch.ones(3, 2), 8, axis=2)
    with pytest.raises(ValueError, match="at least one dimension"):
        P.weight_scale_per_tensor(torch.tensor(2.0), 8)


def test_scale_guards_share_one_threshold():
    """A scale of exactly the smallest normal float32 is guarded to 1.0 by every scale function
    alike (weights per channel, per tensor, activations): the three guards agree."""
    amax = 3 * TINY  # amax / 3 == tiny exactly: weights at 3 bits, activations at 2 bits
    w = torch.tensor([[amax, -amax / 2], [1.5, 0.0]])
    per_channel = P.weight_scale_per_channel(w, 3)
    per_tensor = P.weight_scale_per_tensor(w[:1], 3)
    scale, zp = P.activation_qparams(0.0, amax, 2)
    assert per_channel[0] == 1.0 and per_channel[1] == np.float32(0.5)
    assert torch.equal(per_tensor, torch.ones(1))
    assert (scale, zp) == (1.0, 0)
    # just above the threshold the scale is kept
    above = float(np.nextafter(np.float32(TINY), np.float32(1))) * 3
    assert P.weight_scale_per_channel(torch.tensor([[above]]), 3)[0] != 1.0
    assert P.activation_qparams(0.0, above, 2)[0] != 1.0


# ----------------------------------------------------------------------------- float32 arithmetic


def test_float64_inputs_are_quantized_as_float32():
    """The grids are float32 (module docstring: ``x * float32(1/s)`` as the torch ops): a float64
    tensor is quantized as its float32 value, on every path, and comes back in float64."""
    x64 = torch.from_numpy(_near_ties())
    x32 = x64.float()
    w64 = x64.reshape(1, -1)
    scale = torch.tensor([0.125])
    for bits in (8, 12):
        ref = P.fake_quantize_per_channel(w64.float(), scale, bits)
        out = P.fake_quantize_per_channel(w64, scale, bits)
        assert out.dtype == torch.float64 and torch.equal(out, ref.double())
        q_ref = torch.fake_quantize_per_tensor_affine(x32, 0.125, 3, 0, 2**bits - 1)
        out_t = P.fake_quantize_per_tensor(x64, 0.125, 3, bits)
        assert out_t.dtype == torch.float64 and torch.equal(out_t, q_ref.double())
    q = P.quantize_per_channel(w64, scale, 12)
    assert torch.equal(q, P.quantize_per_channel(w64.float(), scale, 12))
    qt = P.quantize_per_tensor(x64, 0.125, 3, 12)
    assert qt.dtype == torch.int32
    assert torch.equal(qt, P.quantize_per_tensor(x32, 0.125, 3, 12))
    # and the float64 results differ from a float64 computation (the inputs are that close)
    assert not torch.equal(torch.round(x64 * 8.0), torch.round(x32.double() * 8.0))


def test_float64_scales_are_used_as_float32():
    """A float64 scale tensor is used as float32 (``float32(1) / float32(s)``), as the torch op
    requires: results equal those with the float32 scale."""
    g = torch.Generator().manual_seed(9)
    w = torch.randn(3, 4000, generator=g)
    s64 = torch.tensor([0.1, 1 / 3, 0.0123456789], dtype=torch.float64)
    for bits in (8, 12):
        out = P.fake_quantize_per_channel(w, s64, bits)
        assert torch.equal(out, P.fake_quantize_per_channel(w, s64.float(), bits))
    q = P.quantize_per_channel(w, s64, 8)
    assert torch.equal(q, P.quantize_per_channel(w, s64.float(), 8))


def test_output_dtypes_follow_the_docstrings():
    """Scales float32, integers int32 (weights, activations) and int64 (biases), dequantized
    values float32, fake-quantized values in the input's dtype."""
    w = torch.randn(3, 8, dtype=torch.float64)
    assert P.weight_scale_per_channel(w, 8).dtype == torch.float32
    s = P.weight_scale_per_channel(w, 8)
    q = P.quantize_per_channel(w, s, 8)
    assert q.dtype == torch.int32
    assert P.dequantize_per_channel(q.double(), s.double()).dtype == torch.float32
    assert P.dequantize_per_channel(q, s.double()).dtype == torch.float32
    assert P.dequantize_per_tensor(q.double(), 0.1, 3).dtype == torch.float32
    for dt in (torch.float64, torch.float16, torch.bfloat16):
        assert P.fake_quantize_per_channel(w.to(dt), s, 8).dtype == dt
        assert P.fake_quantize_per_channel(w.to(dt), s, 12).dtype == dt
        assert P.fake_quantize_per_tensor(w.to(dt), 0.05, 3, 8).dtype == dt
        assert P.fake_quantize_per_tensor(w.to(dt), 0.05, 3, 12).dtype == dt
    bias = torch.tensor([0.3, -1.25, 2.0], dtype=torch.float64)
    ws = torch.tensor([0.01, 0.02, 0.03], dtype=torch.float64)
    assert P.bias_scale(0.1, ws).dtype == torch.float32
    qb = P.quantize_bias(bias, 0.1, ws)
    assert qb.dtype == torch.int64
    assert P.dequantize_bias(qb.double(), 0.1, ws).dtype == torch.float32
    fb = P.fake_quantize_bias(bias, 0.1, ws)
    assert fb.dtype == torch.float64
    assert torch.equal(fb, P.fake_quantize_bias(bias.float(), 0.1, ws).double())


def test_dequantize_rounds_the_integers_to_float32():
    """``float32(q) * s``: an integer beyond float32's 24-bit mantissa is first rounded."""
    q = torch.tensor([2**24 + 1], dtype=torch.float64)
    assert P.dequantize_bias(q, 1.0, torch.ones(1)).item() == 2.0**24
    assert P.dequantize_per_channel(q, torch.ones(1)).item() == 2.0**24
    assert P.dequantize_per_tensor(q, 1.0, 0).item() == 2.0**24


def test_grids_do_not_follow_the_default_dtype(float64_default):
    """activation_qparams' scale is the float32 value; zero-points, bias grids and dequantized
    values are float32 arithmetic whatever torch's default dtype."""
    lo, hi = -1.3, 2.7
    scale, zp = P.activation_qparams(lo, hi, 8)
    s_ref = np.float32((hi - lo) / 255)
    assert scale == float(s_ref)
    assert zp == int(np.rint(np.float32(-lo) / s_ref))
    # ranges whose float64 quotient -lo / s lies just off the half-way tie float32 lands on
    hits = 0
    for k in range(1, 254):
        lo_k = -(k + 0.5) / 255
        for _ in range(5):  # -lo_k = (k + 0.5) * s, s = float32((1 - lo_k) / 255)
            lo_k = -(k + 0.5) * float(np.float32((1.0 - lo_k) / 255))
        for lo_d in (lo_k + 1e-12, lo_k - 1e-12, lo_k + 3e-12, lo_k - 3e-12):
            s_d = np.float32((1.0 - lo_d) / 255)
            zp_ref = int(np.rint(np.float32(-lo_d) / s_d))
            assert P.activation_qparams(lo_d, 1.0, 8) == (float(s_d), zp_ref)
            hits += zp_ref != int(np.rint(-lo_d / np.float64(s_d)))
    assert hits >= 10
    bs = P.bias_scale(0.1, torch.tensor(0.3, dtype=torch.float32))  # one channel, 0-d
    assert bs.dtype == torch.float32
    assert bs.item() == float(np.float32(np.float32(0.1) * np.float32(0.3)))
    d = P.dequantize_per_tensor(torch.tensor(7), 0.1, 2)
    assert d.dtype == torch.float32 and d.item() == float(np.float32(5) * np.float32(0.1))
    x = torch.from_numpy(_near_ties()).float()
    inv_ref = np.float32(1) / np.float32(0.1)
    expected = np.clip(np.rint(x.numpy() * inv_ref) + 3, 0, 255).astype(np.int32)
    assert np.array_equal(P.quantize_per_tensor(x, 0.1, 3, 8).numpy(), expected)


# ----------------------------------------------------------------------------- activations


def test_fake_quantize_per_tensor_has_a_straight_through_gradient_to_8_bits():
    """Docstring: differentiable through the straight-through estimator for bits <= 8."""
    scale, zp = P.activation_qparams(-1.0, 1.0, 8)
    x = torch.tensor([-3.0, -0.5, 0.2, 0.9, 3.0], requires_grad=True)
    P.fake_quantize_per_tensor(x, scale, zp, 8).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


def test_fast_path_in_place_only_when_asked():
    """``inplace=False`` (the default) leaves ``x`` alone; ``inplace=True`` on a contiguous ``x``
    overwrites and returns it."""
    scale, zp = P.activation_qparams(-1.0, 2.0, 8)
    inv = float(torch.reciprocal(torch.tensor(scale)))
    x = torch.linspace(-1.5, 2.5, 101)
    keep = x.clone()
    ref = torch.fake_quantize_per_tensor_affine(x, scale, zp, 0, 255)
    out = P.fake_quantize_per_tensor_fast(x, scale, inv, zp, 0, 255)
    assert torch.equal(x, keep) and out is not x and torch.equal(out, ref)
    out = P.fake_quantize_per_tensor_fast(x, scale, inv, zp, 0, 255, inplace=True)
    assert out is x and torch.equal(x, ref)
    view = keep.reshape(101, 1).expand(101, 2).t()
    out = P.fake_quantize_per_tensor_fast(view, scale, inv, zp, 0, 255, inplace=True)
    assert torch.equal(out, ref.expand(2, 101)) and torch.equal(view[0], keep)


# ----------------------------------------------------------------------------- biases


def test_bias_overflow_counts_the_values_beyond_the_grid():
    """|round(b / s)| > 2^(b-1) - 1 with s = float32(s_x) * s_w[c]; the default is 32 bits."""
    s = 0.25  # s_x = 0.5, s_w = 0.5
    steps = np.array([127, -127, 128, -128, 300, 600, 12, 126.6, 127.4, 127.6])
    bias = torch.tensor(steps * s, dtype=torch.float32)
    ws = torch.full((len(steps),), 0.5)
    # beyond +-127: +-128, 300, 600 and 127.6 (rounds to 128)
    assert P.bias_overflow(bias, 0.5, ws, bits=8) == 5
    assert P.bias_overflow(bias, 0.5, ws, bits=9) == 2  # beyond +-255: 300, 600
    assert P.bias_overflow(bias, 0.5, ws, bits=10) == 1  # beyond +-511: 600
    big = torch.tensor([(2**31 - 1) * s, 2**31 * s, -(2**31) * s], dtype=torch.float64)
    assert P.bias_overflow(big, 0.5, torch.full((3,), 0.5)) == 2


def test_quantize_bias_saturates_at_the_default_32_bits_and_checks_bits():
    """Integers clamp(round(b / s), -(2^31 - 1), 2^31 - 1) by default (int64); bits must be an
    int in 8..32."""
    big = torch.tensor([1e12, -1e12, 3.0], dtype=torch.float64)
    q = P.quantize_bias(big, 1.0, torch.ones(3))
    assert q.dtype == torch.int64 and q.tolist() == [2**31 - 1, -(2**31 - 1), 3]
    for bad in (33, 7, 16.0, True, "16"):
        with pytest.raises(ValueError, match=r"^bias bits must be an int in 8\.\.32, got "):
            P.quantize_bias(big, 1.0, torch.ones(3), bits=bad)


def test_dequantized_zero_bias_is_positive_zero():
    """Docstring: an integer 0 gives +0.0, never -0.0 (whatever the sign of the grid)."""
    out = P.dequantize_bias(torch.zeros(2, dtype=torch.int64), 0.5, torch.tensor([-1.0, 1.0]))
    assert [math.copysign(1.0, v) for v in out.tolist()] == [1.0, 1.0]


# ----------------------------------------------------------------------------- observers: input


def test_observe_errors_name_what_was_wrong():
    """observe() takes floating-point tensors only and refuses NaN and +-inf, in either tail."""
    obs = qobs.get_observer("minmax")
    with pytest.raises(TypeError, match=r"^observe\(\) needs a floating-point tensor, got list$"):
        obs.observe([1.0, 2.0])
    with pytest.raises(TypeError, match=r"^observe\(\) needs a floating-point tensor, got Tensor"):
        obs.observe(torch.arange(3))
    msg = (
        r"^observed activations contain NaN or inf; check the model and the range-calibration "
        r"inputs$"
    )
    for bad in ([0.0, float("inf")], [-float("inf"), 1.0], [float("nan")]):
        with pytest.raises(ValueError, match=msg):
            obs.observe(torch.tensor(bad))
    with pytest.raises(
        ValueError,
        match=r"^MinMaxObserver has observed no values; pass at least "
        r"one non-empty range-calibration batch$",
    ):
        obs.range()


def test_observer_counts_every_observed_value():
    """``count`` is the number of values seen so far (empty batches add nothing)."""
    obs = qobs.get_observer("percentile")
    obs.observe(torch.randn(3, 4))
    obs.observe(torch.empty(0))
    obs.observe(torch.randn(5))
    assert obs.count == 17


def test_percentile_option_is_validated():
    """A clipping percentile is a number (not a bool or a string) in (50, 100]."""
    for ok in (50.5, 51, 100, 99.99):
        assert qobs.check_percentile(ok) == float(ok)
    for bad in (50, 50.0, 100.01, 0):
        with pytest.raises(ValueError, match=r"^percentile must be in \(50, 100\], got "):
            qobs.check_percentile(bad)
    for bad in ("99.9", True, None):
        with pytest.raises(TypeError, match=r"^percentile must be a number in \(50, 100\], got "):
            qobs.check_percentile(bad)
    assert qobs.get_observer("percentile", percentile=50.5).percentile == 50.5


def test_histogram_options_are_validated():
    """bins: an int >= 16; grid (MSE): an int >= 2; floats, bools and smaller values refused."""
    for bins in (16, 17):
        assert qobs.get_observer("percentile", bins=bins).hist.bins == bins
    for bad in (15, 32.0, True):
        with pytest.raises(ValueError, match=r"^bins must be an int >= 16, got "):
            qobs.get_observer("mse", bins=bad)
    assert qobs.MSEObserver(grid=2).grid == 2
    assert qobs.MSEObserver(grid=3).grid == 3
    for bad in (1, 3.0, 2.5, True):
        with pytest.raises(ValueError, match=r"^grid must be an int >= 2, got "):
            qobs.MSEObserver(grid=bad)


def test_a_registered_estimator_is_available_by_name():
    """``@register_observer("name")`` makes a class available to get_observer under that name."""
    name = "pin-test-observer"
    try:

        @qobs.register_observer(name)
        class _Mid(qobs.RangeObserver):
            def _range(self):
                return self.min / 2, self.max / 2

        assert name in qobs.available_observers()
        obs = qobs.get_observer(name, bits=4, bins=32)
        assert isinstance(obs, _Mid) and obs.bits == 4
        obs.observe(torch.tensor([-2.0, 6.0]))
        assert obs.range() == (-1.0, 3.0)
    finally:
        qobs.OBSERVERS._items.pop(name, None)


def test_defaults_are_8_bits_and_the_config_defaults():
    """Observers built without options are 8-bit and use QuantConfig's defaults (percentile
    99.99, the README's, and histogram_bins): building them bare or from a default config gives
    the same range."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(30011, generator=g) ** 3
    opts = QuantConfig().observer_options()
    for name in qobs.available_observers():
        bare, cfg = qobs.get_observer(name), qobs.get_observer(name, bits=8, **opts)
        assert bare.bits == 8
        bare.observe(x)
        cfg.observe(x)
        assert bare.range() == cfg.range()
    assert qobs.RangeObserver().bits == 8
    for cls in (qobs.PercentileObserver, qobs.MSEObserver):
        bare, cfg = cls(), cls(bits=8, bins=opts["bins"])
        bare.observe(x)
        cfg.observe(x)
        assert bare.range() == cfg.range()
    assert qobs.PercentileObserver().percentile == 99.99
    for name in ("percentile", "mse"):
        assert qobs.get_observer(name).hist.bins == opts["bins"]
    assert qobs.PercentileObserver().bits == 8 and qobs.MSEObserver().bits == 8


def test_histogram_mass_is_exact_beyond_float32_integers():
    """The histogram counts are float64: a bin holding more than 2^24 values (the zero bin of
    a ReLU layer over a large range-calibration set) keeps every one, so the histogram's mass
    equals the number of observed values."""
    x = torch.zeros(2**22 + 1)
    x[0], x[1] = -1.0, 1.0
    obs = qobs.get_observer("percentile", bins=16)
    for _ in range(5):
        obs.observe(x)
    assert obs.count == 5 * (2**22 + 1)
    assert float(obs.hist.counts.sum()) == obs.count


# ----------------------------------------------------------------------------- observers: histogram


class _RefHistogram:
    """float64 numpy re-derivation of the observers' running histogram (observers docstring):
    ``bins`` equal-width bins over the range seen so far; when a batch widens the range the old
    counts move onto the new edges by linear interpolation of their CDF, then the batch is
    counted (torch.histc, the binning the docstring names); quantiles read the piecewise-linear
    CDF, taking the first edge of a flat run."""

    def __init__(self, bins: int) -> None:
        self.bins = bins
        self.lo = self.hi = None
        self.counts = np.zeros(bins)

    def edges(self) -> np.ndarray:
        return np.linspace(self.lo, self.hi, self.bins + 1)

    def add(self, x: torch.Tensor) -> None:
        lo, hi = float(x.min()), float(x.max())
        if hi <= lo and self.lo is None:  # a constant first batch: a tiny width around it
            pad = max(abs(lo), 1.0) * 1e-6
            lo, hi = lo - pad, hi + pad
        if self.lo is not None:
            new_lo, new_hi = min(lo, self.lo), max(hi, self.hi)
            if (new_lo, new_hi) != (self.lo, self.hi):
                cdf = np.concatenate([[0.0], np.cumsum(self.counts)])
                new_cdf = np.interp(np.linspace(new_lo, new_hi, self.bins + 1), self.edges(), cdf)
                self.counts = np.clip(np.diff(new_cdf), 0.0, None)
            lo, hi = new_lo, new_hi
        self.lo, self.hi = lo, hi
        self.counts = self.counts + torch.histc(x.float(), self.bins, lo, hi).double().numpy()

    def quantile(self, q: float) -> float:
        cdf = np.concatenate([[0.0], np.cumsum(self.counts)])
        keep = np.concatenate([[True], np.diff(cdf) > 0])
        return float(np.interp(q * cdf[-1], cdf[keep], self.edges()[keep]))


def _ref_percentile_range(batches, p: float, bins: int) -> tuple[float, float]:
    h = _RefHistogram(bins)
    for x in batches:
        h.add(x)
    mn, mx = min(float(x.min()) for x in batches), max(float(x.max()) for x in batches)
    q = p / 100
    lo, hi = max(mn, h.quantile(1 - q)), min(mx, h.quantile(q))
    return min(lo, hi), max(lo, hi)


def _batches(seed: int) -> list[torch.Tensor]:
    """Three batches of odd sizes, each widening the range on one side or both."""
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(2001, generator=g) * 0.7 + 0.3,
        torch.randn(3001, generator=g) * 1.3 + 1.1,  # mostly widens the top
        torch.randn(1999, generator=g) * 2.1 - 0.9,  # widens both sides
        torch.rand(1001, generator=g) * 2.0 - 0.5,  # inside: no re-binning
    ]


@pytest.mark.parametrize("p,bins", [(99.37, 256), (97.3, 64), (99.99, 2048), (51.0, 16)])
def test_percentile_equals_float64_rederivation(p, bins):
    """The percentile range equals the float64 re-derivation of its docstring to 1e-12 (the
    histogram, its re-binning and its quantiles are float64 arithmetic)."""
    batches = _batches(int(p * 100) + bins)
    obs = qobs.get_observer("percentile", percentile=p, bins=bins)
    for x in batches:
        obs.observe(x)
    lo, hi = obs.range()
    ref_lo, ref_hi = _ref_percentile_range(batches, p, bins)
    assert lo == pytest.approx(ref_lo, rel=1e-12, abs=1e-12)
    assert hi == pytest.approx(ref_hi, rel=1e-12, abs=1e-12)
    if p > 99.9:
        return  # the 0.01 % tails hold under one sample here
    # and about one bin from numpy's percentile of the pooled data
    pooled = torch.cat(batches).numpy()
    width = (pooled.max() - pooled.min()) / bins
    assert abs(hi - np.percentile(pooled, p)) < 2 * width
    assert abs(lo - np.percentile(pooled, 100 - p)) < 2 * width


def test_percentile_on_a_gap_takes_the_first_edge_where_the_mass_is_reached():
    """A CDF flat over a gap: the p-th percentile is where the mass is reached (the first edge
    of the flat run, next to numpy's percentile for the top), not the far end of the gap."""
    x = torch.cat([torch.tensor([-1.0]), torch.zeros(998), torch.tensor([1.0])])
    obs = qobs.get_observer("percentile", percentile=99.9, bins=2048)
    obs.observe(x)
    lo, hi = obs.range()
    width = 2.0 / 2048
    assert abs(hi - np.percentile(x.numpy(), 99.9)) < 2 * width
    assert lo == pytest.approx(-1.0 + width, abs=1e-12)  # the mass 1 is reached after one bin
    assert (lo, hi) == _ref_percentile_range([x], 99.9, 2048)


def test_percentile_with_mass_in_the_first_and_last_bins():
    """Heavy end bins (a clipped signal): the percentiles interpolate inside the end bins, as
    the re-derivation does, and the last bin's mass counts."""
    g = torch.Generator().manual_seed(8)
    x = torch.cat(
        [torch.full((300,), -2.0), torch.rand(5000, generator=g) * 4 - 2, torch.full((700,), 2.0)]
    )
    for p in (99.0, 90.0):
        obs = qobs.get_observer("percentile", percentile=p, bins=128)
        obs.observe(x)
        assert obs.range() == pytest.approx(_ref_percentile_range([x], p, 128), abs=1e-12)


def test_percentile_does_not_start_the_histogram_at_zero():
    """The histogram spans the observed range only: positive data far from 0 keeps its
    resolution (16 bins over [5, 6])."""
    x = torch.linspace(5.0, 6.0, 1601)
    obs = qobs.get_observer("percentile", percentile=90.0, bins=16)
    obs.observe(x)
    assert obs.range() == pytest.approx(_ref_percentile_range([x], 90.0, 16), abs=1e-12)
    assert obs.range() == pytest.approx((5.1, 5.9), abs=0.01)


@pytest.mark.parametrize("c", [0.0, 0.25, 10.0, -3.0])
def test_constant_batch_then_spread_batch(c):
    """A constant first batch gets bins of a tiny width around it, so a later, wider batch is
    binned at full resolution (percentiles within a bin of numpy's)."""
    g = torch.Generator().manual_seed(1)
    const = torch.full((500,), c)
    spread = c + (torch.rand(20000, generator=g) * 2 - 1)
    obs = qobs.get_observer("percentile", percentile=95.0, bins=2048)
    obs.observe(const)
    assert obs.range() == pytest.approx((c, c), abs=1e-6)
    obs.observe(spread)
    pooled = torch.cat([const, spread]).numpy()
    width = 2.0 / 2048
    lo, hi = obs.range()
    assert abs(hi - np.percentile(pooled, 95.0)) < 3 * width
    assert abs(lo - np.percentile(pooled, 5.0)) < 3 * width
    mse = qobs.get_observer("mse", bits=8)
    mse.observe(const)
    assert mse.range() == (min(c, 0.0), max(c, 0.0))


def test_constant_first_batch_is_mass_on_a_tiny_interval():
    """A constant first batch is mass spread over a tiny interval around its value, so when a
    later batch puts a bin edge exactly on that value, half the mass falls on each side."""
    g = torch.Generator().manual_seed(6)
    spread = torch.cat([torch.tensor([-1.0, 1.0]), torch.rand(999, generator=g) * 2 - 1])
    batches = [torch.zeros(500), spread]
    for p in (50.5, 60.0):
        obs = qobs.get_observer("percentile", percentile=p, bins=16)
        for x in batches:
            obs.observe(x)
        assert obs.range() == pytest.approx(_ref_percentile_range(batches, p, 16), abs=1e-9)


def test_half_precision_activations_are_observed():
    """float16 / bfloat16 activations (mixed precision) are observed like their float32 values."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4001, generator=g)
    for dt in (torch.float16, torch.bfloat16):
        a, b = (
            qobs.get_observer("percentile", percentile=99.0),
            qobs.get_observer("percentile", percentile=99.0),
        )
        a.observe(x.to(dt))
        b.observe(x.to(dt).float())
        assert a.range() == b.range()


# ----------------------------------------------------------------------------- observers: MSE


def _ref_mse_table(h: _RefHistogram, mn: float, mx: float, zeros: int, bits: int, grid: int):
    """Brute force of MSEObserver's docstring: candidates lo = a * min(lo_0, 0), hi = b *
    max(hi_0, 0), a, b in {1/grid, ..., 1}; error sum_i n_i e_i with e_i = s^2 / 12 for a bin
    centre inside [lo, hi] (exact zeros add nothing) and the squared clipping distance outside.
    Returns {(lo, hi): error}."""
    lo0, hi0 = min(mn, 0.0), max(mx, 0.0)
    fr = np.arange(1, grid + 1) / grid
    los = lo0 * fr if lo0 < 0 else np.zeros(1)
    his = hi0 * fr if hi0 > 0 else np.zeros(1)
    e = h.edges()
    c = 0.5 * (e[1:] + e[:-1])
    n = h.counts
    table = {}
    for lo in los:
        for hi in his:
            s = (hi - lo) / (2**bits - 1)
            below, above = c < lo, c > hi
            inside = n[~below & ~above].sum() - zeros
            err = (n[below] * (c[below] - lo) ** 2).sum() + (n[above] * (c[above] - hi) ** 2).sum()
            table[(float(lo), float(hi))] = err + max(inside, 0.0) * s * s / 12
    return table


def _check_mse(batches, bits: int, bins: int, grid: int, obs=None) -> tuple[float, float]:
    if obs is None:
        obs = qobs.get_observer("mse", bits=bits, bins=bins, grid=grid)
        for x in batches:
            obs.observe(x)
    got = obs.range()
    h = _RefHistogram(bins)
    for x in batches:
        h.add(x)
    mn, mx = min(float(x.min()) for x in batches), max(float(x.max()) for x in batches)
    zeros = sum(int((x == 0).sum()) for x in batches)
    table = _ref_mse_table(h, mn, mx, zeros, bits, grid)
    assert got in table, f"{got} is not a candidate"
    best = min(table.values())
    assert table[got] <= best * (1 + 1e-9) + 1e-300, (got, table[got], best)
    return got


def _mse_data(kind: str, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    heavy = torch.randn(6001, generator=g) / torch.rand(6001, generator=g).sqrt()
    if kind == "relu":  # ReLU of a heavy-tailed variable: many exact zeros
        return [torch.relu(heavy[:3000]), torch.relu(heavy[3000:]) * 1.5]
    if kind == "negative":  # mostly negative, heavy lower tail, short upper tail
        return [-(heavy.abs()) * 2.0 + 0.3 * torch.rand(6001, generator=g)]
    if kind == "small":  # a range below 1 on both sides
        return [0.05 * heavy, 0.02 * torch.randn(501, generator=g)]
    if kind == "positive":  # all positive, not reaching 0
        return [0.5 + heavy.abs()]
    if kind == "dyadic":  # clusters on the bin centres (2i + 1) / 16 - 1 of 16 bins over [-1, 1],
        # which are candidates of a 16-point grid: a centre on a candidate end is inside
        counts = [93, 54, 56, 46, 14, 0, 0, 0, 0, 129, 56, 6, 76, 72, 126, 18]
        vals = [-1.0, 1.0] + [(2 * i + 1) / 16 - 1 for i, k in enumerate(counts) for _ in range(k)]
        return [torch.tensor(vals)]
    if kind == "lone":  # exact zeros and one far value: clipping it leaves nothing inside but
        # zeros, which add no rounding noise
        return [torch.tensor([0.0] * 12 + [-4.5216012])]
    if kind == "few":  # a handful of values, some exactly zero
        return [torch.tensor([0.0, 0.0, 0.0, 0.9, -0.2, 3.5, -1.7, 0.4])]
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind,bits,bins,grid",
    [
        ("relu", 4, 256, 40),
        ("negative", 4, 128, 30),
        ("negative", 2, 64, 50),
        ("small", 3, 128, 30),
        ("positive", 4, 64, 25),
        ("few", 2, 16, 20),
        ("few", 3, 32, 7),
        ("relu", 8, 64, 20),
        ("small", 8, 32, 16),
        ("dyadic", 2, 16, 16),
        ("dyadic", 3, 16, 16),
        ("lone", 2, 16, 10),
    ],
)
def test_mse_range_is_the_brute_force_minimum(kind, bits, bins, grid):
    """The MSE range is a candidate of the documented grid and minimises the documented
    expected error over all grid x grid candidates (a float64 brute force)."""
    batches = _mse_data(kind, seed=bits * 100 + bins)
    lo, hi = _check_mse(batches, bits, bins, grid)
    assert lo <= 0.0 <= hi


def test_mse_default_grid_is_100_fractions():
    """Built without a grid, the MSE observer searches a = b = 1/100, ..., 1 (the signature's
    default): its range is a candidate of that grid and the brute-force minimum over it."""
    batches = _mse_data("negative", seed=11)
    obs = qobs.get_observer("mse", bits=4, bins=64)
    obs.observe(batches[0])
    _check_mse(batches, 4, 64, 100, obs=obs)


def test_mse_on_a_zero_range_is_the_observed_range():
    """All-zero activations: nothing to optimise, the range is exactly what was observed."""
    obs = qobs.get_observer("mse")
    obs.observe(torch.zeros(10))
    assert obs.range() == (0.0, 0.0)


def test_quantize_per_channel_with_float64_scales_rounds_as_aten():
    """A float64 scale vector (as a user may pass) is used as ATen uses it: ``round(W·(1/s))``
    with 1/s taken in float32. Halfway-ish points ``(k + ½)·s`` separate that from a float64
    reciprocal; the reference is torch's own per-channel fake-quant."""
    g = torch.Generator().manual_seed(0)
    s = torch.rand(4, dtype=torch.float64, generator=g) * 0.1 + 0.01
    w = (torch.randint(-100, 100, (4, 64), generator=g).float() + 0.5) * s.float()[:, None]
    q = P.quantize_per_channel(w, s, 8)
    zero = torch.zeros(4, dtype=torch.int32)
    ref = torch.fake_quantize_per_channel_affine(w, s.float(), zero, 0, -127, 127)
    assert torch.equal(q, torch.round(ref / s.float()[:, None]).to(torch.int32))
