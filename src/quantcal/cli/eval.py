"""``quantcal eval``: bring your own model (a checkpoint, an ONNX file) or its logits.

Three sources, each with the options that apply to it (any other option is refused, exit 2):

* ``--checkpoint`` (with ``--model``, ``--dataset``): quantized and measured as a study cell;
* ``--onnx`` (with ``--dataset``): run as given by onnxruntime and scored, nothing quantized;
* ``--logits VAL TEST``: scored as given; no model, no dataset.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantcal.cli._common import (
    Common,
    absolute_factory,
    common,
    finish,
    refuse,
    split_list,
)
from quantcal.cli.eval_parser import (
    DEFAULT_PRECISIONS,
    DEFAULT_RECAL,
    DEFAULT_RECAL_GIVEN,
)


@dataclass(frozen=True)
class StudyEvalRequest:
    """``eval --checkpoint``: a one-model study."""

    config: Any  # studyconfig.StudyConfig
    out: Path
    force: bool
    identity: dict
    common: Common


@dataclass(frozen=True)
class GivenEvalRequest:
    """``eval --onnx`` / ``eval --logits``: predictions scored as given."""

    onnx: Path | None
    logits: tuple[Path, Path] | None
    quantized: tuple[tuple[str, Path, Path], ...]
    dataset: str | None
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    transform: str | None
    recal: tuple[str, ...]
    recal_fit: str
    seed: int
    out: Path
    force: bool
    identity: dict
    common: Common
    metrics: dict = field(default_factory=dict)
    budget: dict = field(default_factory=dict)


def _normalisation(args: argparse.Namespace) -> tuple[Any, Any]:
    from quantcal._inputs import parse_float_list

    if (args.mean is None) != (args.std is None):
        raise ValueError("--mean and --std go together: give both or neither")
    if args.transform is not None and args.mean is not None:
        raise ValueError("--transform replaces --mean/--std: give one or the other")
    if args.mean is None:
        return None, None
    mean = tuple(parse_float_list(args.mean, "--mean"))
    std = tuple(parse_float_list(args.std, "--std"))
    if any(s <= 0 for s in std):
        raise ValueError(f"--std must be > 0, got {args.std!r}")
    return mean, std


def _recal(args: argparse.Namespace, default: str) -> tuple[str, ...]:
    from quantcal._registry import unknown_name_message
    from quantcal.calibration import recal
    from quantcal.study.config import REUSE_FP32_TEMPERATURE

    names = split_list(args.recal if args.recal is not None else default)
    if not names:
        raise ValueError("--recal needs at least one recalibration method, e.g. none,temperature")
    known = [*recal.available(), REUSE_FP32_TEMPERATURE]
    for n in names:
        if n not in known:
            raise ValueError("--recal: " + unknown_name_message("recalibrator", n, known))
    if len(set(names)) != len(names):
        raise ValueError(f"--recal lists a method twice: {args.recal!r}")
    return tuple(names)


#: Study keys that an eval option sets (a --set of one of them is refused, naming the option).
_KEYS_OF_OPTIONS = {
    "name": "(eval names its study)",
    "seeds": "--seed",
    "model": "--model, --width and --checkpoint",
    "data.datasets": "--dataset",
    "data.mean": "--mean",
    "data.std": "--std",
    "data.transform": "--transform",
    "quant.precisions": "--precisions",
    "quant.observers": "--observers",
    "quant.methods": "--methods",
    "quant.plans": "--plans (or quant.plans.KEY=VALUE)",
    "quant.attribution": "--attribution (or quant.attribution.KEY=VALUE)",
    "recal.methods": "--recal",
    "recal.fit_on": "--recal-fit",
    "data.shifts": "--shifts",
    "data.ood": "--ood",
    "threads": "--threads",
}


def _overrides(args: argparse.Namespace, given: bool) -> dict[str, Any]:
    """``--set`` as dotted study keys; keys an eval option owns, and for --onnx/--logits any
    key but metrics.* and report.*, refused."""
    from quantcal.cli._common import parse_set

    out = parse_set(args.set)
    for key in out:
        if key in _KEYS_OF_OPTIONS:
            raise ValueError(f"--set {key}=...: {key} is set by {_KEYS_OF_OPTIONS[key]}")
        if given and not key.startswith(("metrics.", "report.")):
            raise ValueError(
                f"--set {key}=... does not apply here: {'--onnx' if args.onnx else '--logits'} "
                "scores predictions as given, so only metrics.* and report.* keys apply"
            )
    return out


def _metrics_and_budget(overrides: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The metrics settings (n_bins, bootstrap, level) and the [report] budget of ``--set``
    for --onnx/--logits, checked by the study loader itself (so the messages name the keys)."""
    from quantcal.study import runner as study
    from quantcal.study.config import apply_overrides

    # A stand-in model: only the metrics and report keys of this study are read.
    stub = {"name": "eval", "model": [{"arch": "resnet20", "width": 1.0}]}
    raw = apply_overrides(stub, overrides)
    cfg = study.load_study(raw)
    metrics = {"n_bins": cfg.n_bins, "bootstrap": cfg.bootstrap, "level": cfg.level}
    report = {k: v for k, v in (raw.get("report") or {}).items()}
    return metrics, report


