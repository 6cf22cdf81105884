"""``adaround``: learned up/down rounding of the weights, layer by layer.

Nagel, Amjad, van Baalen, Louizos & Blankevoort, "Up or Down? Adaptive Rounding for
Post-Training Quantization", ICML 2020 (arXiv 2004.10568). For each layer in graph order, with
every layer upstream already quantized (its inputs ``x~`` come from the partly quantized
network, fake-quantized by the layer's own activation quantizer), the weights become

    W~ = s * clip(floor(W / s) + h(V), -q_max, q_max),
    h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1),  zeta = 1.1, gamma = -0.1,

and ``V`` (initialised so that ``h(V)`` equals the fractional part of ``W / s``) minimises, with
Adam, the layer's output reconstruction error against the fp32 layer on the fp32 network's
input, plus the rounding regulariser:

    || W x + b - (W~ x~ + b~) ||^2_F  +  lambda * sum(1 - |2 h(V) - 1|^beta),

``beta`` annealed from 20 to 2 after a warm-up without the regulariser (20 % of the steps), as
in the paper and BRECQ (Li et al., ICLR 2021). At the end every weight is rounded down or up:
``h(V) >= 0.5`` -> up. The scales are the layer's (min-max) ones; only the rounding is learned.

Options: ``iterations`` (Adam steps per layer; the paper uses 10k-20k; the default 1000 is
sized for a CPU and its cost is one forward+backward of one layer on ``batch_size`` images per
step), ``batch_size``, ``lr`` (Adam, 1e-3), ``reg_weight`` (lambda, 0.01), ``warmup`` (0.2),
``beta_start`` (20), ``beta_end`` (2), ``max_images`` (range-calibration images kept for the
reconstruction, 1024), ``seed``. Block-wise reconstruction (BRECQ) is not implemented.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import fx, nn

from quantcal.quant.layers import QuantizedLayer
from quantcal.quant.methods._sequential import run_sequential
from quantcal.quant.methods.ptq import fp32_ranges_if_shared, layer_from
from quantcal.quant.methods.registry import (
    MethodContext,
    integer_option,
    number_option,
    register_method,
)
from quantcal.quant.target import LayerTarget

__all__ = ["GAMMA", "ZETA", "adaround_layer", "rectified_sigmoid"]

ZETA, GAMMA = 1.1, -0.1


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """``h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1)`` (Louizos et al. 2018)."""
    return (torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)


def _inverse_rectified_sigmoid(h: torch.Tensor) -> torch.Tensor:
    p = ((h - GAMMA) / (ZETA - GAMMA)).clamp(1e-6, 1 - 1e-6)
    return torch.log(p / (1 - p))


def _beta(step: int, iterations: int, warmup: float, start: float, end: float) -> float | None:
    """The annealed exponent at ``step``, or None during the warm-up (no regulariser)."""
    first = int(warmup * iterations)
    if step < first:
        return None
    ratio = (step - first) / max(1, iterations - first)
    return end + (start - end) * max(0.0, 1.0 - ratio)


def adaround_layer(
    layer: QuantizedLayer,
    module: nn.Module,
    xq: list[torch.Tensor],
    xf: list[torch.Tensor],
    *,
    iterations: int = 1000,
    batch_size: int = 32,
    lr: float = 1e-3,
    reg_weight: float = 0.01,
    warmup: float = 0.2,
    beta_start: float = 20.0,
    beta_end: float = 2.0,
    seed: int = 0,
) -> dict[str, float]:
    """Learn ``layer``'s rounding (see the module docstring) and store the integers in it.

    ``xq``: the layer's inputs in the partly quantized network (before its own activation
    quantizer), ``xf``: the same images' inputs in the fp32 network. Returns the mean squared
    reconstruction error on all inputs with nearest rounding and with the learned rounding.
    """
    with torch.no_grad():
        x_tilde = torch.cat([layer.quantize_input(x) for x in xq])
        target = torch.cat([module(x) for x in xf])
    w = layer.weight_fp32.to(torch.float32)
    shape = [-1] + [1] * (w.dim() - 1)
    scale = layer.weight_scale.reshape(shape)
    q_max = 2 ** (layer.weight_bits - 1) - 1
    w_floor = torch.floor(w * torch.reciprocal(scale))
    rest = (w * torch.reciprocal(scale) - w_floor).clamp(0, 1)
    v = _inverse_rectified_sigmoid(rest).clone().requires_grad_(True)
    bias = layer.bias

    def soft_weight(h: torch.Tensor) -> torch.Tensor:
        return (w_floor + h).clamp(-q_max, q_max) * scale

    def error(weight: torch.Tensor) -> float:
        with torch.no_grad():
            total = 0.0
            for xb, tb in zip(x_tilde.split(256), target.split(256)):
                total += float((layer.layer_op(xb, weight, bias) - tb).pow(2).sum())
            return total / target.numel()

    nearest = error(layer.weight)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([v], lr=lr)
    n = x_tilde.shape[0]
    for step in range(iterations):
        idx = torch.randint(0, n, (min(batch_size, n),), generator=gen).to(x_tilde.device)
        h = rectified_sigmoid(v)
        out = layer.layer_op(x_tilde[idx], soft_weight(h), bias)
        diff = (out - target[idx]).flatten(1)
        loss = diff.pow(2).sum(1).mean()
        beta = _beta(step, iterations, warmup, beta_start, beta_end)
        if beta is not None:
            loss = loss + reg_weight * (1 - (2 * h - 1).abs().pow(beta)).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        up = (rectified_sigmoid(v) >= 0.5).to(w.dtype)
        q = (w_floor + up).clamp(-q_max, q_max)
    layer.set_weight_int(q)
    return {"mse_nearest": nearest, "mse_adaround": error(layer.weight)}


_DEFAULTS: dict[str, Any] = {
    "iterations": 1000,
    "batch_size": 32,
    "lr": 1e-3,
    "reg_weight": 0.01,
    "warmup": 0.2,
    "beta_start": 20.0,
    "beta_end": 2.0,
    "max_images": 1024,
    "seed": 0,
}


_CHECKS = {
    "iterations": integer_option(1),
    "batch_size": integer_option(1),
    "lr": number_option(0, exclusive_minimum=True),
    "reg_weight": number_option(0),
    "warmup": number_option(0, 1),
    "beta_start": number_option(0, exclusive_minimum=True),
    "beta_end": number_option(0, exclusive_minimum=True),
    "max_images": integer_option(1),
    "seed": integer_option(0),
}


@register_method("adaround", defaults=_DEFAULTS, checks=_CHECKS)
def adaround(
    gm: fx.GraphModule, target: LayerTarget, ctx: MethodContext
) -> dict[str, QuantizedLayer]:
    """AdaRound every layer in graph order on the range-calibration images."""
    opts = dict(ctx.options)  # resolved and checked (``_CHECKS``) by ``QuantMethod.resolve``
    xs, kept = [], 0
    for x in ctx.calib:  # the first max_images images
        take = x[: max(0, int(opts["max_images"]) - kept)]
        if take.numel():
            xs.append(take)
            kept += take.shape[0]
    ranges = fp32_ranges_if_shared(gm, target, xs)
    gains: list[float] = []
    steps = {k: opts[k] for k in ("iterations", "batch_size", "lr", "reg_weight", "warmup")}
    steps.update(beta_start=opts["beta_start"], beta_end=opts["beta_end"], seed=opts["seed"])

    def on_layer(name: str, module: nn.Module, xq: list, xf: list | None) -> QuantizedLayer:
        layer = layer_from(target, name, xq, xf, ranges)
        assert xf is not None
        with torch.enable_grad():
            rec = adaround_layer(layer, module, xq, xf, **steps)
        if rec["mse_nearest"] > 0:
            gains.append(rec["mse_adaround"] / rec["mse_nearest"])
        return layer

    layers = run_sequential(gm, target, xs, on_layer, keep_fp32=True)
    if gains:
        geo = math.exp(sum(math.log(max(g, 1e-12)) for g in gains) / len(gains))
        ctx.log(
            f"adaround: {len(layers)} layers x {opts['iterations']} steps on {kept} images; "
            f"reconstruction error vs nearest rounding x{geo:.3f} (geometric mean)"
        )
    return layers
