"""``qat``: quantization-aware fine-tuning with learned step sizes.

Esser, McKinstry, Bablani, Appuswamy & Modha, "Learned Step Size Quantization", ICLR 2020
(arXiv 1902.08153). The fp32 deploy graph (BatchNorm already folded into the convs, as the
deploy form needs: Krishnamoorthi, arXiv 1806.08342 §3.2; Jacob et al. 2018) is fine-tuned
with every conv/linear quantized in the loop:

    x^ = (clamp(round(x / s_x) + z, 0, 2^a - 1) - z) * s_x          (input, per tensor)
    W^ = clamp(round(W / s_w[c]), -q_max, q_max) * s_w[c]             (weight, per channel)

and every product of two activations (attention's Q·Kᵀ and A·V, ``QuantMatMul``) with both
operands quantized per tensor as ``x^`` above, each with its own learned step
(:class:`LSQMatMul`; the integer-attention setting of I-BERT, Kim et al. 2021),
with ``round`` passed straight through (Bengio et al. 2013) and the step sizes ``s_x``,
``s_w`` learned, their gradients scaled by ``g = 1 / sqrt(N * Q_P)`` (``N`` the elements the
step size quantizes per sample, ``Q_P`` the largest positive level). Steps and zero-points
start from min-max ``ptq`` (the config's range estimator); zero-points stay fixed. Training is
``train.train`` (the study's recipe with the method's ``epochs``, ``lr``, ``weight_decay``,
``batch_size``): resumable from ``ctx.work_dir`` and DDP-capable under torchrun like any
training; a damaged ``last.pt`` there is removed and named (``ctx.heal``, default
``_cache.heal_work_file``: the run's log and ``healed.json``) and the fine-tuning starts
over. At the end the learned steps and the rounded weights become an ordinary quantized model
(``QuantizedLayer.set_weight_int`` / ``set_act_qparams``; ``QuantMatMul.set_qparams`` for the
products, whose steps range calibration then keeps); its ``weight_fp32`` is the fine-tuned fp32
weight.

Options: ``epochs`` (default 2), ``lr`` (SGD, 0.001, cosine to 0: folded networks without
BatchNorm diverged at 0.01 in our runs), ``weight_decay`` (5e-5), ``batch_size`` (0: the
study's), ``log_every``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import fx, nn

from quantcal.quant.graph import set_submodule
from quantcal.quant.layers import QuantizedLayer
from quantcal.quant.matmul import MATMUL_OPS, QuantMatMul
from quantcal.quant.matmul_target import calibrate_products
from quantcal.quant.methods.ptq import layers_with_ranges
from quantcal.quant.methods.registry import (
    MethodContext,
    integer_option,
    number_option,
    register_method,
)
from quantcal.quant.target import LayerTarget
from quantcal.store.cache import heal_work_file

__all__ = ["LSQLayer", "LSQMatMul", "lsq_quantize"]


class _LSQPerTensor(torch.autograd.Function):
    """Per-tensor LSQ in few passes over memory: the forward is quantcal's inference arithmetic
    (``x * float32(1 / s)``, round half to even, clamp, ``* s``: the trained and the final
    quantized model compute alike) and keeps only ``x``; the backward recomputes ``r =
    round(x / s)`` and gives ``dL/dx`` (1 where ``r + z`` lies in ``[q_min, q_max]``, else 0)
    and ``dL/ds = g * sum(dL/dy * d)``, ``d = r - x / s`` inside, ``clamp(r) `` outside."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        step: torch.Tensor,
        zero_point: float,
        q_min: int,
        q_max: int,
        g: float,
    ) -> torch.Tensor:
        s = float(step)
        inv = float(torch.reciprocal(torch.tensor(s, dtype=torch.float32)))
        lo, hi = q_min - zero_point, q_max - zero_point
        ctx.save_for_backward(x)
        ctx.consts = (inv, lo, hi, g)
        return (x * inv).round_().clamp_(lo, hi).mul_(s)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        inv, lo, hi, g = ctx.consts
        v = x * inv
        r = torch.round(v)
        rc = r.clamp(lo, hi)
        inside = rc == r
        d = torch.where(inside, r.sub_(v), rc)
        gs = torch.dot(grad.reshape(-1), d.reshape(-1)) * g
        return grad * inside, gs.reshape(1), None, None, None, None