def resolve(args: argparse.Namespace) -> StudyEvalRequest | GivenEvalRequest:
    from quantcal._inputs import check_number

    check_number(args.seed, "--seed", integer=True, minimum=0)
    if args.onnx or args.logits:
        return _resolve_given(args)
    return _resolve_checkpoint(args)


def _quantized(args: argparse.Namespace) -> tuple[tuple[str, Path, Path], ...]:
    from quantcal._inputs import check_input_file

    out: list[tuple[str, Path, Path]] = []
    for name, val, test in args.quantized or ():
        if not name.strip() or name.lower() == "fp32" or name in [n for n, _, _ in out]:
            raise ValueError(
                f"--quantized NAME must be a new name other than fp32 (e.g. W8A8), got {name!r}"
            )
        val_path = check_input_file(val, f"--quantized {name} (VAL.npz)")
        test_path = check_input_file(test, f"--quantized {name} (TEST.npz)")
        out.append((name, val_path, test_path))
    return tuple(out)


def _resolve_given(args: argparse.Namespace) -> GivenEvalRequest:
    from quantcal._inputs import check_input_file
    from quantcal.study.config import REUSE_FP32_TEMPERATURE
    from quantcal.training.data import check_dataset_name

    what = "--onnx" if args.onnx else "--logits"
    refuse(
        {"--quantized": bool(args.quantized) and not args.logits},
        "it gives a quantized model's logits beside the fp32 --logits reference",
    )
    quantized = _quantized(args) if args.logits else ()
    metrics, budget = _metrics_and_budget(_overrides(args, given=True))
    refuse(
        {
            "--model": args.model is not None,
            "--width": args.width is not None,
            "--precisions": args.precisions is not None,
            "--observers": args.observers is not None,
            "--methods": args.methods is not None,
        },
        f"{what} scores a model as given; nothing is quantized (quantize a checkpoint with "
        "--checkpoint, or export each precision to ONNX and score each)",
    )
    refuse(
        {"--shifts": args.shifts is not None, "--ood": args.ood is not None},
        f"{what} scores predictions already made on test; corrupted or unknown images need "
        "the model itself (give --model and --checkpoint)",
    )
    refuse(
        {
            "--plans": bool(args.plans),
            "--attribution": args.attribution is not None,
            "--attribution-samples": args.attribution_samples is not None,
        },
        f"{'--plans' if args.plans else '--attribution'} quantizes the model itself: it needs "
        "--checkpoint",
    )
    refuse(
        {"--device": args.device not in (None, "auto", "cpu")},
        f"{what} runs on the CPU ({'onnxruntime' if args.onnx else 'no model is run'})",
    )
    recal = _recal(args, DEFAULT_RECAL if quantized else DEFAULT_RECAL_GIVEN)
    if REUSE_FP32_TEMPERATURE in recal and not quantized:
        raise ValueError(
            f"--recal {REUSE_FP32_TEMPERATURE} reuses the temperature of the fp32 model of the "
            f"same checkpoint; {what} scores one set of predictions with no fp32 reference. "
            "Use temperature (fitted on these predictions), give quantized logits with "
            "--quantized beside the fp32 --logits, or --checkpoint"
        )
    shared: dict[str, Any] = {
        "recal": recal,
        "seed": args.seed,
        "out": Path(args.out),
        "force": bool(args.force),
        "common": common(args),
        "metrics": metrics,
        "budget": budget,
    }
    if args.logits:
        refuse(
            {
                "--dataset": args.dataset is not None,
                "--mean": args.mean is not None,
                "--std": args.std is not None,
                "--transform": args.transform is not None,
            },
            "--logits are scored as given: no images are read or fed to a model",
        )
        val = check_input_file(args.logits[0], "--logits (VAL.npz)")
        test = check_input_file(args.logits[1], "--logits (TEST.npz)")
        fit = "val" if args.recal_fit in (None, "auto") else args.recal_fit
        identity: dict[str, Any] = {
            "command": "eval",
            "logits": [str(val.resolve()), str(test.resolve())],
        }
        if quantized:
            identity["quantized"] = [
                [n, str(v.resolve()), str(t.resolve())] for n, v, t in quantized
            ]
        return GivenEvalRequest(
            onnx=None,
            logits=(val, test),
            quantized=quantized,
            dataset=None,
            mean=None,
            std=None,
            transform=None,
            recal_fit=fit,
            identity=identity,
            **shared,
        )
    if args.dataset is None:
        raise ValueError("--onnx needs --dataset (the images to run the model on)")
    check_dataset_name(args.dataset, "--dataset")
    onnx = check_input_file(args.onnx, "--onnx")
    mean, std = _normalisation(args)
    identity = {"command": "eval", "onnx": str(onnx.resolve())}
    return GivenEvalRequest(
        onnx=onnx,
        logits=None,
        quantized=(),
        dataset=args.dataset,
        mean=mean,
        std=std,
        transform=absolute_factory(args.transform) if args.transform else None,
        recal_fit=args.recal_fit or "auto",
        identity=identity,
        **shared,
    )


