"""Per-layer quantization report: "which layer hurts".

``inspect(qmodel, batches)`` lists, for every quantized layer of a model made by ``quantize``,
its bits, activation scale and zero-point, the observer's range, the fraction of range-calibration
inputs that were clipped, and two signal-to-quantization-noise ratios on the given batches:

* ``sqnr_db``: the layer's output in the quantized network against the same layer's output in
  the fp32 deploy network (error accumulated from every layer upstream);
* ``sqnr_isolated_db``: the layer alone, quantized weight and input, fed the fp32 network's input,
  against its fp32 output (the error this layer adds by itself).

``SQNR = 10 log10(sum ref^2 / sum (ref - q)^2)`` in dB over all elements of all batches
(+inf when identical). The fp32 network is the quantized model with fake quantization switched
off (``fake_quant_disabled``), so no reference to the original model is needed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from quantcal.quant.apply import (
    QuantizedLayer,
    batch_inputs,
    fake_quant_disabled,
    quantized_layers,
)
from quantcal.quant.matmul import MATMUL_OPS, QuantMatMul, matmul_modules
from quantcal.quant.primitives import quantize_per_channel

__all__ = ["LayerReport", "LayerTable", "ProductReport", "inspect", "sqnr_db"]

_CHUNK = 32  # images per forward while comparing, so stored layer outputs stay small


@dataclass(frozen=True)
class LayerReport:
    """One quantized layer's parameters and error measures (see the module docstring)."""

    name: str
    kind: str
    depthwise: bool
    weight_shape: tuple[int, ...]
    weight_bits: int
    act_bits: int
    act_scale: float
    zero_point: int
    range_min: float
    range_max: float
    weight_scale_min: float
    weight_scale_max: float
    clip_fraction: float
    #: Bias values beyond the integer accumulator grid (that layer's bias then stays in float).
    bias_overflow: int = 0
    #: Largest stored |integer weight| (below ``2^(b-1) - 1``: part of the grid unused, e.g.
    #: a per-tensor scale set by another channel).
    weight_int_absmax: int = 0
    #: Fraction of stored integer weights that differ from rounding the fp32 weight to nearest
    #: on the same scale (0 for ``ptq``; a method's own rounding, e.g. AdaRound, shows here).
    off_nearest: float = 0.0
    sqnr_db: float = math.nan
    sqnr_isolated_db: float = math.nan

    def as_dict(self) -> dict[str, Any]:
        """Plain dict of the fields (a table row)."""
        return asdict(self)


@dataclass(frozen=True)
class ProductReport:
    """One quantized product of two activations (``quant.matmul.QuantMatMul``): each operand's
    scale, zero-point, observed range and clipping fraction (``a`` the left operand, ``b`` the
    right one; ``clip_fraction`` the larger of the two) and the output's SQNRs as for a layer."""

    name: str
    kind: str
    op: str
    act_bits: int
    scale_a: float
    zero_point_a: int
    range_a_min: float
    range_a_max: float
    clip_fraction_a: float
    scale_b: float
    zero_point_b: int
    range_b_min: float
    range_b_max: float
    clip_fraction_b: float
    clip_fraction: float
    sqnr_db: float = math.nan
    sqnr_isolated_db: float = math.nan

    def as_dict(self) -> dict[str, Any]:
        """Plain dict of the fields (a table row)."""
        return asdict(self)


def _product_record(name: str, m: QuantMatMul) -> ProductReport:
    return ProductReport(
        name=name,
        kind=m.kind,
        op=m.op,
        act_bits=m.act_bits,
        scale_a=m.scale_a,
        zero_point_a=m.zero_point_a,
        range_a_min=m.range_a[0],
        range_a_max=m.range_a[1],
        clip_fraction_a=m.clip_fraction_a,
        scale_b=m.scale_b,
        zero_point_b=m.zero_point_b,
        range_b_min=m.range_b[0],
        range_b_max=m.range_b[1],
        clip_fraction_b=m.clip_fraction_b,
        clip_fraction=max(m.clip_fraction_a, m.clip_fraction_b),
    )