def lsq_quantize(
    x: torch.Tensor, step: torch.Tensor, zero_point: torch.Tensor, q_min: int, q_max: int, g: float
) -> torch.Tensor:
    """``(clamp(round(x / s) + z, q_min, q_max) - z) * s`` with LSQ gradients: straight through
    ``round`` inside the range, and ``dL/ds`` scaled by ``g``. ``step`` of one element is per
    tensor (:class:`_LSQPerTensor`: PyTorch's fused learnable kernel took as long as a conv's
    backward on a CPU), of ``C`` elements per channel along axis 0 (PyTorch's
    ``torch._fake_quantize_learnable_per_channel_affine``, the kernel of ``torch.ao``'s
    ``_LearnableFakeQuantize``: weights are small); ``zero_point`` (float) is not trained. The
    tests check both against the formula. An
    element is inside the range when its *rounded* value is (``round(x / s) + z`` in ``[q_min,
    q_max]``), as those kernels judge it; the paper's unrounded bound differs only within half
    a step of the range's ends."""
    s = step.abs().clamp_min(1e-8)
    xf = x.float().contiguous()
    if s.numel() == 1:
        z = float(zero_point.reshape(()))
        out = _LSQPerTensor.apply(xf, s.reshape(1), z, q_min, q_max, g)
    else:
        out = torch._fake_quantize_learnable_per_channel_affine(
            xf, s, zero_point, 0, q_min, q_max, g
        )
    return out.to(x.dtype)


class LSQMatMul(nn.Module):
    """A trainable stand-in for one ``QuantMatMul`` (a product of two activations) during QAT:
    both operands fake-quantized per tensor with learned steps (LSQ, as a layer's input),
    zero-points fixed, steps starting from the product's calibrated scales."""

    def __init__(self, product: QuantMatMul) -> None:
        super().__init__()
        self.product = product  # keeps op, bits; gets the learned steps back
        self.step_a = nn.Parameter(torch.tensor(float(product.scale_a)))
        self.step_b = nn.Parameter(torch.tensor(float(product.scale_b)))
        self.register_buffer("_z_a", torch.tensor([float(product.zero_point_a)]))
        self.register_buffer("_z_b", torch.tensor([float(product.zero_point_b)]))
        self.q_min, self.q_max = product._q_min, product._q_max
        self._g: tuple[float, float] | None = None

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self._g is None:  # g = 1 / sqrt(N · Q_P), N the operand's elements per sample
            self._g = tuple(1.0 / math.sqrt(max(1, t[0].numel()) * self.q_max) for t in (a, b))
        aq = lsq_quantize(a, self.step_a, self._z_a, self.q_min, self.q_max, self._g[0])
        bq = lsq_quantize(b, self.step_b, self._z_b, self.q_min, self.q_max, self._g[1])
        return MATMUL_OPS[self.product.op](aq, bq)

    def to_quantized(self) -> QuantMatMul:
        """The product with the learned steps (kept by range calibration afterwards)."""
        with torch.no_grad():
            self.product.set_qparams(
                float(self.step_a.detach().abs().clamp_min(1e-8)),
                int(self._z_a),
                float(self.step_b.detach().abs().clamp_min(1e-8)),
                int(self._z_b),
            )
        return self.product


class LSQLayer(nn.Module):
    """A trainable stand-in for one ``QuantizedLayer`` during QAT (see the module docstring)."""

    def __init__(self, layer: QuantizedLayer) -> None:
        super().__init__()
        self.layer = layer  # keeps the layer_op, bits and the shapes; its buffers are not used
        self.weight = nn.Parameter(layer.weight_fp32.detach().clone())
        bias = layer.bias_float if layer.bias_float is not None else None
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        steps = layer.weight_scale.detach().clone()
        per_tensor = layer.weight_granularity == "tensor"  # one learned step, not C
        self.weight_step = nn.Parameter(steps[:1].clone() if per_tensor else steps)
        self.act_step = nn.Parameter(layer.act_scale.detach().clone().reshape(()))
        self.zero_point = int(layer.act_zero_point_int)
        self.register_buffer("_z_act", torch.tensor([float(self.zero_point)]))
        self.register_buffer("_z_w", torch.zeros(self.weight_step.shape))
        self.q_min, self.q_max = layer._q_min, layer._q_max
        self.w_max = 2 ** (layer.weight_bits - 1) - 1
        per_step = self.weight.numel() if per_tensor else self.weight[0].numel()
        self._g_w = 1.0 / math.sqrt(per_step * self.w_max)
        self._g_a: float | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._g_a is None:
            self._g_a = 1.0 / math.sqrt(max(1, x[0].numel()) * self.q_max)
        xq = lsq_quantize(x, self.act_step, self._z_act, self.q_min, self.q_max, self._g_a)
        wq = lsq_quantize(
            self.weight, self.weight_step, self._z_w, -self.w_max, self.w_max, self._g_w
        )
        return self.layer.layer_op(xq, wq, self.bias)

    def to_quantized(self) -> QuantizedLayer:
        """The ordinary quantized layer with the learned steps and rounded weights."""
        layer = self.layer
        with torch.no_grad():
            layer.weight_fp32 = self.weight.detach().clone()
            if self.bias is not None:
                if layer.bias_fp32 is not None:
                    layer.bias_fp32 = self.bias.detach().clone()
                layer.bias_float = self.bias.detach().clone()
            step = self.weight_step.detach().abs().clamp_min(1e-8)
            w = self.weight.detach().float()
            inv = torch.reciprocal(step).reshape([-1] + [1] * (w.dim() - 1))
            q = torch.round(w * inv).clamp(-self.w_max, self.w_max)
            layer.set_weight_int(q, step.expand(w.shape[0]))
            scale = float(self.act_step.detach().abs().clamp_min(1e-8))
            layer.set_act_qparams(scale, self.zero_point)
            lo = (self.q_min - self.zero_point) * scale
            layer.range_min, layer.range_max = lo, (self.q_max - self.zero_point) * scale
        return layer


