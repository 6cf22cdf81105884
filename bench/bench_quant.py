"""Benchmark: quantcal's simulated W8A8 evaluation vs the fp32 deploy model and vs torch.ao FX.

One CPU run, same process, same inputs: ShuffleNetV2 (width 0.5, 32x32, 100 classes, randomly
initialised with randomised BN statistics) on random normal images (no trained checkpoint or
data needed). Prints the median time per batch of each path and the median of the per-round ratios:

* quantcal W8A8 / fp32 deploy   (target <= 1.5x)
* torch.ao FX fake-quant / quantcal W8A8   (target >= 1.5x): ``prepare_fx`` with the equivalent
  QConfig (per-channel symmetric int8 weights [-127, 127], per-tensor affine uint8 activations,
  min-max observers), calibrated on the same range-calibration batches, evaluated as the
  fake-quant model without ``convert``;
* top-1 agreement of each quantized model with the fp32 deploy model's top-1 on the inputs.

Run: ``.venv/bin/python bench/bench_quant.py [--batch 256] [--repeats 15] [--threads 1]``
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from torch import nn

from quantcal import models, quant
from quantcal.models.deploy import to_deploy


def _round_times(fns: list, x: torch.Tensor, repeats: int) -> list[list[float]]:
    """Seconds per call of each fn in each round; the fns run round-robin within a round so
    that a change in machine load affects all of them alike, and ratios are taken per round."""
    times: list[list[float]] = [[] for _ in fns]
    with torch.inference_mode():
        for fn in fns:
            fn(x)  # warm-up
        for _ in range(repeats):
            for fn, ts in zip(fns, times):
                t0 = time.perf_counter()
                fn(x)
                ts.append(time.perf_counter() - t0)
    return times


def _median_ratio(num: list[float], den: list[float]) -> tuple[float, float, float]:
    """Median and quartiles of the per-round ratios ``num / den``."""
    ratios = sorted(a / b for a, b in zip(num, den))
    q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
    return statistics.median(ratios), q1, q3


def _randomise_bn(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


def _torch_ao_fake_quant(deploy: nn.Module, calib: list[torch.Tensor]) -> nn.Module:
    from torch.ao.quantization import (
        FakeQuantize,
        MovingAverageMinMaxObserver,
        MovingAveragePerChannelMinMaxObserver,
        QConfig,
        QConfigMapping,
        disable_fake_quant,
        disable_observer,
        enable_fake_quant,
        enable_observer,
    )
    from torch.ao.quantization.quantize_fx import prepare_fx

    # averaging_constant=1 makes the "moving average" observers plain running min/max
    act = FakeQuantize.with_args(
        observer=MovingAverageMinMaxObserver,
        averaging_constant=1.0,
        quant_min=0,
        quant_max=255,
        dtype=torch.quint8,
        qscheme=torch.per_tensor_affine,
    )
    weight = FakeQuantize.with_args(
        observer=MovingAveragePerChannelMinMaxObserver,
        averaging_constant=1.0,
        quant_min=-127,
        quant_max=127,
        dtype=torch.qint8,
        qscheme=torch.per_channel_symmetric,
        ch_axis=0,
    )
    mapping = QConfigMapping().set_global(QConfig(activation=act, weight=weight))
    prepared = prepare_fx(deploy, mapping, example_inputs=(calib[0],))
    prepared.apply(disable_fake_quant)
    prepared.apply(enable_observer)
    with torch.no_grad():
        for x in calib:
            prepared(x)
    prepared.apply(disable_observer)
    prepared.apply(enable_fake_quant)
    return prepared.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--width", type=float, default=0.5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = models.create_model("shufflenetv2", num_classes=100, width=args.width, seed=0)
    _randomise_bn(model)
    model.eval()
    calib = [torch.randn(256, 3, 32, 32) for _ in range(2)]
    x = torch.randn(args.batch, 3, 32, 32)

    deploy = to_deploy(model)
    qmodel = quant.quantize(model, "W8A8", calib)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ao = _torch_ao_fake_quant(to_deploy(model), calib)

    rounds = _round_times([deploy, qmodel, ao], x, args.repeats)
    t_fp32, t_q, t_ao = (statistics.median(ts) for ts in rounds)
    r_q = _median_ratio(rounds[1], rounds[0])
    r_ao = _median_ratio(rounds[2], rounds[1])
    with torch.inference_mode():
        top_fp32 = deploy(x).argmax(1)
        agree_q = 100 * float((qmodel(x).argmax(1) == top_fp32).float().mean())
        agree_ao = 100 * float((ao(x).argmax(1) == top_fp32).float().mean())

    print(f"ShuffleNetV2 width {args.width}, 32x32, 100 classes, random init + random BN stats,")
    print(
        f"random N(0,1) inputs, batch {args.batch}, {args.threads} threads, "
        f"median of {args.repeats} runs, torch {torch.__version__}"
    )
    print(f"fp32 deploy          {1e3 * t_fp32:8.1f} ms/batch")
    print(
        f"quantcal W8A8 (sim)  {1e3 * t_q:8.1f} ms/batch   quantcal / fp32 deploy: "
        f"{r_q[0]:.2f}x [quartiles {r_q[1]:.2f}, {r_q[2]:.2f}] (target <= 1.5x)"
    )
    print(
        f"torch.ao FX fakequant{1e3 * t_ao:8.1f} ms/batch   torch.ao / quantcal: "
        f"{r_ao[0]:.2f}x [quartiles {r_ao[1]:.2f}, {r_ao[2]:.2f}] (target >= 1.5x)"
    )
    print("(ratios: median over rounds of the per-round ratio; times: median per path)")
    print(
        f"top-1 agreement with fp32: quantcal {agree_q:.1f} %, torch.ao {agree_ao:.1f} % "
        f"(difference {abs(agree_q - agree_ao):.1f} points)"
    )


if __name__ == "__main__":
    main()
