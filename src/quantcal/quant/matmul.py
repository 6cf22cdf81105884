"""Activation x activation products, quantized: ``QuantMatMul`` and the graph rewrite that
puts it in place of every matrix product of two activations (issue #26 item 2).

A conv or linear layer multiplies an activation by a constant weight; attention multiplies two
activations, ``Q Kᵀ`` and ``softmax(.) V``. Integer runtimes run those products on integers
too, each operand quantized per tensor with its own scale and zero-point (Jacob et al., CVPR
2018, §2.3 for the integer product of two asymmetric operands; ONNX QDQ ``MatMul`` with a
``DequantizeLinear`` on both inputs; I-BERT, Kim et al., ICML 2021 and FQ-ViT, Lin et al.,
IJCAI 2022 for attention). ``QuantMatMul`` simulates that:

    a^ = (clamp(round(a / s_a) + z_a, 0, 2^b - 1) - z_a) s_a      (likewise b^)
    out = a^ @ b^                                            (``matmul``, ``bmm`` or ``mm``)

with ``b`` the cell's activation bits and each ``(s, z)`` from the config's range estimator
on that operand (``quant.primitives.activation_qparams``; the fake-quant arithmetic is the
layers' own, ``fake_quantize_per_tensor_fast``). Until its ranges are set, or with
``fake_quant_enabled`` False (``fake_quant_disabled``), it computes the fp32 product.

``rewrite_matmuls`` replaces, in a deploy graph, each ``torch.matmul`` / ``@`` / ``torch.bmm``
/ ``torch.mm`` call (function or method) whose two operands both depend on the input (neither
a constant of ``models.lift.constant_nodes``) by a call of a new ``QuantMatMul`` module;
``observe_matmuls`` sets their ranges from the range-calibration batches.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn

from quantcal.quant.graph import run_with_pre_hooks
from quantcal.quant.observers import get_observer
from quantcal.quant.primitives import (
    activation_qparams,
    activation_qrange,
    fake_quantize_per_tensor_fast,
)

__all__ = [
    "MATMUL_OPS",
    "QuantMatMul",
    "activation_product",
    "free_name",
    "matmul_modules",
    "module_scope",
    "observe_matmuls",
    "record_clip_fractions",
    "rewrite_matmuls",
]

#: The products ``QuantMatMul`` computes, by name.
MATMUL_OPS: dict[str, Callable[..., torch.Tensor]] = {
    "matmul": torch.matmul,
    "bmm": torch.bmm,
    "mm": torch.mm,
}
_FUNCTIONS = {torch.matmul: "matmul", operator.matmul: "matmul", torch.bmm: "bmm", torch.mm: "mm"}
_METHODS = {"matmul": "matmul", "__matmul__": "matmul", "bmm": "bmm", "mm": "mm"}


class QuantMatMul(nn.Module):
    """``a @ b`` (``op``: "matmul", "bmm" or "mm") with both operands fake-quantized per tensor,
    asymmetric, at ``act_bits``, each with its own range (see the module docstring).

    ``set_ranges`` sets both operands' ranges (as observed); before that the product is fp32.
    The record ``quant.inspect`` reads: ``range_a`` / ``range_b``, ``scale_a`` / ``scale_b``,
    ``zero_point_a`` / ``zero_point_b``, ``clip_fraction_a`` / ``clip_fraction_b`` (the
    fraction of range-calibration operand values that saturate), ``observer``.
    """

    kind = "MatMul"

    def __init__(self, op: str = "matmul", *, act_bits: int = 8, observer: str = "minmax") -> None:
        super().__init__()
        if op not in MATMUL_OPS:
            raise ValueError(f"QuantMatMul op must be one of {', '.join(MATMUL_OPS)}, got {op!r}")
        self.op = op
        self.act_bits = act_bits
        self.observer = observer
        self.fake_quant_enabled = True
        self.calibrated = False
        #: True when a method set the quantization parameters itself (``qat``'s learned
        #: steps): range calibration then leaves them alone
        self.qparams_from_method = False
        self._q_min, self._q_max = activation_qrange(act_bits)
        self.range_a = self.range_b = (math.nan, math.nan)
        self.scale_a = self.scale_b = math.nan
        self.zero_point_a = self.zero_point_b = 0
        self.clip_fraction_a = self.clip_fraction_b = math.nan
        self._inv_a = self._inv_b = math.nan

    def set_ranges(self, range_a: tuple[float, float], range_b: tuple[float, float]) -> None:
        """Set both operands' ranges; their scales and zero-points follow
        (``activation_qparams``)."""
        self.range_a = (float(range_a[0]), float(range_a[1]))
        self.range_b = (float(range_b[0]), float(range_b[1]))
        self.scale_a, self.zero_point_a = activation_qparams(*self.range_a, self.act_bits)
        self.scale_b, self.zero_point_b = activation_qparams(*self.range_b, self.act_bits)
        one = torch.tensor(1.0, dtype=torch.float32)
        self._inv_a = float(one / torch.tensor(self.scale_a, dtype=torch.float32))
        self._inv_b = float(one / torch.tensor(self.scale_b, dtype=torch.float32))
        self.calibrated = True

    def set_qparams(
        self, scale_a: float, zero_point_a: int, scale_b: float, zero_point_b: int
    ) -> None:
        """Set both operands' scales and zero-points directly (a method's learned ones); the
        ranges become the grids' ends, ``((q_min - z) s, (q_max - z) s)``, and range
        calibration keeps them (``qparams_from_method``)."""
        one = torch.tensor(1.0, dtype=torch.float32)
        for side, scale, zp in (("a", scale_a, zero_point_a), ("b", scale_b, zero_point_b)):
            scale, zp = float(scale), int(zp)
            setattr(self, f"scale_{side}", scale)
            setattr(self, f"zero_point_{side}", zp)
            setattr(self, f"_inv_{side}", float(one / torch.tensor(scale, dtype=torch.float32)))
            setattr(self, f"range_{side}", ((self._q_min - zp) * scale, (self._q_max - zp) * scale))
        self.calibrated = True
        self.qparams_from_method = True

    def quantize_operands(
        self, a: torch.Tensor, b: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The fake-quantized operands (new tensors; ``a`` and ``b`` are not modified)."""
        lo, hi = self._q_min, self._q_max
        aq = fake_quantize_per_tensor_fast(a, self.scale_a, self._inv_a, self.zero_point_a, lo, hi)
        bq = fake_quantize_per_tensor_fast(b, self.scale_b, self._inv_b, self.zero_point_b, lo, hi)
        return aq, bq

    def saturation_counts(self, a: torch.Tensor, b: torch.Tensor) -> tuple[int, int]:
        """How many elements of each operand lie more than half a step outside its range."""
        out = []
        for x, s, z in ((a, self.scale_a, self.zero_point_a), (b, self.scale_b, self.zero_point_b)):
            lo = (self._q_min - z - 0.5) * s
            hi = (self._q_max - z + 0.5) * s
            out.append(int((x < lo).sum()) + int((x > hi).sum()))
        return out[0], out[1]

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        fn = MATMUL_OPS[self.op]
        if not (self.fake_quant_enabled and self.calibrated):
            return fn(a, b)
        return fn(*self.quantize_operands(a, b))

    def extra_repr(self) -> str:
        if not self.calibrated:
            return f"{self.op}, A{self.act_bits}, not calibrated (fp32)"
        return (
            f"{self.op}, A{self.act_bits}, a: scale={self.scale_a:.4g} zp={self.zero_point_a}, "
            f"b: scale={self.scale_b:.4g} zp={self.zero_point_b}"
        )


