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

from quantcal.quant.apply import LayerTarget, QuantizedLayer, observe_ranges
from quantcal.quant.methods import MethodContext, register_method
from quantcal.quant.methods._sequential import clip_fraction, run_sequential


def sequential_layer(target: LayerTarget, name: str, xq: list[Any]) -> QuantizedLayer:
    """Layer ``name`` with its input range observed on ``xq`` (the quantized path's inputs)."""
    observer = target.observer(name)
    for x in xq:
        observer.observe(x)
    layer = target.layer(name, observer.range())
    layer.clip_fraction = clip_fraction(layer, xq)
    return layer


def layer_from(
    target: LayerTarget, name: str, xq: list[Any], ranges: dict[str, tuple[float, float]] | None
) -> QuantizedLayer:
    """Layer ``name`` with the range from ``ranges`` (observed on the fp32 network), or, when
    ``ranges`` is None (``QuantConfig.sequential``), observed on ``xq``; its clipping fraction
    measured on ``xq``, what the quantized network feeds it."""
    if ranges is None:
        return sequential_layer(target, name, xq)
    layer = target.layer(name, ranges[name])
    layer.clip_fraction = clip_fraction(layer, xq)
    return layer


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
