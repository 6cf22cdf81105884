"""``cle_bc``: cross-layer equalization with bias absorption, then empirical bias correction.

Nagel, van Baalen, Blankevoort & Welling, "Data-Free Quantization Through Weight Equalization
and Bias Correction", ICCV 2019 (arXiv 1906.04721), aimed at depthwise-separable networks whose
per-channel weight ranges differ by orders of magnitude.

* **Equalization** (§4.1): for consecutive layers ``y = W2 f(W1 x + b1) + b2`` with ``f``
  positively homogeneous (ReLU, LeakyReLU, or nothing between), output channel ``i`` of the
  first layer is divided by ``s_i`` and input channel ``i`` of the second multiplied by it,
  ``s_i = sqrt(r1_i r2_i) / r2_i`` with ``r`` the per-channel weight range (max |w|): both
  ranges become ``sqrt(r1_i r2_i)``. The fp32 function is unchanged; pairs sharing a layer
  (pointwise -> depthwise -> pointwise) are iterated until the scales settle.
* **Bias absorption** (§4.1.2): where ``f`` is ReLU, ``c_i = max(0, mean_i - 3 std_i)`` of the
  first layer's pre-activation output (measured on the range-calibration data: the deploy form
  has no BatchNorm left to read it from) moves from ``b1`` into ``b2 += W2 c``. It is exact for
  inputs above ``c`` and a second layer without zero padding, so it is done only there.
* **Empirical bias correction** (§4.2): layer by layer in graph order, with everything upstream
  quantized (and corrected), the mean output error per channel on the range-calibration data,
  ``E[W~ x~] - E[W x]``, is subtracted from the (integer) bias, so the quantized network's mean
  pre-activation equals the fp32 one on that data.

Options: ``equalize`` (bool), ``absorb`` (bool), ``bias_correction`` (bool), ``iterations``
(the most equalization sweeps, stopping earlier when every scale is within 1e-4 of 1). A model
with no equalizable pair is a ValueError when ``equalize`` is on.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from quantcal.models.opaque import keeps_torch_forward
from quantcal.quant.layers import QuantizedLayer
from quantcal.quant.methods._sequential import (
    channel_dim,
    channel_sums,
    run_sequential,
)
from quantcal.quant.methods.ptq import fp32_ranges_if_shared, layer_from
from quantcal.quant.methods.registry import MethodContext, integer_option, register_method
from quantcal.quant.target import LayerTarget, observe_ranges

__all__ = ["EqualizationPair", "absorb_biases", "cross_layer_equalize", "equalization_pairs"]

_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_HOMOGENEOUS_MODULES = (nn.ReLU, nn.LeakyReLU, nn.Identity)
_HOMOGENEOUS_FUNCTIONS = {F.relu, torch.relu, F.leaky_relu}
_RELU_LIKE = (nn.ReLU,)


class EqualizationPair:
    """Two layers ``first -> f -> second`` whose channel ``i`` can be rescaled (see the module
    docstring); ``relu`` says whether ``f`` is a ReLU (bias absorption applies)."""

    def __init__(self, first: str, second: str, relu: bool, act_node: fx.Node | None) -> None:
        self.first, self.second, self.relu, self.act_node = first, second, relu, act_node

    def __repr__(self) -> str:
        between = "relu" if self.relu else "direct"
        return f"EqualizationPair({self.first} -> {self.second}, {between})"


def _is_layer(gm: fx.GraphModule, node: Any) -> bool:
    """A conv/linear layer node whose module computes the plain layer (not an opaque conv
    subclass: TF "same" padding would make bias absorption inexact, weight standardization
    would undo the rescaling)."""
    return (
        isinstance(node, fx.Node)
        and node.op == "call_module"
        and keeps_torch_forward(gm.get_submodule(str(node.target)))
    )


def _homogeneous(gm: fx.GraphModule, node: fx.Node) -> tuple[bool, bool]:
    """(positively homogeneous elementwise op, is a ReLU) for one node."""
    if node.op == "call_module":
        m = gm.get_submodule(str(node.target))
        return isinstance(m, _HOMOGENEOUS_MODULES), isinstance(m, _RELU_LIKE)
    if node.op == "call_function" and node.target in _HOMOGENEOUS_FUNCTIONS:
        return True, node.target is not F.leaky_relu
    if node.op == "call_method" and node.target in ("relu", "relu_"):
        return True, True
    return False, False


def _channels(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return module.in_channels, module.out_channels


def _second_ok(module: nn.Module) -> bool:
    """The second layer's input channels can be scaled one by one: a dense conv/linear or a
    depthwise conv (groups == in == out channels)."""
    if isinstance(module, nn.Linear):
        return True
    return module.groups == 1 or module.groups == module.in_channels == module.out_channels


def equalization_pairs(gm: fx.GraphModule) -> list[EqualizationPair]:
    """Every ``layer -> [ReLU / LeakyReLU / nothing] -> layer`` pair in ``gm`` where the first
    layer's output feeds only that path, the channels correspond one to one and neither layer
    is called more than once (a shared layer's other call would change)."""
    pairs = []
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
    for node in gm.graph.nodes:
        if not _is_layer(gm, node) or len(node.users) != 1:
            continue
        nxt = next(iter(node.users))
        act, relu = None, False
        if not _is_layer(gm, nxt):
            homogeneous, relu = _homogeneous(gm, nxt)
            if not homogeneous or len(nxt.users) != 1:
                continue
            act, nxt = nxt, next(iter(nxt.users))
            if not _is_layer(gm, nxt) or nxt.args[0] is not act:
                continue
        elif nxt.args[0] is not node:
            continue
        first, second = gm.get_submodule(str(node.target)), gm.get_submodule(str(nxt.target))
        if type(first) is not type(second) and not isinstance(second, nn.Linear):
            continue  # conv -> linear needs a flatten between; never adjacent here
        if isinstance(second, nn.Linear) and not isinstance(first, nn.Linear):
            continue
        if _channels(first)[1] != _channels(second)[0] or not _second_ok(second):
            continue
        if str(node.target) == str(nxt.target):
            continue
        if calls[str(node.target)] > 1 or calls[str(nxt.target)] > 1:
            continue  # a layer called twice: rescaling it would change its other call too
        pairs.append(EqualizationPair(str(node.target), str(nxt.target), relu, act))
    return pairs


def _out_range(module: nn.Module) -> torch.Tensor:
    w = module.weight.detach()
    return w.abs().reshape(w.shape[0], -1).amax(1).to(torch.float64)


def _in_range(module: nn.Module) -> torch.Tensor:
    w = module.weight.detach()
    if isinstance(module, nn.Linear) or module.groups == 1:
        return w.abs().transpose(0, 1).reshape(w.shape[1], -1).amax(1).to(torch.float64)
    return w.abs().reshape(w.shape[0], -1).amax(1).to(torch.float64)  # depthwise


def _scale_in(module: nn.Module, s: torch.Tensor) -> None:
    w = module.weight.data
    if isinstance(module, nn.Linear) or module.groups == 1:
        shape = [1, -1] + [1] * (w.dim() - 2)
    else:
        shape = [-1] + [1] * (w.dim() - 1)
    w.mul_(s.to(w.dtype).reshape(shape))


def _scale_out(module: nn.Module, s: torch.Tensor) -> None:
    w = module.weight.data
    w.div_(s.to(w.dtype).reshape([-1] + [1] * (w.dim() - 1)))
    if module.bias is not None:
        module.bias.data.div_(s.to(w.dtype))


def cross_layer_equalize(
    gm: fx.GraphModule, pairs: list[EqualizationPair] | None = None, *, iterations: int = 20
) -> list[EqualizationPair]:
    """Equalize every pair of ``gm`` in place (fp32 function unchanged up to float rounding);
    returns the pairs. Channels whose range is 0 in either layer are left alone."""
    pairs = equalization_pairs(gm) if pairs is None else pairs
    for _ in range(max(1, iterations)):
        worst = 0.0
        for p in pairs:
            first, second = gm.get_submodule(p.first), gm.get_submodule(p.second)
            r1, r2 = _out_range(first), _in_range(second)
            ok = (r1 > 0) & (r2 > 0)
            s = torch.where(ok, torch.sqrt(r1 * r2) / torch.where(ok, r2, 1.0), 1.0)
            _scale_out(first, s)
            _scale_in(second, s)
            worst = max(worst, float((s.log().abs()).max()) if s.numel() else 0.0)
        if worst < 1e-4:
            break
    return pairs


def absorb_biases(gm: fx.GraphModule, pairs: list[EqualizationPair], xs: list[torch.Tensor]) -> int:
    """Bias absorption over the ReLU pairs whose second layer has no zero padding (exact for
    pre-activations above ``c``); returns how many pairs absorbed a nonzero ``c``."""
    from quantcal.quant.graph import run_with_pre_hooks

    chosen, skipped = [], []
    for p in pairs:
        first, second = gm.get_submodule(p.first), gm.get_submodule(p.second)
        padded = not isinstance(second, nn.Linear) and (
            second.padding != "valid"
            if isinstance(second.padding, str)
            else any(int(v) != 0 for v in second.padding)
        )
        if p.relu and first.bias is not None:
            (skipped if padded else chosen).append(p)
    if skipped:  # asked for, not done: said where the rows are read (the notes column)
        warnings.warn(
            f"cle_bc: bias absorption skipped for {len(skipped)} of "
            f"{len(skipped) + len(chosen)} ReLU pairs whose second conv zero-pads its input "
            f"(absorption is exact only without padding), e.g. {skipped[0].first} -> "
            f"{skipped[0].second}",
            UserWarning,
            stacklevel=2,
        )
    if not chosen:
        return 0
    stats: dict[str, list[torch.Tensor]] = {p.first: [] for p in chosen}
    firsts = {p.first: gm.get_submodule(p.first) for p in chosen}
    run_with_pre_hooks(
        gm, firsts, lambda name, out: stats[name].append(out.detach()), xs, outputs=True
    )
    absorbed = 0
    for p in chosen:
        first, second = gm.get_submodule(p.first), gm.get_submodule(p.second)
        dim = channel_dim(first)
        total, n = channel_sums(stats[p.first], dim)
        sq, _ = channel_sums([y.to(torch.float64) ** 2 for y in stats[p.first]], dim)
        mean = total / n
        std = (sq / n - mean**2).clamp_min(0).sqrt()
        c = (mean - 3 * std).clamp_min(0)
        if not bool((c > 0).any()):
            continue
        w2 = second.weight.detach().to(torch.float64)
        if isinstance(second, nn.Linear) or second.groups == 1:
            shift = (w2.reshape(w2.shape[0], w2.shape[1], -1).sum(-1)) @ c
        else:
            shift = w2.reshape(w2.shape[0], -1).sum(-1) * c
        first.bias.data.sub_(c.to(first.bias.dtype))
        if second.bias is None:
            second.bias = nn.Parameter(torch.zeros(w2.shape[0], dtype=second.weight.dtype))
        second.bias.data.add_(shift.to(second.bias.dtype))
        absorbed += 1
    return absorbed


def correct_bias(
    layer: QuantizedLayer, module: nn.Module, xq: list[torch.Tensor], xf: list[torch.Tensor]
) -> list[torch.Tensor]:
    """Empirical bias correction of one layer: subtract the mean per-channel output error of
    ``layer`` on the quantized path's inputs ``xq`` against the fp32 ``module`` on ``xf``.
    Returns the fp32 outputs (the sequential pass reuses them)."""
    dim = channel_dim(module)
    with torch.no_grad():
        fp32 = [module(x) for x in xf]
        ref, n = channel_sums(fp32, dim)
        out, _ = channel_sums([layer(x) for x in xq], dim)
    error = (out - ref) / n
    base = layer.bias  # the bias in effect (on its grid) is what the error was measured with
    if base is None:
        base = torch.zeros(error.shape, dtype=layer.weight_fp32.dtype, device=error.device)
    layer.set_bias(base - error.to(base.dtype).to(base.device))
    return fp32


@register_method(
    "cle_bc",
    defaults={"equalize": True, "absorb": True, "bias_correction": True, "iterations": 20},
    checks={"iterations": integer_option(1)},
)
def cle_bc(
    gm: fx.GraphModule, target: LayerTarget, ctx: MethodContext
) -> dict[str, QuantizedLayer]:
    """Equalize (and absorb) on the fp32 graph, then quantize with bias correction."""
    opts = ctx.options
    if opts["equalize"]:
        pairs = equalization_pairs(gm)
        if not pairs:
            raise ValueError(
                "cle_bc: this model has no equalizable layer pair (conv/linear -> ReLU, "
                "LeakyReLU or nothing -> conv/linear, the first feeding only the second, "
                "channels one to one); cross-layer equalization cannot apply. Use method "
                "'adaround' or 'qat', or cle_bc with equalize=false for bias correction alone"
            )
        cross_layer_equalize(gm, pairs, iterations=int(opts["iterations"]))
        absorbed = absorb_biases(gm, pairs, ctx.calib) if opts["absorb"] else 0
        ctx.log(f"cle_bc: equalized {len(pairs)} layer pairs, absorbed biases in {absorbed}")
    ranges = fp32_ranges_if_shared(gm, target, ctx.calib)
    if ranges is None and not target.config.sequential and not opts["bias_correction"]:
        ranges = observe_ranges(gm, target, ctx.calib)  # no fp32 path in the pass

    def on_layer(name: str, module: nn.Module, xq: list, xf: list | None) -> Any:
        layer = layer_from(target, name, xq, xf, ranges)
        if opts["bias_correction"]:
            assert xf is not None
            return layer, correct_bias(layer, module, xq, xf)
        return layer

    layers = run_sequential(gm, target, ctx.calib, on_layer, keep_fp32=opts["bias_correction"])
    if not all(
        math.isfinite(float(q.bias_float.abs().sum()))
        for q in layers.values()
        if q.bias_float is not None
    ):
        raise ValueError("cle_bc: bias correction produced a non-finite bias")
    return layers