def activation_product(node: fx.Node, constants: set[fx.Node]) -> str | None:
    """The ``QuantMatMul`` op of ``node`` when it is a plain product of two activations
    (``matmul``/``@``/``bmm``/``mm``, two node operands, neither in ``constants``, no keyword
    arguments such as ``out=``), else None."""
    if node.op == "call_function":
        op = _FUNCTIONS.get(node.target)  # type: ignore[arg-type]
    elif node.op == "call_method":
        op = _METHODS.get(str(node.target))
    else:
        return None
    if op is None or node.kwargs or len(node.args) != 2:
        return None
    a, b = node.args
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        return None
    return None if a in constants or b in constants else op


def module_scope(node: fx.Node) -> str:
    """The path of the innermost module whose forward made the call ("" at the top)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1]
    return str(path[0] if isinstance(path, tuple) else path)


def free_name(gm: nn.Module, base: str) -> str:
    """``base``, or ``base_1``, ``base_2``, ... : the first that names no attribute of ``gm``."""
    name, i = base, 0
    while True:
        parent, _, leaf = name.rpartition(".")
        try:
            owner = gm.get_submodule(parent) if parent else gm
        except AttributeError:
            return name
        if not hasattr(owner, leaf):
            return name
        i += 1
        name = f"{base}_{i}"


def rewrite_matmuls(
    gm: fx.GraphModule, make: Callable[[str], QuantMatMul]
) -> dict[str, QuantMatMul]:
    """Replace each product of two activations in ``gm`` (``activation_product``) by a call of
    a new module ``make(op)`` installed at ``SCOPE.NODE`` (the module whose forward computed it
    and the node's name, e.g. ``blocks.0.attn.matmul``). Returns the new modules by name, in
    graph order; ``gm`` is recompiled. The fp32 function is unchanged."""
    from quantcal.models.lift import constant_nodes

    constants = constant_nodes(gm)
    added: dict[str, QuantMatMul] = {}
    for node in list(gm.graph.nodes):
        op = activation_product(node, constants)
        if op is None:
            continue
        scope = module_scope(node)
        name = free_name(gm, f"{scope}.{node.name}" if scope else node.name)
        module = make(op)
        gm.add_submodule(name, module)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(name, tuple(node.args))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        added[name] = module
    if added:
        gm.graph.lint()
        gm.recompile()
    return added


def matmul_modules(model: nn.Module) -> list[tuple[str, QuantMatMul]]:
    """``(name, module)`` of every ``QuantMatMul`` of ``model``, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantMatMul)]


