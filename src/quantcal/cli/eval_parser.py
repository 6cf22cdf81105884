"""The ``quantcal eval`` command line: its options, help text and defaults (the command itself
is :mod:`quantcal.cli.eval`)."""

from __future__ import annotations

import argparse
from typing import Any

from quantcal.cli._common import EXIT_STUDY, add_common, add_force

__all__ = ["DEFAULT_PRECISIONS", "DEFAULT_RECAL", "DEFAULT_RECAL_GIVEN", "add_parser"]

DEFAULT_PRECISIONS = "fp32,W8A8,W4A8,W4A4"
DEFAULT_RECAL = "none,temperature,temperature_fp32"
DEFAULT_RECAL_GIVEN = "none,temperature"


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "eval",
        help="quantize and evaluate your own checkpoint, or score an ONNX model or logits",
        description="Bring your own trained model: quantize it at each precision, recalibrate "
        "and measure, exactly as `run` does, and write the same results and report. Or score, "
        "as given, an ONNX model (an int8 one included) or logits computed anywhere. Options "
        "that do not apply to the chosen source are refused (exit 2), never ignored.",
        epilog="examples:\n  quantcal eval --checkpoint model.pt --model shufflenetv2 --width 0.5 "
        "--dataset cifar100\n  quantcal eval --checkpoint net.pt --model mypkg.nets:build "
        "--dataset npz:data.npz --precisions fp32,W8A8,W6A6\n  quantcal eval --checkpoint "
        "net.pt --model nets/mine.py:build --dataset digits --mean 0 --std 1\n  quantcal eval "
        "--onnx model_int8.onnx --dataset cifar100 --mean 0.507,0.487,0.441 --std "
        "0.267,0.256,0.276\n  quantcal eval --logits val.npz test.npz --recal "
        "none,temperature,isotonic\n  quantcal eval --logits fp32_val.npz fp32_test.npz "
        "--quantized int8 int8_val.npz int8_test.npz\n\nwhat applies to which source:\n"
        "  --checkpoint  --model --width --dataset --mean/--std or --transform --precisions\n"
        "                --observers --methods --plans --attribution --shifts --ood --device\n"
        "  --onnx        --dataset --mean/--std or --transform\n"
        "  --logits      --quantized (fp32 logits as the reference: verdicts from logits alone)\n"
        "  all three     --recal --recal-fit --seed --out --force --quiet --threads --set\n"
        "                (--set with --onnx/--logits: metrics.* and report.* keys only)\n\n"
        "OUT must be new, empty or an earlier eval of the same source (--force replaces "
        "another).\n\n" + EXIT_STUDY,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="state dict saved with torch.save (with --model)")
    source.add_argument(
        "--onnx",
        metavar="MODEL.onnx",
        help="an ONNX image classifier (fp32, or int8 QDQ/QOperator as onnxruntime's "
        "quantize_static writes it), run by onnxruntime on --dataset; scored as given",
    )
    source.add_argument(
        "--logits",
        nargs=2,
        metavar=("VAL.npz", "TEST.npz"),
        help="logits computed anywhere: two npz files with arrays 'logits' (N, C) and 'labels' "
        "(N,), the first for recalibration, the second for measurement; no model, no dataset. "
        "With --quantized they are the fp32 model's, the reference",
    )
    p.add_argument(
        "--quantized",
        nargs=3,
        action="append",
        default=None,
        metavar=("NAME", "VAL.npz", "TEST.npz"),
        help="with --logits: a quantized model's logits on the same val and test images "
        "(repeatable; NAME, e.g. W8A8 or int8, is its precision column). Each gets the paired "
        "differences vs the fp32 --logits, a verdict and the why-section",
    )
    p.add_argument(
        "--model",
        default=None,
        help="registry name, module:factory (the module on PYTHONPATH or in the current folder) "
        "or path/to/file.py:factory; the factory is called with whichever of num_classes, "
        "image_size, in_chans, width it accepts, and may declare its input normalisation as "
        "factory.mean and factory.std",
    )
    p.add_argument(
        "--mean",
        default=None,
        help="the model's input normalisation: per-channel means on the [0, 1] pixel scale, "
        "comma-separated (as timm gives them), with --std; '--mean 0 --std 1' feeds x / 255. "
        "Default: what the factory declares, else the dataset's statistics",
    )
    p.add_argument("--std", default=None, help="per-channel standard deviations, with --mean")
    p.add_argument(
        "--transform",
        metavar="MODULE:FUNCTION",
        default=None,
        help="the model's own preprocessing instead of --mean/--std: a function (found as "
        "--model's factory is) called with each uint8 batch (B, C, H, W) that returns the "
        "model's float input batch (resize, scale, normalise); a factory may declare it as "
        "factory.transform",
    )
    p.add_argument("--width", type=float, default=None, help="width multiplier (default 1)")
    p.add_argument("--dataset", default=None, help="required with --checkpoint and --onnx")
    p.add_argument("--precisions", default=None, help=f"default {DEFAULT_PRECISIONS}")
    p.add_argument(
        "--observers", default=None, help="comma-separated range estimators (default minmax)"
    )
    p.add_argument(
        "--methods",
        default=None,
        help="comma-separated quantization methods (default ptq; cle_bc, adaround, qat; qat "
        "fine-tunes on the dataset's training split with the default recipe)",
    )
    p.add_argument(
        "--recal",
        default=None,
        help=f"comma-separated recalibration methods (default {DEFAULT_RECAL}; with --onnx "
        f"or --logits {DEFAULT_RECAL_GIVEN}, since there is no fp32 model whose temperature "
        "temperature_fp32 would reuse)",
    )
    p.add_argument(
        "--recal-fit",
        default=None,
        choices=("auto", "val", "test_crossfit"),
        help="where recalibrators are fitted: val; test_crossfit (two stratified halves of the "
        "test split, each recalibrated by a fit on the other); auto (default): val when the "
        "dataset has its own val split, else test_crossfit, since a checkpoint trained "
        "elsewhere has probably seen a val held out of the train split (with --logits: val)",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the data split, halves and bootstrap"
    )
    p.add_argument(
        "--plans",
        action="store_true",
        help="also search mixed-precision plans (plan:calib, plan:accuracy; see `quantcal "
        "plan`) on val and measure them on test beside the uniform precisions",
    )
    p.add_argument(
        "--attribution",
        nargs="?",
        const="layer",
        choices=["layer", "block"],
        default=None,
        help="also attribute the calibration loss of each quantized precision to layers (or "
        "blocks): each alone quantized, and each alone kept in fp32, measured on val images "
        "(cost: 2 x layers partial passes over --attribution-samples images)",
    )
    p.add_argument(
        "--attribution-samples",
        type=int,
        default=None,
        metavar="N",
        help="validation images the attribution uses (default 1000; with --attribution)",
    )
    p.add_argument(
        "--shifts",
        default=None,
        metavar="SPECS",
        help="also score each cell on corrupted copies of test (comma-separated "
        "'name:severity', a name alone for severities 1-5, 'all' or 'all:3'; the 15 common "
        "corruptions of Hendrycks & Dietterich 2019, e.g. gaussian_noise:3,jpeg:5); "
        "recalibrators stay fitted on clean images; rows get a shift column",
    )
    p.add_argument(
        "--ood",
        default=None,
        metavar="SETS",
        help="also score how well confidence tells test images from unknown ones "
        "(comma-separated: gaussian_noise, uniform_noise, blurred, pixel_shuffled, or "
        "npz:PATH with uint8 images of the dataset's size under 'images'); writes ood.csv",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other study key (value parsed as TOML), e.g. "
        "quant.method_options.adaround.iterations=200, quant.method_options.qat.epochs=2, "
        "train.lr=0.01 (the QAT recipe), data.ptq_calib_size=500, quant.ptq_calib_samples=3, "
        "quant.first_last_8bit=true, quant.plans.max_accuracy_drop=0.02, report.max_ece_rise=0.02,"
        " metrics.bootstrap=200. With --onnx or --logits only metrics.* and report.* apply. A "
        "key that an eval option sets (--precisions, --dataset, ...) is refused: use the option",
    )
    p.add_argument("--out", default="runs/eval")
    add_force(p)
    add_common(p)