def _resolve_checkpoint(args: argparse.Namespace) -> StudyEvalRequest:
    from quantcal._inputs import check_input_file, check_number
    from quantcal.study import runner as study
    from quantcal.study.config import apply_overrides

    if args.model is None or args.dataset is None:
        raise ValueError("--checkpoint needs --model (the code that builds it) and --dataset")
    refuse(
        {"--quantized": bool(args.quantized)},
        "it gives a quantized model's logits beside fp32 --logits; --checkpoint quantizes the "
        "model itself",
    )
    refuse(
        {
            "--attribution-samples": args.attribution_samples is not None
            and args.attribution is None
        },
        "it sets the images of --attribution, which was not given",
    )
    checkpoint = check_input_file(args.checkpoint, "--checkpoint")
    mean, std = _normalisation(args)
    precisions = split_list(args.precisions or DEFAULT_PRECISIONS)
    if "fp32" not in [p.lower() for p in precisions]:
        precisions = ["fp32", *precisions]
    arch = absolute_factory(args.model)
    raw: dict[str, Any] = {
        "name": "eval",
        "seeds": [args.seed],
        "data": {"datasets": [args.dataset]},
        "model": [
            {
                "arch": arch,
                "width": 1.0 if args.width is None else args.width,
                "checkpoint": str(checkpoint.resolve()),
            }
        ],
        "quant": {
            "precisions": precisions,
            "observers": split_list(args.observers or "minmax"),
            "methods": split_list(args.methods or "ptq"),
        },
        "recal": {
            "methods": list(_recal(args, DEFAULT_RECAL)),
            "fit_on": args.recal_fit or "auto",
        },
    }
    if args.plans:
        raw["quant"]["plans"] = {}
    if args.attribution is not None:
        samples = 1000 if args.attribution_samples is None else args.attribution_samples
        check_number(samples, "--attribution-samples", integer=True, minimum=1)
        raw["quant"]["attribution"] = {"granularity": args.attribution, "samples": samples}
    if args.threads is not None:
        raw["threads"] = args.threads
    if args.transform is not None:
        raw["data"]["transform"] = absolute_factory(args.transform)
    if mean is not None:
        raw["data"]["mean"], raw["data"]["std"] = list(mean), list(std)
    if args.shifts is not None:
        raw["data"]["shifts"] = split_list(args.shifts)
    if args.ood is not None:
        raw["data"]["ood"] = [
            f"npz:{Path(s[4:]).resolve()}" if s.lower().startswith("npz:") else s
            for s in split_list(args.ood)
        ]
    config = study.load_study(apply_overrides(raw, _overrides(args, given=False)))
    identity = {
        "command": "eval",
        "checkpoint": str(checkpoint.resolve()),
        "model": f"{arch}@{raw['model'][0]['width']:g}",
    }
    return StudyEvalRequest(config, Path(args.out), bool(args.force), identity, common(args))