def observe_matmuls(
    model: nn.Module,
    matmuls: dict[str, QuantMatMul],
    xs: list[torch.Tensor],
    observer: str,
    observer_options: dict[str, Any],
) -> None:
    """Set every ``QuantMatMul``'s operand ranges from one pass of ``xs`` through ``model``
    (the range estimator ``observer`` per operand, at the module's bits), then record each
    operand's clipping fraction on a second pass. ``model`` runs as it is: pass the fp32
    network (``fake_quant_disabled``) for the order-independent ranges of ``ptq``."""
    if not matmuls:
        return
    observers = {
        name: (
            get_observer(observer, bits=m.act_bits, **observer_options),
            get_observer(observer, bits=m.act_bits, **observer_options),
        )
        for name, m in matmuls.items()
    }

    def observe(name: str, a: torch.Tensor, b: torch.Tensor) -> None:
        observers[name][0].observe(a)
        observers[name][1].observe(b)

    run_with_pre_hooks(model, matmuls, observe, xs, all_inputs=True)
    for name, m in matmuls.items():
        oa, ob = observers[name]
        if oa.count == 0:
            raise ValueError(
                f"activation product {name!r} saw no operands during range calibration; is it "
                "used in forward()?"
            )
        m.set_ranges(oa.range(), ob.range())
    record_clip_fractions(model, matmuls, xs)


def record_clip_fractions(
    model: nn.Module, matmuls: dict[str, QuantMatMul], xs: list[torch.Tensor]
) -> None:
    """Set each product's ``clip_fraction_a`` / ``clip_fraction_b``: the fraction of its
    operands' values on ``xs`` (``model`` run as it is, the products in fp32) that lie more than
    half a step outside its grid."""
    clipped = {name: [0, 0, 0, 0] for name in matmuls}

    def count(name: str, a: torch.Tensor, b: torch.Tensor) -> None:
        ca, cb = matmuls[name].saturation_counts(a, b)
        c = clipped[name]
        c[0], c[1], c[2], c[3] = c[0] + ca, c[1] + a.numel(), c[2] + cb, c[3] + b.numel()

    with _fp32(matmuls):
        run_with_pre_hooks(model, matmuls, count, xs, all_inputs=True)
    for name, m in matmuls.items():
        ca, na, cb, nb = clipped[name]
        m.clip_fraction_a = ca / na if na else math.nan
        m.clip_fraction_b = cb / nb if nb else math.nan


class _fp32:
    """Within the block, the given products compute in fp32 (their state is restored)."""

    def __init__(self, matmuls: dict[str, QuantMatMul]) -> None:
        self.matmuls = matmuls
        self.states: list[bool] = []

    def __enter__(self) -> None:
        self.states = [m.fake_quant_enabled for m in self.matmuls.values()]
        for m in self.matmuls.values():
            m.fake_quant_enabled = False

    def __exit__(self, *exc: Any) -> None:
        for m, state in zip(self.matmuls.values(), self.states):
            m.fake_quant_enabled = state