_DEFAULTS: dict[str, Any] = {
    "epochs": 2,
    "lr": 0.001,
    "weight_decay": 5e-5,
    "batch_size": 0,
    "log_every": 20,
}


_CHECKS = {
    "epochs": integer_option(1),
    "lr": number_option(0, exclusive_minimum=True),
    "weight_decay": number_option(0),
    "batch_size": integer_option(0),  # 0: the study's (or TrainConfig's) batch size
    "log_every": integer_option(1),
}


@register_method("qat", defaults=_DEFAULTS, needs_train_data=True, checks=_CHECKS)
def qat(gm: fx.GraphModule, target: LayerTarget, ctx: MethodContext) -> dict[str, QuantizedLayer]:
    """Initialise with ``ptq``, fine-tune with LSQ fake quantization, return the layers."""
    from quantcal.training import train

    if ctx.train_data is None:
        raise ValueError(
            "method 'qat' fine-tunes the model and needs training data: pass "
            "quantize(..., train_data=splits) (a study passes its training split)"
        )
    opts = ctx.options  # resolved and checked (``_CHECKS``) by ``QuantMethod.resolve``
    # the products' operand ranges from the fp32 network (the ptq setting), as LSQ's start
    products = calibrate_products(gm, target.config, list(ctx.calib))
    init = layers_with_ranges(gm, target, ctx)
    wrapped = {name: LSQLayer(layer) for name, layer in init.items()}
    for name, w in wrapped.items():
        set_submodule(gm, name, w)
    learned = {name: LSQMatMul(p) for name, p in products.items()}
    for name, w in learned.items():
        set_submodule(gm, name, w)
    gm.requires_grad_(True)
    for w in wrapped.values():  # the wrapped layer's own buffers are not trained
        w.layer.requires_grad_(False)
    base = ctx.train_config or train.TrainConfig(schedule="cosine", nesterov=True)
    recipe = dataclasses.replace(
        base,
        epochs=int(opts["epochs"]),
        lr=float(opts["lr"]),
        weight_decay=float(opts["weight_decay"]),
        batch_size=int(opts["batch_size"]) or base.batch_size,
        schedule="cosine",
        warmup_epochs=0.0,
        log_every=int(opts["log_every"]),
    )
    ctx.log(
        f"qat: fine-tuning {len(wrapped)} quantized layers and {len(learned)} quantized "
        f"product(s) of two activations for {recipe.epochs} epoch(s), lr {recipe.lr:g}, "
        f"batch {recipe.batch_size}"
    )
    device = next(iter(gm.parameters())).device
    train.train(
        gm,
        ctx.train_data,
        recipe,
        out_dir=ctx.work_dir,
        progress=ctx.progress,
        heal=ctx.heal or (lambda path, reason: heal_work_file(path, reason, ctx.log)),
    )
    gm.to(device).eval()  # train.train returns the model on the CPU
    for name, w in learned.items():  # the products go back with their learned steps
        set_submodule(gm, name, w.to_quantized())
    layers = {}
    for name, w in wrapped.items():
        layers[name] = w.to_quantized()
    return layers