def execute(req: StudyEvalRequest | GivenEvalRequest) -> int:
    from quantcal.study import runner as study

    t0 = time.perf_counter()
    if isinstance(req, GivenEvalRequest):
        _execute_given(req)
    else:
        study.run_study(
            req.config,
            req.out,
            device=req.common.device,
            quiet=req.common.quiet,
            force=req.force,
            identity=req.identity,
        )
    return finish(req.out, t0, req.common.quiet)


def _execute_given(req: GivenEvalRequest) -> None:
    """Score ``--onnx`` or ``--logits`` predictions into ``req.out``."""
    from quantcal.store import runfolder as _runfolder
    from quantcal.study import evaluate
    from quantcal.training import data

    _runfolder.check(req.out, force=req.force, identity=req.identity)
    notes: list[str] = []
    quantized = {
        name: (evaluate.load_logits_npz(v), evaluate.load_logits_npz(t))
        for name, v, t in req.quantized
    }
    if req.logits is not None:
        val = evaluate.load_logits_npz(req.logits[0])
        test = evaluate.load_logits_npz(req.logits[1])
        dataset, model = f"logits:{req.logits[1].name}", "given logits"
        fit = req.recal_fit
    else:
        assert req.onnx is not None and req.dataset is not None
        splits = data.load_dataset(req.dataset, seed=req.seed)
        if req.transform is not None:
            from quantcal.study.factories import import_factory

            try:
                splits = data.with_transform(splits, import_factory(req.transform), req.transform)
            except TypeError as exc:
                raise ValueError(f"--transform: {exc}") from exc
            print(f"inputs: {req.transform}(uint8 images)", file=sys.stderr)
        else:
            if req.mean is not None:
                splits = data.with_normalization(
                    splits, list(req.mean), list(req.std or ()), names=("--mean", "--std")
                )
            print(
                f"inputs: (x / 255 - mean) / std with mean {splits.mean}, std {splits.std}",
                file=sys.stderr,
            )
        onnx = evaluate.load_onnx_checked(req.onnx, splits, what="--onnx")
        val = (evaluate.onnx_logits(onnx, splits.val), splits.val.labels)
        test = (evaluate.onnx_logits(onnx, splits.test), splits.test.labels)
        dataset, model = req.dataset, f"onnx:{req.onnx.name}"
        fit = req.recal_fit
        if fit == "auto":
            fit = "test_crossfit" if data.val_held_out_of_train(req.dataset) else "val"
            if fit == "test_crossfit":
                notes.append(
                    "the ONNX model was trained elsewhere and val is held out of the train split "
                    "it has probably seen: recalibrators are cross-fitted on the test split"
                )
    if req.logits is not None:
        sources = (str(req.logits[0]), str(req.logits[1]))
    else:
        sources = ("the ONNX model's val logits", "the ONNX model's test logits")
    evaluate.check_given(val, test, quantized, sources=sources)  # before the folder is claimed
    _runfolder.claim(req.out, force=req.force, identity=req.identity)
    evaluate.evaluate_logits(
        val,
        test,
        req.out,
        quantized=quantized or None,
        dataset=dataset,
        model=model,
        methods=req.recal,
        recal_fit=fit,
        seed=req.seed,
        notes=notes,
        force=req.force,
        sources=sources,
        budget=req.budget,
        **req.metrics,
    )
