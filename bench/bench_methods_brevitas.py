"""Brevitas's post-training quantization pipelines, for a side-by-side with quantcal's methods.

Runs in its own environment (Brevitas pins ``setuptools<81`` and its learned-round code needs
``accelerate``), e.g.::

    python3.11 -m venv /work/brevvenv
    /work/brevvenv/bin/pip install torch==2.13.0      # the CPU wheel
    /work/brevvenv/bin/pip install brevitas==0.13.4 accelerate
    /work/brevvenv/bin/pip install -e .
    OMP_NUM_THREADS=1 /work/brevvenv/bin/python bench/bench_methods_brevitas.py --quick

``run_brevitas(method, model, calib, test_x, test_y, weight_bits, act_bits, iters)`` quantizes
an fp32 eval-mode model with Brevitas and returns ``{"accuracy", "seconds", "notes"}``; a bench
that imports it from this folder can put the numbers beside quantcal's. The scheme is
quantcal's (``quant`` package docstring), built from Brevitas's own quantizers:

* weights symmetric per output channel, narrow range (``[-(2^(b-1) - 1), 2^(b-1) - 1]``),
  float scale ``max|W_c| / (2^(b-1) - 1)``: ``Int8WeightPerChannelFloat`` with ``bit_width=W``;
* activations asymmetric per tensor, unsigned ``[0, 2^b - 1]`` with an integer zero point, range
  ``[min(lo, 0), hi]`` from min-max statistics of the fp32 network:
  ``ShiftedUint8ActPerTensorFloat`` with ``bit_width=A``, ``scaling_stats_op=MIN_MAX`` and
  ``zero_point_stats_impl=NegativeMinOrZero`` (its default is a 99.999 % percentile interval);
* biases as int32 on the accumulator grid ``s_x * s_w[c]``: ``Int32Bias``;
* the activation quantizer sits on the input of every conv and linear layer (the first layer's
  input, the image, too): ``brevitas.graph.quantize.layerwise_quantize``; every layer at the
  same bits, no 8-bit first/last layer.

Pipelines (``METHODS``), every one on the deploy form (``models.to_deploy``: BatchNorm folded,
branches reparameterized), the same graph quantcal quantizes:

* ``ptq``: min-max activation calibration only (``brevitas.graph.calibrate.calibration_mode``);
* ``cle_bc``: cross-layer weight equalization (``brevitas.graph.equalize.EqualizeGraph``,
  Nagel et al. 2019 §4.1: max|W| per channel, 20 iterations), then calibration, then empirical
  bias correction (``brevitas.graph.calibrate.bias_correction_mode``). Brevitas has no bias
  absorption (Nagel §4.1.1);
* ``adaround``: calibration, then AdaRound (Nagel et al. 2020) layer by layer with Brevitas's
  learned-round trainer (``brevitas_examples.common.learned_round``): the hard-sigmoid
  rounding ``h(V)`` (zeta 1.1, gamma -0.1), Adam lr 1e-3, batch 32, ``iters`` steps per layer,
  loss = sum-over-channels MSE against the fp32 layer output on the quantized network's input
  + 0.01 * rounding regulariser (20 % warm-up, beta 20 -> 2), as ``ptq_evaluate.py
  --learned-round hard_sigmoid --learned-round-loss regularised_mse`` does.

``--quick`` trains ShuffleNetV2 (width 0.25) on scikit-learn's 8x8 digits for a few epochs and
prints the three pipelines at W4A8 (and quantcal's own ``ptq`` when it runs in this env)::

    OMP_NUM_THREADS=1 /work/brevvenv/bin/python bench/bench_methods_brevitas.py --quick

Without ``--quick`` the same table is made for ``--arch/--width/--precisions/--iters`` on
digits (``--epochs`` of training first).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import time
import warnings
from typing import Any

import torch
from torch import nn

METHODS = ("ptq", "cle_bc", "adaround")

#: AdaRound's hyper-parameters (Nagel et al. 2020; quantcal's ``adaround`` defaults).
ADAROUND = {"batch_size": 32, "lr": 1e-3, "reg_weight": 0.01, "warmup": 0.2, "beta": (20, 2)}


def _quantizers(weight_bits: int, act_bits: int) -> dict[type, tuple[type, dict[str, Any]]]:
    """The layer map for ``layerwise_quantize``: conv / linear -> Brevitas layer + quantizers."""
    import brevitas.nn as qnn
    from brevitas.core.stats import NegativeMinOrZero
    from brevitas.inject.enum import StatsOp
    from brevitas.quant.scaled_int import Int8WeightPerChannelFloat, Int32Bias
    from brevitas.quant.shifted_scaled_int import ShiftedUint8ActPerTensorFloat

    weight = Int8WeightPerChannelFloat.let(bit_width=weight_bits, narrow_range=True)
    act = ShiftedUint8ActPerTensorFloat.let(
        bit_width=act_bits,
        scaling_stats_op=StatsOp.MIN_MAX,
        zero_point_stats_impl=NegativeMinOrZero,
    )
    kwargs = {
        "input_quant": act,
        "weight_quant": weight,
        "bias_quant": Int32Bias,
        "return_quant_tensor": False,
    }
    return {
        nn.Conv1d: (qnn.QuantConv1d, kwargs),
        nn.Conv2d: (qnn.QuantConv2d, kwargs),
        nn.Linear: (qnn.QuantLinear, kwargs),
    }


def _deploy_graph(model: nn.Module) -> torch.fx.GraphModule:
    """A private fp32 torch.fx graph of ``model`` with BatchNorm folded.

    Brevitas's own tracer (``brevitas.fx``, a backport of an old torch.fx) does not honour
    ``torch.fx.wrap`` (quantcal's models wrap their input check) and its ``MergeBatchNorm``
    matches only its own fx nodes, so the graph comes from ``models.to_deploy`` (unless the model
    is a GraphModule already, e.g. a deploy form) and Brevitas's preprocessing runs on it with
    ``trace_model=False``."""
    if isinstance(model, torch.fx.GraphModule):
        return copy.deepcopy(model).eval()
    from quantcal.models import to_deploy

    return to_deploy(model)


def _batches(x: torch.Tensor, size: int | None) -> list[torch.Tensor]:
    return [x] if size is None else list(torch.split(x, size))


def _calibrate(qmodel: nn.Module, calib: list[torch.Tensor]) -> None:
    from brevitas.graph.calibrate import calibration_mode

    with torch.no_grad(), calibration_mode(qmodel):
        for x in calib:
            qmodel(x)
    qmodel.eval()


def _bias_correct(qmodel: nn.Module, calib: list[torch.Tensor]) -> None:
    from brevitas.graph.calibrate import bias_correction_mode

    with torch.no_grad(), bias_correction_mode(qmodel):
        for x in calib:
            qmodel(x)
    qmodel.eval()


def _adaround(qmodel: nn.Module, calib: torch.Tensor, iters: int) -> None:
    """Brevitas's learned rounding, layer by layer, as its ImageNet PTQ example sets it up."""
    from brevitas_examples.common.learned_round.learned_round_args import (
        HandlerSpec,
        LossArgs,
        OptimizerArgs,
        TrainerConfig,
        TrainingArgs,
    )
    from brevitas_examples.common.learned_round.learned_round_method import LearnedRoundArgs
    from brevitas_examples.common.learned_round.learned_round_trainer import (
        LearnedRoundTrainer,
        get_blocks,
    )
    from brevitas_examples.imagenet_classification.ptq.learned_round_utils import (
        CacheVision,
        is_layer,
        vision_block_forward,
        vision_forward,
    )

    b_start, b_end = ADAROUND["beta"]
    config = TrainerConfig(
        training_args=TrainingArgs(
            optimizers_args=[
                OptimizerArgs(
                    target_params="learned_round",
                    optimizer_cls="Adam",
                    lr=ADAROUND["lr"],
                    optimizer_kwargs={},
                )
            ],
            batch_size=ADAROUND["batch_size"],
            iters=iters,
            losses_args=[
                # the regulariser's schedule is over max_count steps (default 1000): set to iters
                LossArgs(
                    cls="round_reg",
                    kwargs={
                        "weight": ADAROUND["reg_weight"],
                        "max_count": iters,
                        "b_range": (b_start, b_end),
                        "warmup": ADAROUND["warmup"],
                    },
                ),
                LossArgs(cls="mse", kwargs={"reduction": "none", "dim": 1}),
            ],
            use_best_model=False,
            use_amp=False,  # the example's float16 autocast is for GPUs
        ),
        training_handlers=[
            HandlerSpec(
                name="learned_round",
                config=LearnedRoundArgs(
                    learned_round_param="hard_sigmoid", learned_round_kwargs={}
                ),
            )
        ],
    )
    dataset = torch.utils.data.TensorDataset(calib, torch.zeros(len(calib), dtype=torch.long))
    loader = torch.utils.data.DataLoader(dataset, batch_size=256)
    LearnedRoundTrainer(config=config).train(
        model=qmodel,
        model_forward=vision_forward,
        block_forward=vision_block_forward,
        data_loader=loader,
        cache=CacheVision(),
        get_blocks_fn=lambda m: get_blocks(m, block_check_fn=is_layer),
        keep_gpu=True,
    )
    qmodel.eval()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)``, in eval mode."""
    model.eval()
    correct = 0
    # Brevitas warns that it cannot track the zero point of a layer's output (metadata only)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for xb, yb in zip(torch.split(x, batch_size), torch.split(y, batch_size)):
            correct += int((model(xb).argmax(1) == yb).sum())
    return correct / len(y)


def _import_brevitas() -> None:
    """Import the Brevitas modules the pipelines use (quietly)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. "fast_hadamard_transform package not found"
        try:
            import brevitas.graph.calibrate
            import brevitas.graph.equalize
            import brevitas.graph.quantize  # noqa: F401
            import brevitas_examples.imagenet_classification.ptq.learned_round_utils  # noqa: F401
        except ImportError as exc:
            raise ImportError(
                "run_brevitas needs Brevitas: run it in an environment with brevitas==0.13.4 "
                "and accelerate installed (see this file's docstring)"
            ) from exc


