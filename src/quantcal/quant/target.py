"""What a quantization method quantizes in a deploy graph, and how its result is installed.

``LayerTarget`` names the quantizable layers in graph order with their bits under the config (and
warns about the computations left in fp32); ``observe_ranges`` measures every layer's input range on
the fp32 graph; ``finish_quantized`` installs a method's layers, names biases beyond the integer
grid, records clipping fractions, lets layers that own their input fake-quantize it in place, and
freezes the model.
"""

from __future__ import annotations

import math
import operator
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from quantcal.quant.config import QuantConfig
from quantcal.quant.fallback import layer_class, layers_by_module, warn_by_module
from quantcal.quant.graph import (
    QUANTIZABLE,
    device_of,
    run_with_pre_hooks,
    set_submodule,
    unquantized_computations,
)
from quantcal.quant.layers import QuantizedLayer
from quantcal.quant.matmul import matmul_modules
from quantcal.quant.matmul_target import (
    calibrate_products,
    float_computations,
    quantize_products,
)
from quantcal.quant.observers import RangeObserver, get_observer

__all__ = ["LayerTarget", "finish_quantized", "observe_ranges"]


class LayerTarget:
    """What a method must quantize in a deploy graph: the quantizable layers in graph order
    (``names``), their fp32 modules, their (weight, activation) bits under the config's plan
    and ``first_last_8bit``, and the computations left in fp32 (named in a warning here)."""

    def __init__(
        self,
        config: QuantConfig,
        names: list[str],
        modules: dict[str, nn.Module],
        bits: dict[str, tuple[int, int]],
        left: list[str],
        by_module: dict[str, str] | None = None,
    ) -> None:
        self.config, self.names, self.modules, self.bits, self.left = (
            config,
            names,
            modules,
            bits,
            left,
        )
        #: ``{layer: opaque block}`` of the layers quantized by module (``quant.fallback``).
        self.by_module = by_module or {}

    @classmethod
    def of(cls, gm: torch.fx.GraphModule, config: QuantConfig) -> LayerTarget:
        # products of two activations (attention) become QuantMatMul modules first, and
        # attention's projections plain linears (``QuantConfig.quantize_matmuls``)
        products = len(quantize_products(gm, config))
        names, by_module = layers_by_module(gm)
        left = unquantized_computations(gm)
        if left:
            message = (
                f"quantize: {len(names) + products} of {len(names) + products + len(left)} "
                f"conv/linear computations quantized; left in fp32: {', '.join(left)}"
            )
            if config.on_unsupported == "error":
                raise ValueError(
                    message + ". Rewrite them as nn.Conv*/nn.Linear modules, or pass "
                    "QuantConfig(on_unsupported='warn') to measure the model with them in fp32"
                )
            warnings.warn(message, UserWarning, stacklevel=3)
        unknown = sorted(set(config.plan()) - set(names))
        if unknown:
            raise ValueError(
                f"QuantConfig.layer_bits names {len(unknown)} layer(s) this model does not "
                f"quantize: {', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}; its "
                f"layers are {', '.join(names[:8])}{' ...' if len(names) > 8 else ''}"
            )
        modules = {name: gm.get_submodule(name) for name in names}
        bits = {name: _layer_bits(config, i, len(names), name) for i, name in enumerate(names)}
        warn_by_module(by_module)
        return cls(config, names, modules, bits, left, by_module)

    def observer(self, name: str) -> RangeObserver:
        """A fresh range estimator of the config for layer ``name``'s activation bits."""
        c = self.config
        return get_observer(c.observer, bits=self.bits[name][1], **c.observer_options())

    def layer(self, name: str, act_range: tuple[float, float]) -> QuantizedLayer:
        """Layer ``name`` quantized from its current fp32 module with the given input range."""
        module = self.modules[name]
        cls = layer_class(module)  # QuantLinear, QuantConv or (TF "same" padding) QuantConvSame
        return cls(
            module,
            weight_bits=self.bits[name][0],
            act_bits=self.bits[name][1],
            act_range=act_range,
            observer=self.config.observer,
            bias_bits=self.config.bias_bits,
            weight_granularity=self.config.weight_granularity,
        )


def _layer_bits(config: QuantConfig, index: int, count: int, name: str) -> tuple[int, int]:
    w, a = config.bits_of(name)
    if config.first_last_8bit and index in (0, count - 1):
        return max(w, 8), max(a, 8)
    return w, a