class LayerTable(list):
    """A list of ``LayerReport`` with ``to_rows()`` for tables and plots, and ``coverage``: the
    model's ``quant_coverage`` (``quantized`` and ``total`` conv/linear computations, the
    ``fp32`` names of those left unquantized, and ``by_module``, when present, the quantized
    layers inside blocks torch.fx could not trace), printed as the table's first line."""

    coverage: dict[str, Any] | None = None
    #: The quantized products of two activations (``ProductReport``), after the layers in
    #: ``to_rows`` and in the printed table.
    products: list[ProductReport] = []  # noqa: RUF012  (replaced per table, never mutated)

    def float_ops(self) -> list[str]:
        """The computations kept in float (softmax, LayerNorm, GELU), as in ``coverage``."""
        return list((self.coverage or {}).get("float_ops") or [])

    def to_rows(self) -> list[dict[str, Any]]:
        """One plain dict per layer, in the model's order; then one per quantized product of
        two activations (``kind`` "MatMul") and one per computation kept in float (``kind``
        "softmax", "layer_norm" or "gelu", ``precision`` "float")."""
        rows = [r.as_dict() for r in self] + [p.as_dict() for p in self.products]
        for entry in self.float_ops():
            kind = entry.rpartition(" (")[2].rstrip(")")
            rows.append({"name": entry.rpartition(" (")[0], "kind": kind, "precision": "float"})
        return rows

    def __str__(self) -> str:
        head = f"{'layer':40s} {'kind':8s} {'W':>2s} {'A':>2s} {'clip %':>7s} {'SQNR dB':>8s}"
        lines = [head]
        cov = self.coverage
        if cov:
            left = f"; left in fp32: {', '.join(cov['fp32'])}" if cov["fp32"] else ""
            inside = cov.get("by_module") or []
            if inside:  # quant.fallback: inside blocks torch.fx could not trace
                left = f" ({len(inside)} quantized by module: {', '.join(inside)}){left}"
            lines.insert(
                0,
                f"quantized {cov['quantized']} of {cov['total']} conv/linear computations{left}",
            )
        for r in self:
            lines.append(
                f"{r.name[-40:]:40s} {r.kind:8s} {r.weight_bits:2d} {r.act_bits:2d} "
                f"{100 * r.clip_fraction:7.3f} {r.sqnr_db:8.2f}"
            )
        for p in self.products:
            lines.append(
                f"{p.name[-40:]:40s} {p.kind:8s} {'-':>2s} {p.act_bits:2d} "
                f"{100 * p.clip_fraction:7.3f} {p.sqnr_db:8.2f}"
            )
        if self.float_ops():
            lines.append(f"kept in float: {', '.join(self.float_ops())}")
        return "\n".join(lines)


def sqnr_db(reference: torch.Tensor, quantized: torch.Tensor) -> float:
    """``10 log10(sum ref^2 / sum (ref - q)^2)`` in dB; +inf when equal (nan if both are 0)."""
    ref = reference.detach().to(torch.float64)
    err = (ref - quantized.detach().to(torch.float64)).pow(2).sum()
    return _ratio_db(float(ref.pow(2).sum()), float(err))


def _ratio_db(signal: float, noise: float) -> float:
    if noise == 0.0:
        return math.inf if signal > 0.0 else math.nan
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def _record(name: str, layer: QuantizedLayer) -> LayerReport:
    return LayerReport(
        name=name,
        kind=layer.kind,
        depthwise=bool(layer.depthwise),
        weight_shape=tuple(layer.weight.shape),
        weight_bits=layer.weight_bits,
        act_bits=layer.act_bits,
        act_scale=layer.act_scale_float,
        zero_point=layer.act_zero_point_int,
        range_min=layer.range_min,
        range_max=layer.range_max,
        weight_scale_min=float(layer.weight_scale.min()),
        weight_scale_max=float(layer.weight_scale.max()),
        clip_fraction=layer.clip_fraction,
        bias_overflow=int(getattr(layer, "bias_overflow", 0)),
        weight_int_absmax=int(layer.weight_int.abs().max()) if layer.weight_int.numel() else 0,
        off_nearest=_off_nearest(layer),
    )


def _off_nearest(layer: QuantizedLayer) -> float:
    """Fraction of the stored integers that are not the nearest rounding of ``weight_fp32``."""
    q = layer.weight_int.to(torch.int32)
    if not q.numel():
        return 0.0
    nearest = quantize_per_channel(layer.weight_fp32, layer.weight_scale, layer.weight_bits, 0)
    return float((q != nearest).to(torch.float64).mean())


