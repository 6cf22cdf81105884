"""Conv, linear and matmul calls counted at run time, so "k of n quantized" holds whatever the
tracer saw (issue #26).

``quantize`` counts the conv/linear/matmul computations of a traced graph; a function that fx
was told not to trace (``torch.fx.wrap``) or a leaf module whose forward it never sees is one
opaque node, and the products inside it would run in fp32 unnamed. :func:`hidden_computations`
runs the quantized model once on a real input under a ``TorchFunctionMode`` and records every
conv, linear and matrix product that runs outside a quantized layer; those called from the
traced graph's own code are the ones the static count already names, the rest (called from
inside an opaque function) are returned, grouped by the function that made them.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from quantcal.quant.layers import QuantizedLayer
from quantcal.quant.matmul import QuantMatMul

__all__ = ["COUNTED_OPS", "caller_site", "hidden_computations"]

#: The names of the torch functions counted as conv/linear/matmul computations.
COUNTED_OPS = frozenset(
    {
        "conv1d",
        "conv2d",
        "conv3d",
        "conv_transpose1d",
        "conv_transpose2d",
        "conv_transpose3d",
        "linear",
        "bilinear",
        "matmul",
        "__matmul__",
        "__rmatmul__",
        "mm",
        "bmm",
        "addmm",
        "baddbmm",
        "addbmm",
        "einsum",
        "scaled_dot_product_attention",
    }
)

_TORCH_DIR = str(Path(torch.__file__).resolve().parent) + os.sep  # not torchvision/
_THIS = str(Path(__file__).resolve())


def caller_site() -> tuple[str, str, int] | None:
    """(function name, file, line) of the innermost frame outside torch and this module, or
    None when that frame is code fx generated for a graph (a computation the graph shows).
    Call it from a ``TorchFunctionMode.__torch_function__``: the search starts at that
    method's caller."""
    frame = sys._getframe(2)
    while frame is not None:
        file = frame.f_code.co_filename
        if not (file.startswith(_TORCH_DIR) or file == _THIS):
            if file.startswith("<eval_with_key"):
                return None
            return frame.f_code.co_name, file, frame.f_lineno
        frame = frame.f_back
    return None


class _Counting(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.inside = 0  # depth of quantized layers' forwards
        self.hidden: Counter[tuple[str, str, str]] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in COUNTED_OPS and not self.inside:
            where = caller_site()
            if where is not None:
                self.hidden[(where[0], f"{Path(where[1]).name}:{where[2]}", name)] += 1
        return func(*args, **(kwargs or {}))


def hidden_computations(model: nn.Module, x: Any) -> list[tuple[str, int]]:
    """Run ``model`` on ``x`` (no grad) and name the conv/linear/matmul computations that ran
    outside its quantized layers and products (``QuantMatMul``) and outside the code of its
    traced graph, i.e. inside opaque functions or leaf modules:
    ``("FUNCTION (OP call at FILE:LINE, k at run time)", k)``, one entry per call site, in the
    order they first ran. ``k`` counts the computations as fx counts a graph's (each execution
    once: a helper called by 12 blocks makes 12)."""
    mode = _Counting()

    def enter(_m, _a):
        mode.inside += 1

    def leave(_m, _a, _o):
        mode.inside -= 1

    handles = []
    for m in model.modules():
        if isinstance(m, (QuantizedLayer, QuantMatMul)):  # a quantized product is no fp32 one
            handles += [m.register_forward_pre_hook(enter), m.register_forward_hook(leave)]
    try:
        with torch.no_grad(), mode:
            model(x)
    finally:
        for h in handles:
            h.remove()
    return [
        (f"{fn} ({op} call at {site}, {n} at run time)", n)
        for (fn, site, op), n in mode.hidden.items()
    ]
