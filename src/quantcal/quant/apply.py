"""``quantize(model, config, calib_batches)``: post-training fake quantization of any CNN.

Steps (Nagel et al., "A White Paper on Neural Network Quantization", arXiv 2106.08295, §3):

1. ``models.to_deploy``: an eval-mode copy with branches reparameterized, functional layers
   made modules and BatchNorm folded, as an ``fx.GraphModule`` (the input model is never
   modified), checked to compute the model's function on the first range-calibration images;
2. every ``Conv1d/2d/3d`` and ``Linear`` leaf module in the graph is a quantized layer; with
   ``first_last_8bit`` the first and last of them in graph order use ``max(bits, 8)``;
3. the quantization method (``method="ptq"`` by default; ``quant.available_methods()``) sets
   each layer from the deploy graph and the range-calibration batches. ``ptq``: the batches run
   through the **fp32** deploy graph and each layer's observer sees that layer's fp32 input (the
   simple, order-independent min-max PTQ of the study; ``QuantConfig(sequential=True)``
   observes in graph order on the network quantized so far); a second fp32 pass counts, per
   layer, the fraction of inputs that saturate the chosen range (the "clipping fraction");
4. each layer is replaced by a ``QuantConv``/``QuantLinear`` holding integer weights
   (symmetric per channel, or per tensor) with their scales, the integer bias on the int32
   accumulator grid ``s_x * s_w[c]`` (``QuantConfig.bias_bits``), and the input's asymmetric
   per-tensor scale and zero-point; its forward is one fake-quant of the input plus the
   ordinary conv/linear with the weight dequantized from the stored integers;
5. the result is frozen (no gradients) and in eval mode, with ``quant_config`` (the
   ``QuantConfig``) and ``precision`` attributes; every layer keeps a record of its parameters
   (``quant.inspect`` reads them) and its fp32 weight, so ``fake_quant_disabled(qmodel)`` runs the
   exact fp32 deploy model for comparisons.

This module holds the dispatcher ``quantize``. The quantized layer classes live in
``quant.layers``, the traced-graph helpers in ``quant.graph`` and ``LayerTarget`` /
``observe_ranges`` / ``finish_quantized`` in ``quant.target``; all stay importable from here.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from quantcal.quant.config import QuantConfig, parse_precision
from quantcal.quant.graph import batch_inputs, device_of, unquantized_computations
from quantcal.quant.layers import (
    WEIGHT_GRANULARITIES,
    QuantConv,
    QuantizedLayer,
    QuantLinear,
    fake_quant_disabled,
    quantized_layers,
)
from quantcal.quant.target import LayerTarget, finish_quantized, observe_ranges

__all__ = [
    "WEIGHT_GRANULARITIES",
    "LayerTarget",
    "QuantConv",
    "QuantLinear",
    "QuantizedLayer",
    "batch_inputs",
    "fake_quant_disabled",
    "finish_quantized",
    "observe_ranges",
    "quantize",
    "quantized_layers",
    "unquantized_computations",
]


def quantize(
    model: nn.Module,
    config: QuantConfig | str | None,
    calib_batches: Iterable[Any] | None,
    *,
    method: str = "ptq",
    method_options: dict[str, Any] | None = None,
    train_data: Any = None,
    train_config: Any = None,
    work_dir: Any = None,
    reparameterize: Any = None,
    log: Any = None,
) -> nn.Module:
    """Quantize ``model`` with a registered method (see the module docstring for the steps of
    the default, ``"ptq"``; ``quant.available_methods()`` lists the rest).

    Args:
        model: any fx-traceable ``nn.Module`` (train or eval form; it is not modified).
        config: a ``QuantConfig``, a precision string ("W4A8"), or None / "fp32" for the fp32
            deploy model (``to_deploy(model)``; ``calib_batches`` is then not used).
        calib_batches: range-calibration batches: an iterable of input tensors or ``(x, y)``
            tuples (the ``ptq_calib`` split, never ``val`` or ``test``); empty -> ValueError.
            Their first 32 images also check that the deploy form computes the model's
            function (``to_deploy(check_input=...)``; a ``UserWarning`` when it does not).
            Methods that reconstruct or correct (``cle_bc``, ``adaround``) use them too.
        method: a registered quantization method: "ptq" (min-max post-training quantization,
            the study's), "cle_bc", "adaround", "qat", ...; an unknown name is a ValueError
            listing the valid ones.
        method_options: the method's options (``quant.get_method(name).defaults`` lists them;
            an unknown key is a ValueError).
        train_data: the training data of methods that train (``qat``): a ``data.Splits`` or
            ``data.Split``; ``train_config`` the ``train.TrainConfig`` they start from (default:
            the method's own) and ``work_dir`` a folder for their resumable checkpoints.
        reparameterize: a ``reparameterize_model``-style helper for the model's deploy form
            (see ``models.deploy.to_deploy``); default: the blocks' own methods.
        log: a callable taking progress lines (methods that take long say what they do).

    Returns:
        a new frozen eval-mode ``nn.Module`` (an ``fx.GraphModule``) on the model's device,
        with ``quant_config``, ``precision`` and ``quant_method`` attributes. Its logits do not
        depend on the evaluation batch size, up to float accumulation order: a conv's fp32
        output can differ in the last bit between batch sizes, and where that crosses a
        rounding boundary the element moves by one quantization step.
    """
    from quantcal.models.deploy import to_deploy
    from quantcal.quant.methods import get_method

    if isinstance(config, str):
        config = parse_precision(config)
    if config is not None and not isinstance(config, QuantConfig):
        raise TypeError(
            f"config must be a QuantConfig, a precision string such as 'W8A8', or None (fp32); "
            f"got {type(config).__name__}"
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize needs an nn.Module, got {type(model).__name__}")
    spec = get_method(method)
    options = spec.resolve(method_options)
    if config is None:
        deploy = to_deploy(model, reparameterize=reparameterize)
        deploy.requires_grad_(False)
        deploy.quant_config = None
        deploy.precision = "fp32"
        deploy.quant_method = None
        return deploy
    xs = batch_inputs(calib_batches)
    gm = to_deploy(
        model, reparameterize=reparameterize, check_input=xs[0][:32].to(device_of(model))
    )
    target = LayerTarget.of(gm, config)
    from quantcal.quant.methods import MethodContext

    ctx = MethodContext(
        calib=xs,
        options=options,
        train_data=train_data,
        log=log or (lambda _line: None),
        train_config=train_config,
        work_dir=work_dir,
    )
    qlayers = spec.fn(gm, target, ctx)
    return finish_quantized(gm, target, qlayers, xs, method=spec.name, options=options)