def inspect(qmodel: nn.Module, calib_batches: Iterable[Any] | None = None) -> LayerTable:
    """Per-layer report of a model made by ``quant.quantize``; SQNRs on ``calib_batches`` if given.

    ``calib_batches``: input tensors or ``(x, y)`` tuples (any split; the clipping fraction always
    refers to the range-calibration data seen by ``quantize``). Without batches the SQNR fields
    are NaN. The table's ``coverage`` says how many conv/linear computations were quantized and
    names the rest. Raises ValueError when ``qmodel`` has no quantized layers.
    """
    layers = quantized_layers(qmodel)
    if not layers:
        raise ValueError(
            "inspect needs a model returned by quant.quantize with a quantized precision; "
            f"{type(qmodel).__name__} has no quantized layers (fp32 models have none)"
        )
    reports = [_record(name, layer) for name, layer in layers]
    coverage = getattr(qmodel, "quant_coverage", None)
    products = [(n, m) for n, m in matmul_modules(qmodel) if m.calibrated]
    records = [_product_record(n, m) for n, m in products]
    if calib_batches is None:
        return _table(reports, coverage, records)
    xs = batch_inputs(calib_batches, "calib_batches")
    sums = _sqnr_sums(qmodel, [*layers, *products], xs)
    records = [
        ProductReport(
            **{
                **p.as_dict(),
                "sqnr_db": _ratio_db(sums[p.name]["signal"], sums[p.name]["noise"]),
                "sqnr_isolated_db": _ratio_db(
                    sums[p.name]["signal"], sums[p.name]["noise_isolated"]
                ),
            }
        )
        for p in records
    ]
    out = []
    for r in reports:
        s = sums[r.name]
        out.append(
            LayerReport(
                **{
                    **r.as_dict(),
                    "sqnr_db": _ratio_db(s["signal"], s["noise"]),
                    "sqnr_isolated_db": _ratio_db(s["signal"], s["noise_isolated"]),
                }
            )
        )
    return _table(out, coverage, records)


def _table(
    reports: list[LayerReport], coverage: dict[str, Any] | None, products: list[ProductReport]
) -> LayerTable:
    table = LayerTable(reports)
    table.coverage = coverage
    table.products = products
    return table


def _sqnr_sums(
    qmodel: nn.Module, layers: list[tuple[str, nn.Module]], xs: list[torch.Tensor]
) -> dict[str, dict[str, float]]:
    """Per quantized layer or product (``QuantMatMul``): the fp32 output's energy and the
    noise of the quantized network's and of the module alone's output against it."""
    sums = {name: {"signal": 0.0, "noise": 0.0, "noise_isolated": 0.0} for name, _ in layers}
    # fp32 outputs per layer, first in first out (a layer called twice has two per forward)
    reference: dict[str, list[torch.Tensor]] = {name: [] for name, _ in layers}
    device = next(iter(qmodel.buffers())).device

    def fp32_hook(module: QuantizedLayer, args: tuple, output: torch.Tensor, name: str) -> None:
        ref = output.detach().to(torch.float64)
        reference[name].append(ref.clone())  # clone: an in-place activation may follow
        if isinstance(module, QuantMatMul):  # both operands quantized, the rest fp32
            alone = MATMUL_OPS[module.op](*module.quantize_operands(*args)).to(torch.float64)
        else:
            xq = module.quantize_input(args[0])
            alone = module.layer_op(xq, module.weight, module.bias).to(torch.float64)
        sums[name]["signal"] += float(ref.pow(2).sum())
        sums[name]["noise_isolated"] += float((ref - alone).pow(2).sum())

    def quant_hook(module: QuantizedLayer, args: tuple, output: torch.Tensor, name: str) -> None:
        ref = reference[name].pop(0)
        sums[name]["noise"] += float((ref - output.detach().to(torch.float64)).pow(2).sum())

    was_training = qmodel.training
    qmodel.eval()
    try:
        with torch.no_grad():
            for x in xs:
                for chunk in x.split(_CHUNK):
                    chunk = chunk.to(device)
                    with fake_quant_disabled(qmodel):
                        _run_hooked(qmodel, layers, fp32_hook, chunk)
                    _run_hooked(qmodel, layers, quant_hook, chunk)
    finally:
        qmodel.train(was_training)
    return sums


def _run_hooked(qmodel: nn.Module, layers: list, hook: Any, x: torch.Tensor) -> None:
    handles = [
        layer.register_forward_hook(lambda m, a, o, name=name: hook(m, a, o, name))
        for name, layer in layers
    ]
    try:
        qmodel(x)
    finally:
        for h in handles:
            h.remove()