def observe_ranges(
    gm: nn.Module, target: LayerTarget, xs: list[torch.Tensor]
) -> dict[str, tuple[float, float]]:
    """Every layer's input range from one pass of ``xs`` through the **fp32** graph (the
    study's order-independent range setting)."""
    observers = {name: target.observer(name) for name in target.names}
    run_with_pre_hooks(gm, target.modules, lambda name, x: observers[name].observe(x), xs)
    for name, module in target.modules.items():
        if observers[name].count == 0:
            raise ValueError(
                f"layer {name!r} ({type(module).__name__}) saw no input during range calibration; "
                "is it used in forward()?"
            )
    return {name: observers[name].range() for name in target.names}


def finish_quantized(
    gm: torch.fx.GraphModule,
    target: LayerTarget,
    qlayers: dict[str, QuantizedLayer],
    xs: list[torch.Tensor],
    *,
    method: str = "ptq",
    options: dict[str, Any] | None = None,
) -> torch.fx.GraphModule:
    """Install ``qlayers`` in ``gm`` (a method's result), name overflowing biases, record the
    clipping fractions a method did not measure itself (on the fp32 inputs), and freeze."""
    missing = [n for n in target.names if n not in qlayers]
    if missing:
        raise RuntimeError(f"quantization method {method!r} left layers unquantized: {missing}")
    _warn_bias_overflow(qlayers, target.config.bias_bits)
    unmeasured = {n: q for n, q in qlayers.items() if math.isnan(q.clip_fraction)}
    if unmeasured:
        current = {n: gm.get_submodule(n) for n in unmeasured}
        fp32 = {n: m for n, m in current.items() if not isinstance(m, QuantizedLayer)}
        if len(fp32) == len(current):
            _record_clip_fractions(gm, fp32, unmeasured, xs)
    for name, qlayer in qlayers.items():
        set_submodule(gm, name, qlayer)
    _mark_owned_inputs(gm, qlayers)
    products = calibrate_products(gm, target.config, xs)
    gm.requires_grad_(False)
    gm.quant_config = target.config
    gm.precision = target.config.name
    gm.quant_method = {"name": method, "options": dict(options or {})}
    gm.eval()
    hidden = _hidden(gm, target, xs)
    #: (quantized, total) conv/linear computations and the names of those left in fp32: the
    #: graph's, and those found at run time inside opaque calls (``runtime_count``; each call
    #: site once in ``fp32``, each computation once in ``total``).
    gm.quant_coverage = {
        "quantized": len(target.names) + len(products),
        "total": len(target.names) + len(products) + len(target.left) + sum(n for _, n in hidden),
        "fp32": [*target.left, *(entry for entry, _ in hidden)],
    }
    float_ops = float_computations(gm) if target.config.quantize_matmuls else []
    if float_ops:  # softmax, LayerNorm, GELU: kept in float, named (not counted)
        gm.quant_coverage["float_ops"] = float_ops
    if target.by_module:  # counted in "quantized"; named apart (inside opaque blocks)
        gm.quant_coverage["by_module"] = list(target.by_module)
    return gm


def _hidden(gm: torch.fx.GraphModule, target: LayerTarget, xs: list[Any]) -> list[tuple[str, int]]:
    """The conv/linear/matmul calls that ran in fp32 inside opaque calls on the first
    range-calibration input, named in a warning (an error with ``on_unsupported="error"``)."""
    from quantcal.quant.runtime_count import hidden_computations

    # quantize has refused an empty range-calibration list before any method ran
    hidden = hidden_computations(gm, xs[0].to(device_of(gm)).clone())
    if hidden:
        k = len(target.names) + len(matmul_modules(gm))
        n = k + len(target.left) + sum(count for _, count in hidden)
        message = (
            f"quantize: {k} of {n} conv/linear computations quantized; left in fp32 inside "
            f"calls the traced graph does not show (a function marked torch.fx.wrap, or a leaf "
            f"module), found at run time: {', '.join(entry for entry, _ in hidden)}"
        )
        if target.config.on_unsupported == "error":
            raise ValueError(
                message + ". Call nn.Conv*/nn.Linear modules (not their weights through "
                "F.conv2d/F.linear) outside such functions, or pass "
                "QuantConfig(on_unsupported='warn') to measure the model with them in fp32"
            )
        warnings.warn(message, UserWarning, stacklevel=3)
    return hidden