def quantize_brevitas(
    method: str,
    model: nn.Module,
    calib: torch.Tensor,
    weight_bits: int,
    act_bits: int,
    iters: int,
    *,
    cle_iterations: int = 20,
    cle_merge_bias: bool = False,
    calib_batch_size: int | None = None,
    seed: int = 0,
    verbose: bool = False,
) -> tuple[nn.Module, str]:
    """Brevitas-quantized copy of ``model`` by pipeline ``method`` (see the module docstring)
    and a notes string. ``calib``: the range-calibration images (B, C, H, W).

    ``cle_merge_bias``: let the biases weigh in the equalization scales (Brevitas's example
    default, with its "vaiq" shrinkage) instead of Nagel's weight ranges alone.
    ``calib_batch_size``: None runs the calibration images as one batch. Brevitas averages the
    per-batch min / max over batches, so only one batch gives the global min-max range.
    ``iters``: AdaRound steps per layer (unused by ``ptq`` and ``cle_bc``)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; one of {', '.join(METHODS)}")
    out = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    err = contextlib.nullcontext() if verbose else contextlib.redirect_stderr(io.StringIO())
    with warnings.catch_warnings(), out, err, torch.random.fork_rng():
        warnings.simplefilter("ignore")  # e.g. "fast_hadamard_transform package not found"
        _import_brevitas()
        import brevitas
        from brevitas.graph.equalize import EqualizeGraph
        from brevitas.graph.quantize import layerwise_quantize, preprocess_for_quantize

        notes = [f"brevitas {brevitas.__version__}"]
        torch.manual_seed(seed)
        gm = _deploy_graph(model)
        gm = preprocess_for_quantize(
            gm, trace_model=False, relu6_to_relu=False, equalize_iters=0, merge_bn=True
        )
        if method == "cle_bc":
            gm, regions = EqualizeGraph(
                iterations=cle_iterations, merge_bias=cle_merge_bias, return_regions=True
            ).apply(gm)
            notes.append(
                f"CLE on {len(regions)} regions ({cle_iterations} it, merge_bias={cle_merge_bias})"
            )
        qmodel = layerwise_quantize(gm, compute_layer_map=_quantizers(weight_bits, act_bits))
        qmodel.eval()
        calib_list = _batches(calib, calib_batch_size)
        _calibrate(qmodel, calib_list)
        if method == "cle_bc":
            _bias_correct(qmodel, calib_list)
            notes.append("empirical bias correction")
        if method == "adaround":
            _adaround(qmodel, calib, iters)
            notes.append(f"AdaRound {iters} it/layer, batch {ADAROUND['batch_size']}")
    return qmodel, "; ".join(notes)


def run_brevitas(
    method: str,
    model: torch.nn.Module,
    calib: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    weight_bits: int,
    act_bits: int,
    iters: int,
    **options: Any,
) -> dict:
    """Quantize ``model`` with Brevitas pipeline ``method`` ("ptq", "cle_bc", "adaround") at
    W``weight_bits``A``act_bits`` on ``calib``, then measure top-1 on ``(test_x, test_y)``.

    Returns ``{"accuracy": float, "seconds": float, "notes": str}``; ``seconds`` is the wall
    time of the whole Brevitas procedure (deploy copy, preprocessing, quantizer insertion,
    calibration and the method), not the test evaluation. ``options`` go to
    :func:`quantize_brevitas`."""
    _import_brevitas()  # a first import (seconds) is not the method's time
    t0 = time.perf_counter()
    qmodel, notes = quantize_brevitas(method, model, calib, weight_bits, act_bits, iters, **options)
    seconds = time.perf_counter() - t0
    return {"accuracy": accuracy(qmodel, test_x, test_y), "seconds": seconds, "notes": notes}


# ---------------------------------------------------------------------------------- self-test


def _split_tensors(split: Any) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*split.batches(1024))
    return torch.cat(xs), torch.cat(ys)


def _quantcal_ptq(model: nn.Module, calib: torch.Tensor, x, y, w: int, a: int) -> str:
    """quantcal's own min-max PTQ on the same inputs, as a check of the scheme (or why not)."""
    try:
        from quantcal import quant

        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qmodel = quant.quantize(model, quant.parse_precision(f"W{w}A{a}"), [calib])
        seconds = time.perf_counter() - t0
        return f"{100 * accuracy(qmodel, x, y):6.1f} {seconds:8.1f}"
    except Exception as exc:  # the developer's quant.methods may be mid-change
        return f"  (quantcal ptq failed: {type(exc).__name__}: {exc})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the 5-minute self-test")
    parser.add_argument("--arch", default="shufflenetv2")
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--precisions", nargs="+", default=["W4A8", "W4A4"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--iters", type=int, default=1000, help="AdaRound steps per layer")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--calib", type=int, default=100, help="range-calibration images")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--cle-merge-bias", action="store_true", help="biases weigh in the CLE scales"
    )
    parser.add_argument("--verbose", action="store_true", help="Brevitas's own output")
    args = parser.parse_args()
    if args.quick:
        args.arch, args.width, args.precisions, args.iters, args.epochs = (
            "shufflenetv2",
            0.25,
            ["W4A8"],
            200,
            10,
        )
    torch.set_num_threads(args.threads)

    import brevitas

    from quantcal import models
    from quantcal.training import data
    from quantcal.training.train import TrainConfig, train

    splits = data.load_dataset("digits", ptq_calib_size=args.calib)
    model = models.create_model(
        args.arch,
        num_classes=splits.num_classes,
        image_size=splits.image_size,
        in_chans=splits.channels,
        width=args.width,
        seed=0,
    )
    t0 = time.perf_counter()
    config = TrainConfig(
        epochs=args.epochs,
        batch_size=64,
        lr=0.05,
        weight_decay=5e-4,
        schedule="cosine",
        augment=False,
        seed=0,
    )
    train(model, splits, config, device="cpu", progress=False)
    model.eval()
    print(f"trained {args.arch}@{args.width} on digits: {time.perf_counter() - t0:.1f} s")
    calib, _ = _split_tensors(splits.ptq_calib)
    test_x, test_y = _split_tensors(splits.test)
    print(
        f"brevitas {brevitas.__version__}, torch {torch.__version__}, threads "
        f"{torch.get_num_threads()}; {len(calib)} calibration / {len(test_y)} test images; "
        f"fp32 accuracy {100 * accuracy(model, test_x, test_y):.1f} %"
    )
    print(f"{'prec':6} {'method':12} {'acc%':>6} {'seconds':>8}  notes")
    for precision in args.precisions:
        w, a = (int(v) for v in precision.upper().lstrip("W").split("A"))
        reference = _quantcal_ptq(model, calib, test_x, test_y, w, a)
        print(f"{precision:6} {'quantcal:ptq':12} {reference}")
        for method in args.methods:
            r = run_brevitas(
                method,
                model,
                calib,
                test_x,
                test_y,
                w,
                a,
                args.iters,
                cle_merge_bias=args.cle_merge_bias,
                verbose=args.verbose,
            )
            print(
                f"{precision:6} {method:12} {100 * r['accuracy']:6.1f} {r['seconds']:8.1f}  "
                f"{r['notes']}"
            )


if __name__ == "__main__":
    main()
