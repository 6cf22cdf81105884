"""Post-training quantization: fake-quantize any fx-traceable CNN at any precision.

Scheme (Kuang & Wong, arXiv 2309.13866; REFERENCE.md §5): weights symmetric per output channel,
activations asymmetric per tensor with ranges from range-calibration batches, biases as int32 on
each layer's accumulator grid ``s_x * s_w[c]`` (``QuantConfig.bias_bits``), applied to the deploy
form (``models.to_deploy``).

>>> qmodel = quant.quantize(model, quant.parse_precision("W4A8"), splits.ptq_calib.batches(256))
>>> quant.inspect(qmodel, some_batches)            # per-layer scales, clipping, SQNR
>>> quant.export_onnx(qmodel, "model.onnx", x)     # W8A8 as ONNX QDQ (optional extra [onnx])
>>> quant.quantize(model, "W4A4", calib, method="adaround")   # quant.available_methods()

Importing this package loads only torch-based code; onnx/onnxruntime load on first export.
"""

from __future__ import annotations

from quantcal.quant.apply import fake_quant_disabled, quantize, quantized_layers

# Eager imports are cheap (torch is already needed) and keep ``quant.inspect`` the function:
# binding it here, after the sub-module import, means the sub-module cannot shadow it later.
from quantcal.quant.attribution import AttributionResult, LayerAttribution, attribute_layers
from quantcal.quant.config import PRECISIONS, QuantConfig, parse_precision
from quantcal.quant.export import export_onnx, run_onnx
from quantcal.quant.inspect import LayerReport, LayerTable, inspect
from quantcal.quant.methods import available_methods, get_method, register_method
from quantcal.quant.observers import (
    RangeObserver,
    available_observers,
    get_observer,
    register_observer,
)
from quantcal.quant.plan import (
    PlanBudget,
    PlanResult,
    layer_costs,
    plan_cost,
    plan_mixed_precision,
)

__all__ = [
    "PRECISIONS",
    "AttributionResult",
    "LayerAttribution",
    "LayerReport",
    "LayerTable",
    "PlanBudget",
    "PlanResult",
    "QuantConfig",
    "RangeObserver",
    "attribute_layers",
    "available_methods",
    "available_observers",
    "export_onnx",
    "fake_quant_disabled",
    "get_method",
    "get_observer",
    "inspect",
    "layer_costs",
    "parse_precision",
    "plan_cost",
    "plan_mixed_precision",
    "quantize",
    "quantized_layers",
    "register_method",
    "register_observer",
    "run_onnx",
]
