"""``ptq``: min-max post-training quantization, the study's method (Kuang & Wong, arXiv
2309.13866; Krishnamoorthi, arXiv 1806.08342; Nagel et al., arXiv 2106.08295 §3).

Weights are rounded to nearest on their symmetric grid; each layer's input range comes from the
config's range estimator (min-max, percentile, MSE) on the range-calibration data, observed on
the fp32 network (default) or, with ``QuantConfig(sequential=True)``, in graph order on the
network quantized so far (Nagel et al. 2021 §4.3), so each range fits what the layer really
receives.
"""

from __future__ import annotations

from typing import Any

from torch import fx, nn

from quantcal.quant.layers import QuantizedLayer
from quantcal.quant.methods._sequential import clip_fraction, run_sequential
from quantcal.quant.methods.registry import MethodContext, register_method
from quantcal.quant.target import LayerTarget, observe_ranges


def _observed(target: LayerTarget, name: str, xs: list[Any]) -> tuple[float, float]:
    observer = target.observer(name)
    for x in xs:
        observer.observe(x)
    return observer.range()


def sequential_layer(target: LayerTarget, name: str, xq: list[Any]) -> QuantizedLayer:
    """Layer ``name`` with its input range observed on ``xq`` (the quantized path's inputs)."""
    return layer_from(target, name, xq, None)


def layer_from(
    target: LayerTarget,
    name: str,
    xq: list[Any],
    xf: list[Any] | None,
    ranges: dict[str, tuple[float, float]] | None = None,
) -> QuantizedLayer:
    """Layer ``name`` for a sequential pass (``run_sequential``): its range from ``ranges``
    when given, else observed on the fp32 network's inputs ``xf`` (the study's range setting,
    read off the pass's fp32 path instead of a pass of its own) or, with
    ``QuantConfig.sequential`` (or no fp32 path), on the quantized path's ``xq``; its clipping
    fraction measured on ``xq``, what the quantized network feeds it."""
    if ranges is not None:
        layer = target.layer(name, ranges[name])
    else:
        seen = xq if target.config.sequential or xf is None else xf
        layer = target.layer(name, _observed(target, name, seen))
    layer.clip_fraction = clip_fraction(layer, xq)
    return layer


def fp32_ranges_if_shared(
    gm: fx.GraphModule, target: LayerTarget, xs: list[Any]
) -> dict[str, tuple[float, float]] | None:
    """The fp32 ranges from a pass of their own when a layer is called more than once (its
    range must see every call, and a sequential pass builds it at the first), else None."""
    calls = [
        n.target for n in gm.graph.nodes if n.op == "call_module" and n.target in target.modules
    ]
    if target.config.sequential or len(calls) == len(set(calls)):
        return None
    return observe_ranges(gm, target, xs)


def layers_with_ranges(
    gm: fx.GraphModule, target: LayerTarget, ctx: MethodContext
) -> dict[str, QuantizedLayer]:
    """Round-to-nearest layers with ranges per ``target.config.sequential``."""
    if target.config.sequential:

        def on_layer(name: str, _module: nn.Module, xq: list, _xf: Any) -> QuantizedLayer:
            return sequential_layer(target, name, xq)

        return run_sequential(gm, target, ctx.calib, on_layer)
    ranges = observe_ranges(gm, target, ctx.calib)
    return {name: target.layer(name, ranges[name]) for name in target.names}


@register_method("ptq")
def ptq(gm: fx.GraphModule, target: LayerTarget, ctx: MethodContext) -> dict[str, QuantizedLayer]:
    """Round-to-nearest weights and range-estimated activations (see the module docstring)."""
    return layers_with_ranges(gm, target, ctx)
