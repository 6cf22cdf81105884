"""Quantization configs: ``QuantConfig`` and the precision strings of a sweep ("W4A8", "fp32")."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from quantcal._registry import unknown_name_message
from quantcal.quant.observers import OBSERVERS, available_observers, check_percentile
from quantcal.quant.primitives import MAX_BITS, MIN_BITS

PRECISIONS: tuple[str, ...] = ("fp32", "W8A8", "W4A8", "W4A4")
"""The study's precisions (Kuang & Wong, arXiv 2309.13866), highest first."""

_PRECISION_RE = re.compile(r"^w(\d+)a(\d+)$", re.IGNORECASE)
_ACCEPTED_FORMS = f"'fp32' or 'WxAy' with x, y in {MIN_BITS}..{MAX_BITS} (e.g. 'W8A8', 'w4a8')"


def _check_bits_field(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"QuantConfig.{name} must be an int in {MIN_BITS}..{MAX_BITS}, got {value!r}"
        )
    if not MIN_BITS <= value <= MAX_BITS:
        raise ValueError(
            f"QuantConfig.{name} must be in {MIN_BITS}..{MAX_BITS}, got {value}; "
            "8 is int8, 4 is int4"
        )


@dataclass(frozen=True)
class QuantConfig:
    """Post-training quantization settings (weights symmetric per output channel, activations
    asymmetric per tensor; see ``quant.primitives``).

    Fields:
      weight_bits, act_bits: bit widths in 2..16.
      observer: activation range estimator, one of ``available_observers()`` ("minmax" is the
        study's, "percentile", "mse").
      percentile: clipping percentile of the "percentile" observer, in (50, 100].
      first_last_8bit: quantize the first and the last quantized layer (in graph order) at
        ``max(bits, 8)`` for weights and activations instead of the config's bits; by default
        every conv and linear layer, first and last included, uses the config's bits.
      histogram_bins: bins of the histogram behind the "percentile" and "mse" observers.
      bias_bits: biases are stored as integers of this many bits (symmetric) on the grid
        ``s_x * s_w[c]`` of the layer's accumulator, as integer runtimes run them (Jacob et al.,
        CVPR 2018, §2.4; ONNX QDQ, TFLite); 32 (default) or None to keep float biases. The
        rounding is below one accumulator step, but an integer runtime's requantization ties
        follow it, and across a deep net those ties decide single predictions.
      layer_bits: a mixed-precision plan: ``((layer name, weight_bits, act_bits), ...)``, each
        overriding the config's bits for that quantized layer (names as ``quant.inspect`` and
        ``quantized_layers`` give them; a name the model does not have is a ValueError naming
        the valid ones); a dict ``{name: (w, a)}`` is accepted and stored sorted. Empty (the
        default): every layer at the config's bits. ``quant.plan_mixed_precision`` finds one.
      weight_granularity: "channel" (default: one symmetric scale per output channel, the
        study's) or "tensor" (one scale per layer, as in Nagel et al. 2019's headline results,
        where cross-layer equalization matters most).
      sequential: range setting in graph order with everything upstream already quantized
        (each layer's observer sees the input the quantized network gives it; Nagel et al.,
        "A White Paper on Neural Network Quantization", arXiv 2106.08295, §4.3); default False:
        every range from the fp32 network (the study's min-max PTQ, order-independent).
      on_unsupported: what ``quantize`` does with a conv or linear computation it cannot
        quantize (a functional ``F.conv2d`` / ``F.linear`` call, e.g. an attention projection or
        a weight-standardized conv traced through, or a transposed conv): "warn" (default) names
        each one in a warning, which a study records in the notes column, so a sweep over many
        models goes on and says which numbers are partly fp32; "error" refuses the model.
      quantize_matmuls: quantize the products of two activations (attention's ``Q Kᵀ`` and
        ``A V``) as integer runtimes run them, both operands per tensor at ``act_bits`` with
        their own ranges (``quant.matmul``), with ``F.scaled_dot_product_attention`` and
        ``nn.MultiheadAttention`` decomposed into projections, products and a float softmax
        (``quant.attention``); default True. False keeps them in fp32, named as such.
      matmul_bits: the bits of both operands of every quantized product; None (default): the
        config's ``act_bits``. 8 with a 4-bit config keeps attention at 8 bits, as integer
        attention schemes do (I-BERT, Kim et al. 2021; FQ-ViT, Lin et al. 2022); named in
        :attr:`name` (``"W4A4+P8"``).
    """

    weight_bits: int = 8
    act_bits: int = 8
    observer: str = "minmax"
    percentile: float = 99.99
    first_last_8bit: bool = False
    histogram_bins: int = 2048
    bias_bits: int | None = 32
    on_unsupported: str = "warn"
    layer_bits: tuple[tuple[str, int, int], ...] = ()
    weight_granularity: str = "channel"
    sequential: bool = False
    quantize_matmuls: bool = True
    matmul_bits: int | None = None

    def __post_init__(self) -> None:
        _check_bits_field("weight_bits", self.weight_bits)
        _check_bits_field("act_bits", self.act_bits)
        if not isinstance(self.observer, str) or self.observer.lower() not in OBSERVERS:
            raise ValueError(
                "QuantConfig.observer: "
                + unknown_name_message("range estimator", str(self.observer), available_observers())
            )
        object.__setattr__(self, "observer", self.observer.lower())
        try:
            object.__setattr__(self, "percentile", check_percentile(self.percentile))
        except (TypeError, ValueError) as err:
            raise ValueError(f"QuantConfig.percentile: {err}") from None
        if not isinstance(self.first_last_8bit, bool):
            raise TypeError(
                f"QuantConfig.first_last_8bit must be True or False, got {self.first_last_8bit!r}"
            )
        bins = self.histogram_bins
        if isinstance(bins, bool) or not isinstance(bins, int) or not 16 <= bins <= 1 << 16:
            raise ValueError(
                f"QuantConfig.histogram_bins must be an int in 16..65536, got {bins!r}"
            )

        b = self.bias_bits
        if b is not None and (isinstance(b, bool) or not isinstance(b, int) or not 8 <= b <= 32):
            raise ValueError(
                f"QuantConfig.bias_bits must be an int in 8..32 (32 is int32) or None for float "
                f"biases, got {b!r}"
            )

        object.__setattr__(self, "layer_bits", _check_layer_bits(self.layer_bits))
        if self.weight_granularity not in ("channel", "tensor"):
            raise ValueError(
                "QuantConfig.weight_granularity must be 'channel' or 'tensor', got "
                f"{self.weight_granularity!r}"
            )
        if not isinstance(self.sequential, bool):
            raise TypeError(
                f"QuantConfig.sequential must be True or False, got {self.sequential!r}"
            )
        if not isinstance(self.quantize_matmuls, bool):
            raise TypeError(
                f"QuantConfig.quantize_matmuls must be True or False, got {self.quantize_matmuls!r}"
            )
        if self.matmul_bits is not None:
            _check_bits_field("matmul_bits", self.matmul_bits)
        if self.on_unsupported not in ("warn", "error"):
            raise ValueError(
                f"QuantConfig.on_unsupported must be 'warn' or 'error', got {self.on_unsupported!r}"
            )

    @property
    def name(self) -> str:
        """The precision string, e.g. "W4A8"; with a plan, the base bits and how many layers
        the plan sets (``"W4A4+mixed(12)"``)."""
        base = f"W{self.weight_bits}A{self.act_bits}"
        if self.weight_granularity == "tensor":
            base += "+pt"
        if self.product_bits != self.act_bits and self.quantize_matmuls:
            base += f"+P{self.product_bits}"
        return f"{base}+mixed({len(self.layer_bits)})" if self.layer_bits else base

    @property
    def product_bits(self) -> int:
        """The bits of a quantized product's operands: ``matmul_bits``, else ``act_bits``."""
        return self.act_bits if self.matmul_bits is None else self.matmul_bits

    def plan(self) -> dict[str, tuple[int, int]]:
        """``layer_bits`` as ``{name: (weight_bits, act_bits)}``."""
        return {n: (w, a) for n, w, a in self.layer_bits}

    def bits_of(self, name: str) -> tuple[int, int]:
        """(weight_bits, act_bits) of the layer ``name`` under this config's plan (before
        ``first_last_8bit``)."""
        return self.plan().get(name, (self.weight_bits, self.act_bits))

    def observer_options(self) -> dict[str, Any]:
        """Constructor options for the configured observer (unused ones are ignored)."""
        return {"percentile": self.percentile, "bins": self.histogram_bins}

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict of all fields (canonical for hashing)."""
        d = dataclasses.asdict(self)
        if self.layer_bits:
            d["layer_bits"] = [list(t) for t in self.layer_bits]
        else:  # uniform configs keep the dict (and the cache keys made from it) of before
            del d["layer_bits"]
        for key, default in (
            ("weight_granularity", "channel"),
            ("sequential", False),
            ("quantize_matmuls", True),
            ("matmul_bits", None),
        ):
            if d[key] == default:  # likewise: the keys of before for the study's scheme
                del d[key]
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantConfig:
        """Inverse of ``to_dict``; an unknown key is a ValueError naming the closest field."""
        if not isinstance(data, dict):
            raise TypeError(f"QuantConfig.from_dict needs a dict, got {type(data).__name__}")
        fields = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in fields:
                raise ValueError("QuantConfig: " + unknown_name_message("field", str(key), fields))
        return cls(**data)


def _check_layer_bits(value: Any) -> tuple[tuple[str, int, int], ...]:
    """``layer_bits`` as a sorted tuple of (name, w, a), validated."""
    if isinstance(value, dict):
        items = [(k, *v) if isinstance(v, (tuple, list)) else (k, v) for k, v in value.items()]
    elif isinstance(value, (tuple, list)):
        items = [tuple(t) if isinstance(t, (tuple, list)) else (t,) for t in value]
    else:
        raise TypeError(
            "QuantConfig.layer_bits must be {name: (weight_bits, act_bits)} or a sequence of "
            f"(name, weight_bits, act_bits), got {type(value).__name__}"
        )
    out = []
    for item in items:
        if len(item) != 3 or not isinstance(item[0], str) or not item[0]:
            raise ValueError(
                f"QuantConfig.layer_bits entries must be (layer name, weight_bits, act_bits), "
                f"got {item!r}"
            )
        _check_bits_field(f"layer_bits[{item[0]!r}] weight bits", item[1])
        _check_bits_field(f"layer_bits[{item[0]!r}] activation bits", item[2])
        out.append((item[0], int(item[1]), int(item[2])))
    names = [t[0] for t in out]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"QuantConfig.layer_bits names a layer twice: {', '.join(dup)}")
    return tuple(sorted(out))


def parse_precision(precision: str, **overrides: Any) -> QuantConfig | None:
    """Parse a precision: "fp32" -> None; "WxAy" (any case, x and y in 2..16) ->
    ``QuantConfig(weight_bits=x, act_bits=y, **overrides)``; anything else -> ValueError."""
    if not isinstance(precision, str):
        raise TypeError(
            f"precision must be a string such as 'W8A8', got {type(precision).__name__}"
        )
    text = precision.strip()
    if text.lower() == "fp32":
        return None
    match = _PRECISION_RE.match(text)
    if match is None:
        raise ValueError(f"unsupported precision {precision!r}; accepted: {_ACCEPTED_FORMS}")
    weight_bits, act_bits = int(match.group(1)), int(match.group(2))
    for bits in (weight_bits, act_bits):
        if not MIN_BITS <= bits <= MAX_BITS:
            raise ValueError(
                f"precision {precision!r} has a bit width out of range; accepted: {_ACCEPTED_FORMS}"
            )
    for key in ("weight_bits", "act_bits"):
        if key in overrides:
            raise ValueError(f"parse_precision: {key} comes from the string {precision!r}; drop it")
    return QuantConfig.from_dict({"weight_bits": weight_bits, "act_bits": act_bits, **overrides})