def _warn_bias_overflow(qlayers: dict[str, QuantizedLayer], bits: int | None) -> None:
    """Name every layer whose bias did not fit the integer grid (kept in float instead)."""
    over = {n: q for n, q in qlayers.items() if q.bias_overflow}
    if not over:
        return
    listed = ", ".join(
        f"{n} ({q.bias_overflow} of {q.bias_fp32.numel()} values, input range "
        f"[{q.range_min:.3g}, {q.range_max:.3g}], smallest weight scale "
        f"{float(q.weight_scale.min()):.3g})"
        for n, q in over.items()
    )
    warnings.warn(
        f"quantize: {len(over)} layer(s) have biases beyond the int{bits} accumulator grid "
        f"s_x*s_w[c] (a tiny input range, or an output channel with near-zero weights such as "
        f"one whose folded BatchNorm gamma is ~0; clamping would wipe the bias); their biases "
        f"stay in float: {listed}",
        UserWarning,
        stacklevel=3,
    )


def _record_clip_fractions(
    gm: nn.Module,
    modules: dict[str, nn.Module],
    qlayers: dict[str, QuantizedLayer],
    xs: list[torch.Tensor],
) -> None:
    """Second fp32 pass: the fraction of each layer's range-calibration inputs that saturate."""
    clipped = dict.fromkeys(modules, 0)
    total = dict.fromkeys(modules, 0)

    def count(name: str, x: torch.Tensor) -> None:
        clipped[name] += qlayers[name].saturation_count(x)
        total[name] += x.numel()

    run_with_pre_hooks(gm, modules, count, xs)
    for name, qlayer in qlayers.items():
        qlayer.clip_fraction = clipped[name] / total[name] if total[name] else math.nan


# Modules and functions whose output is a new tensor that aliases none of their inputs.
_FRESH_MODULES: tuple[type[nn.Module], ...] = (
    QuantizedLayer,
    *QUANTIZABLE,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
)
_FRESH_FUNCTIONS = {operator.add, operator.mul, operator.sub, torch.add, torch.mul, torch.cat}
_FRESH_METHODS = {"add", "mul", "sub"}
# Elementwise activations: their output may be their input itself (``inplace=True``), so it is
# a temporary only when their input is one that nothing else reads.
_ACTIVATION_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.Hardtanh,
    nn.LeakyReLU,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.SiLU,
)
_ACTIVATION_FUNCTIONS = {F.relu, F.relu6, F.hardtanh, F.leaky_relu, F.hardswish, F.silu, torch.relu}
_ACTIVATION_METHODS = {"relu", "relu_"}


def _value_kind(gm: torch.fx.GraphModule, node: torch.fx.Node) -> str | None:
    """ "fresh" (a new tensor), "activation" (elementwise, may return its input) or None."""
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        if isinstance(module, _FRESH_MODULES):
            return "fresh"
        return "activation" if isinstance(module, _ACTIVATION_MODULES) else None
    tables = {
        "call_function": (_FRESH_FUNCTIONS, _ACTIVATION_FUNCTIONS),
        "call_method": (_FRESH_METHODS, _ACTIVATION_METHODS),
    }
    if node.op not in tables:
        return None
    fresh, activation = tables[node.op]
    if node.target in fresh:
        return "fresh"
    return "activation" if node.target in activation else None


def _is_temporary(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """Whether ``node``'s value is a tensor created inside the graph that aliases nothing else
    and that only one node reads. Conservative: anything not known is not a temporary (views,
    ``contiguous``, graph inputs, attributes, unknown calls)."""
    if len(node.users) != 1 or "out" in node.kwargs:  # out= writes into an existing tensor
        return False
    kind = _value_kind(gm, node)
    if kind == "activation":  # a temporary when its input is one
        arg = node.args[0] if node.args else None
        return isinstance(arg, torch.fx.Node) and _is_temporary(gm, arg)
    return kind == "fresh"


def _mark_owned_inputs(gm: torch.fx.GraphModule, qlayers: dict[str, QuantizedLayer]) -> None:
    """Set ``owns_input`` on each quantized layer whose every call reads a temporary (see
    ``_is_temporary``), so its forward may fake-quantize that input in place. Bit-identical to
    the copying path; it only saves an allocation per layer."""
    owned = dict.fromkeys(qlayers, True)
    called: set[str] = set()  # layers inside opaque blocks are never called by the graph
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target in qlayers:
            called.add(str(node.target))
            arg = node.args[0] if node.args else None
            if not (isinstance(arg, torch.fx.Node) and _is_temporary(gm, arg)):
                owned[str(node.target)] = False
    for name, qlayer in qlayers.items():
        qlayer.owns_input = owned[name] and name in called
