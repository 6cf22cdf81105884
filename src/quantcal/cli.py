"""The ``quantcal`` command: thin argparse sub-commands over the library.

Examples::

    quantcal run                                  # the embedded demo study (digits, offline)
    quantcal run cifar100_small --dataset npz:/data/cifar100.npz --out runs/c100
    quantcal run paper_cifar100 --shard 3/8 --out /shared/runs/paper   # one of 8 machines
    quantcal report runs/demo
    quantcal eval --checkpoint model.pt --model shufflenetv2 --width 0.5 --dataset cifar100
    quantcal train --model ghostnet_vgg16 --width 0.25 --dataset digits --epochs 30
    quantcal data download cifar100
    quantcal list
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_EPILOG_RUN = """examples:
  quantcal run                                   the embedded demo (digits, 3 architectures)
  quantcal run cifar100_small --dataset npz:/data/cifar100.npz --out runs/c100
  quantcal run my_study.toml --set train.epochs=5 --set quant.observers='["minmax","mse"]'
  quantcal run paper_cifar100 --shard 0/4 --out /shared/paper   # shard 0 of 4 machines
  quantcal run repair --dataset npz:/data/cifar100.npz   # PTQ, CLE+BC, AdaRound, QAT

Re-running the same command resumes: finished stages are read from OUT/cache.
OUT must be new, empty or made by quantcal (--force adopts another folder)."""

_EXIT_CODES = """exit status:
  0    every cell computed (a shard: every cell of this shard)
  1    some cells failed: they are error rows in results.csv, grouped by cause on stderr,
       with tracebacks in OUT/cache/errors/*.log; everything else was computed and written
  2    bad input (study file, option, dataset, model factory, checkpoint, output folder):
       nothing was computed
  130  interrupted: finished stages are cached, re-run the same command to resume

Results and tables go to stdout; progress, notes and errors to stderr (one plain line per
epoch and stage when stderr is not a terminal)."""


def _add_force(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--force",
        action="store_true",
        help="write into a non-empty --out folder that quantcal did not make (it then "
        "replaces results.csv, report.html, config.toml, ... there)",
    )


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or stage messages")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for PyTorch; for run and eval this overrides the study's pinned "
        "`threads` and enters the cache keys (default: the study's, else PyTorch's choice; "
        "1 is fastest on a busy machine)",
    )


def _parse_set(items: Sequence[str]) -> dict[str, Any]:
    from quantcal._toml import parse_value

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects KEY=VALUE (e.g. train.epochs=5), got {item!r}")
        out[key.strip()] = parse_value(value.strip())
    return out


def build_parser() -> argparse.ArgumentParser:
    from quantcal.studyconfig import builtin_studies

    parser = argparse.ArgumentParser(
        prog="quantcal",
        description="Calibration error of quantized efficient CNNs: train or load a model, "
        "simulate post-training quantization (fp32, W8A8, W4A8, W4A4, ...), measure accuracy "
        "and calibration error with bootstrap intervals, repair confidence with temperature "
        "scaling and other recalibrators, and write a report.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `quantcal COMMAND --help` for the options of each command.",
    )
    from quantcal import __version__

    parser.add_argument("--version", action="version", version=f"quantcal {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "run",
        help="run (or resume) a study and write results.csv and report.html",
        description="Run a study: train each model, quantize it at each precision, recalibrate, "
        "measure, and write OUT/results.csv, OUT/report.html and OUT/figures/. Without STUDY "
        "the embedded demo runs (scikit-learn digits, offline, a few minutes on 2 CPU cores).",
        epilog=_EPILOG_RUN + "\n\n" + _EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "study",
        nargs="?",
        default=None,
        help="a .toml study file or a built-in name ("
        + ", ".join(sorted(builtin_studies()))
        + "); default: demo",
    )
    p.add_argument("--out", default=None, help="output folder (default: runs/STUDY_NAME)")
    p.add_argument(
        "--shard",
        default="0/1",
        help="I/N: compute only the I-th of N shares of "
        "the training groups (N machines sharing one --out folder)",
    )
    p.add_argument(
        "--dataset",
        action="append",
        default=None,
        metavar="NAME",
        help="replace the study's datasets (repeatable), e.g. npz:/path/data.npz",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a study key, e.g. train.epochs=5 (value parsed as TOML)",
    )
    p.add_argument(
        "--fresh",
        action="store_true",
        help="discard the cache entries quantcal wrote in OUT/cache and start over",
    )
    _add_force(p)
    _add_common(p)

    p = sub.add_parser(
        "train",
        help="train one model and save its checkpoint",
        description="Train one registry model on a dataset with the study's recipe (override "
        "any field) and save OUT/model.pt (weights only) with its test accuracy.",
        epilog="example:\n  quantcal train --model shufflenetv2 --width 0.5 --dataset digits "
        "--epochs 20 --set batch_size=64 --out runs/sn",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="registry name (see `quantcal list`)")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--dataset", default="digits")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a TrainConfig field, e.g. lr=0.05",
    )
    p.add_argument("--out", default="runs/train")
    _add_force(p)
    _add_common(p)

    p = sub.add_parser(
        "eval",
        help="quantize and evaluate your own checkpoint",
        description="Bring your own trained model: quantize it at each precision, recalibrate "
        "and measure, exactly as `run` does, and write the same results and report. Or score, "
        "as given, an ONNX model (an int8 one included) or logits computed anywhere.",
        epilog="examples:\n  quantcal eval --checkpoint model.pt --model shufflenetv2 --width 0.5 "
        "--dataset cifar100\n  quantcal eval --checkpoint net.pt --model mypkg.nets:build "
        "--dataset npz:data.npz --precisions fp32,W8A8,W6A6\n  quantcal eval --checkpoint "
        "net.pt --model nets/mine.py:build --dataset digits --mean 0 --std 1\n  quantcal eval "
        "--onnx model_int8.onnx --dataset cifar100 --mean 0.507,0.487,0.441 --std "
        "0.267,0.256,0.276\n  quantcal eval --logits val.npz test.npz --recal "
        "none,temperature,isotonic\n\n" + _EXIT_CODES,
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
        "(N,), the first for recalibration, the second for measurement; no model, no dataset",
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
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--dataset", default=None, help="required with --checkpoint and --onnx")
    p.add_argument("--precisions", default="fp32,W8A8,W4A8,W4A4")
    p.add_argument("--observers", default="minmax", help="comma-separated range estimators")
    p.add_argument(
        "--methods",
        default="ptq",
        help="comma-separated quantization methods (ptq, cle_bc, adaround, qat; qat fine-tunes "
        "on the dataset's training split with the default recipe)",
    )
    p.add_argument(
        "--recal",
        default="none,temperature,temperature_fp32",
        help="comma-separated recalibration methods",
    )
    p.add_argument(
        "--recal-fit",
        default="auto",
        choices=("auto", "val", "test_crossfit"),
        help="where recalibrators are fitted: val; test_crossfit (two stratified halves of the "
        "test split, each recalibrated by a fit on the other); auto (default): val when the "
        "dataset has its own val split, else test_crossfit, since a checkpoint trained "
        "elsewhere has probably seen a val held out of the train split",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the data split")
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
        default=1000,
        metavar="N",
        help="validation images the attribution uses (default 1000)",
    )
    p.add_argument("--out", default="runs/eval")
    _add_force(p)
    _add_common(p)

    p = sub.add_parser(
        "report",
        help="(re)write report.html for a finished run folder, or print its summary table",
        description="Assemble the cached rows of a run (all shards) into "
        "results.csv and write report.html and figures/. With --format, write nothing: print "
        "the run's summary table (one line per model, precision and recalibration method) to "
        "stdout as Markdown, LaTeX or JSON, for a paper or a wiki.",
        epilog="examples:\n"
        "  quantcal report runs/demo                             rewrite report.html\n"
        "  quantcal report runs/demo --format md > table.md      a Markdown table\n"
        "  quantcal report runs/demo --format latex > table.tex  a booktabs tabular\n"
        "  quantcal report runs/demo --format json > table.json  every number unrounded\n\n"
        "exit status: 0 all cells ok, 1 some cells failed (grouped on stderr), 2 the folder is "
        "not a finished run, or its table is empty",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run_dir")
    p.add_argument(
        "--format",
        choices=("md", "json", "latex"),
        default=None,
        help="print the summary table to stdout instead of writing report.html: md (a "
        "Markdown table), latex (a booktabs tabular) or json (unrounded, with a header); "
        "md and latex give percent with one decimal (the ECE difference vs fp32: points, two) "
        "and intervals as '12.3 [11.0, 13.6]'. "
        "Reads results.csv only (a sharded run: run `quantcal report RUN_DIR` once first). "
        "Example: quantcal report runs/demo --format latex > table.tex",
    )

    p = sub.add_parser(
        "plan",
        help="find the cheapest per-layer bit plan that keeps accuracy and calibration",
        description="Mixed precision under a calibration budget: search the per-layer weight "
        "and activation bits (from --levels) of a trained checkpoint so that, on the dataset's "
        "validation split, top-1 accuracy and the ECE after --recal stay within the budget of "
        "fp32 (recalibrators fitted on one half, the budget checked on the other), at the "
        'lowest --cost. Writes the plan as JSON; quant.QuantConfig.from_dict(its "quant_config") '
        "quantizes with it.",
        epilog="examples:\n  quantcal plan --checkpoint model.pt --model shufflenetv2 --width 0.5 "
        "--dataset cifar100\n  quantcal plan --checkpoint net.pt --model nets.py:build "
        "--dataset npz:data.npz --max-ece-rise none --cost weight_bytes --out acc_plan.json"
        "\n\nexit status: 0 a plan within the budget, 1 even the top level breaks it (the "
        "all-top plan is written), 2 bad input",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="state dict saved with torch.save")
    p.add_argument("--model", required=True, help="as for `quantcal eval --model`")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--dataset", required=True)
    p.add_argument("--mean", default=None, help="as for `quantcal eval`")
    p.add_argument("--std", default=None, help="as for `quantcal eval`")
    p.add_argument("--levels", default="W8A8,W4A8,W4A4", help="precisions, most bits first")
    p.add_argument("--max-accuracy-drop", type=float, default=0.01, help="0.01 = 1 point")
    p.add_argument(
        "--max-ece-rise", default="0.01", help="0.01 = 1 point; 'none' budgets accuracy only"
    )
    p.add_argument("--recal", default="temperature", help="the recalibrator of the ECE budget")
    p.add_argument("--cost", default="bops", choices=("bops", "weight_bytes"))
    p.add_argument("--seed", type=int, default=0, help="seed of the data split and halves")
    p.add_argument("--out", default="plan.json", help="where the plan is written (JSON)")
    _add_common(p)

    p = sub.add_parser(
        "compare",
        help="two finished runs side by side, paired where they share test images",
        description="Match the cells of two runs (dataset, model, objective, seed, precision, "
        "range estimator, recalibrator; range-calibration sample 0) and print a metric of each "
        "with the difference B - A and its 95 % interval: a paired bootstrap over the test "
        "images where both runs scored the same ones, else the two intervals combined as if "
        "independent. Cells found in one run only are listed. Rebuilt from each run's cache.",
        epilog="examples:\n  quantcal compare runs/before runs/after\n  quantcal compare "
        "runs/a runs/b --metric accuracy --format json > diff.json\n\nexit status: 0, or 2 "
        "when a folder is not a finished run",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run_a")
    p.add_argument("run_b")
    p.add_argument("--metric", default="ece", choices=("ece", "accuracy", "nll", "brier"))
    p.add_argument("--format", default="text", choices=("text", "json"))
    p.add_argument("--bootstrap", type=int, default=1000, help="resamples per interval")

    p = sub.add_parser(
        "data",
        help="dataset utilities",
        description="Download a dataset into the data folder (checksum-verified).",
        epilog="example:\n  quantcal data download cifar100 --root ~/data",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION")
    d = dsub.add_parser("download", help="download and verify a dataset file")
    d.add_argument("name", help="cifar100 or pathmnist")
    d.add_argument(
        "--root", default=None, help="data folder (default: $QUANTCAL_DATA or the per-user cache)"
    )

    sub.add_parser(
        "list",
        help="list models, datasets, precisions, range estimators, quantization methods, "
        "recalibrators and built-in studies",
        description="List what can be named in a study.",
        epilog="example:\n  quantcal list",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return parser


# ---------------------------------------------------------------------------------------------
def _cell_label(r: dict) -> str:
    n = lambda v: f"{float(v):g}"  # noqa: E731 - numeric columns arrive as float or str
    where = "" if r.get("observer") in (None, "-") else f" {r['observer']} #{n(r['ptq_sample'])}"
    if (r.get("method") or "-") not in ("-", "ptq"):
        where += f" {r['method']}"
    obj = "" if (r.get("objective") or "ce") == "ce" else f" {r['objective']}"
    return (
        f"{r['dataset']} {r['arch']}@{n(r['width'])}{obj} seed {n(r['seed'])} "
        f"{r['precision']}{where}"
    )


def report_notes(rows: list[dict]) -> None:
    """Each distinct note of the rows once on stderr, with how many rows it concerns."""
    counts: dict[str, int] = {}
    for r in rows:
        for note in filter(None, (x.strip() for x in str(r.get("notes") or "").split(" | "))):
            counts[note] = counts.get(note, 0) + 1
    for note, k in counts.items():
        print(f"note: {k} rows: {note}", file=sys.stderr)


def report_failures(failed: list[dict], out: Path, total: int | None = None) -> int:
    """Print failed rows on stderr grouped by cause ("12 cells: ..."); returns the exit status
    (1 when any failed, else 0)."""
    if not failed:
        return 0
    by_cause: dict[str, list[dict]] = {}
    for r in failed:
        by_cause.setdefault(str(r.get("error") or "unknown error"), []).append(r)
    of = f" of {total}" if total else ""
    cells = {_cell_label(r) for r in failed}
    print(
        f"quantcal: {len(failed)}{of} result rows failed ({len(cells)} cells), by cause:",
        file=sys.stderr,
    )
    for cause, rows in sorted(by_cause.items(), key=lambda kv: -len(kv[1])):
        labels = sorted({_cell_label(r) for r in rows})
        shown = "; ".join(labels[:3]) + (f"; and {len(labels) - 3} more" if len(labels) > 3 else "")
        print(f"  {len(labels)} cells: {cause}\n      ({shown})", file=sys.stderr)
    print(
        f"  error rows are in {out / 'results.csv'} (status, error); tracebacks in "
        f"{out / 'cache' / 'errors'}/*.log. Re-running retries them.",
        file=sys.stderr,
    )
    return 1


def _finish(out: Path, t0: float, quiet: bool) -> int:
    from quantcal import report, study

    if not (out / "results.csv").exists():
        print(f"partial run in {out}: other shards still have cells to compute")
        return report_failures(study.failed_rows(out), out)
    rows = report.load_rows(out)
    if not quiet:
        print()
        print(report.summary_table(rows))
    print(f"\nreport: {(out / 'report.html').resolve()}  ({time.perf_counter() - t0:.0f} s)")
    report_notes(rows)
    code = report_failures([r for r in rows if r.get("status") != "ok"], out, len(rows))
    return report_failed_attributions(study.failed_attributions(out)) or code


def report_failed_attributions(failed: list[dict]) -> int:
    """Name each failed per-layer attribution on stderr; 1 when there is any, else 0."""
    for r in failed:
        print(
            f"quantcal: the attribution of {r['dataset']} / {r['arch']}@{float(r['width']):g} "
            f"{r['precision']} failed: {r['error']} (re-running retries it)",
            file=sys.stderr,
        )
    return 1 if failed else 0


def _cmd_run(args: argparse.Namespace) -> int:
    from quantcal import study

    overrides = _parse_set(args.set)
    if args.dataset:
        overrides["data.datasets"] = list(args.dataset)
    if args.threads is not None:
        overrides["threads"] = args.threads
    shard = study.parse_shard(args.shard)
    t0 = time.perf_counter()
    config = study.load_study(args.study, overrides)
    out = Path(args.out) if args.out else Path("runs") / config.name
    study.run_study(
        config,
        out,
        resume=not args.fresh,
        shard=shard,
        device=args.device,
        quiet=args.quiet,
        force=args.force,
    )
    return _finish(out, t0, args.quiet)


def _cmd_train(args: argparse.Namespace) -> int:
    from quantcal import _runfolder, data, metrics, train
    from quantcal._io import atomic_torch_save, atomic_write_json
    from quantcal.study import _resolve_device, build_model

    overrides = _parse_set(args.set)
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    overrides["seed"] = args.seed
    cfg = train.TrainConfig.from_dict(overrides)
    device = _resolve_device(args.device)
    splits = data.load_dataset(args.dataset, seed=args.seed)
    model = build_model(
        args.model,
        num_classes=splits.num_classes,
        image_size=splits.image_size,
        in_chans=splits.channels,
        width=args.width,
        seed=args.seed,
    )
    out = _runfolder.claim(args.out, force=args.force)
    result = train.train(
        model, splits, cfg, device=device, out_dir=out, resume=True, progress=not args.quiet
    )
    logits, labels = train.predict_logits(result.model, splits.test, device=device)
    acc = metrics.accuracy(logits, labels)
    ece = metrics.ece(logits, labels)
    atomic_torch_save(
        {
            "model": result.model.to("cpu").state_dict(),
            "config": getattr(result.model, "config", {}),
        },
        out / "model.pt",
    )
    atomic_write_json(
        out / "train.json",
        {
            "train_config": cfg.to_dict(),
            "history": result.history,
            "test_accuracy": acc,
            "test_ece": ece,
            "seconds": result.seconds,
        },
    )
    print(f"test accuracy {100 * acc:.2f} %, ECE {100 * ece:.2f} %  ->  {out / 'model.pt'}")
    return 0


def _absolute_factory(arch: str) -> str:
    """``path/file.py:fn`` with an absolute path (the run folder may be read from elsewhere)."""
    mod, sep, fn = arch.rpartition(":")
    if sep and mod.endswith(".py"):
        return f"{Path(mod).expanduser().resolve()}:{fn}"
    return arch


def _eval_given(args: argparse.Namespace) -> int:
    """``eval --onnx`` and ``eval --logits``: score predictions that already exist."""
    from quantcal import data, evaluate

    split = lambda s: [x.strip() for x in s.split(",") if x.strip()]  # noqa: E731
    methods = [m for m in split(args.recal) if m != "temperature_fp32"]
    t0 = time.perf_counter()
    notes: list[str] = []
    if args.logits:
        val = evaluate.load_logits_npz(args.logits[0])
        test = evaluate.load_logits_npz(args.logits[1])
        dataset, model = f"logits:{Path(args.logits[1]).name}", "given logits"
        fit = "val" if args.recal_fit == "auto" else args.recal_fit
    else:
        if args.dataset is None:
            raise ValueError("--onnx needs --dataset (the images to run the model on)")
        splits = data.load_dataset(args.dataset, seed=args.seed)
        if args.transform is not None:
            from quantcal.study import import_factory

            try:
                splits = data.with_transform(
                    splits, import_factory(args.transform), _absolute_factory(args.transform)
                )
            except TypeError as exc:
                raise ValueError(f"--transform: {exc}") from exc
            print(f"inputs: {args.transform}(uint8 images)", file=sys.stderr)
        else:
            if args.mean is not None:
                splits = data.with_normalization(
                    splits,
                    [float(v) for v in split(args.mean)],
                    [float(v) for v in split(args.std)],
                )
            print(
                f"inputs: (x / 255 - mean) / std with mean {splits.mean}, std {splits.std}",
                file=sys.stderr,
            )
        path = Path(args.onnx).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"ONNX model {path} does not exist")
        val = (evaluate.onnx_logits(path, splits.val), splits.val.labels)
        test = (evaluate.onnx_logits(path, splits.test), splits.test.labels)
        dataset, model = args.dataset, f"onnx:{path.name}"
        fit = args.recal_fit
        if fit == "auto":
            fit = "test_crossfit" if data.val_held_out_of_train(args.dataset) else "val"
            if fit == "test_crossfit":
                notes.append(
                    "the ONNX model was trained elsewhere and val is held out of the train split "
                    "it has probably seen: recalibrators are cross-fitted on the test split"
                )
    out = Path(args.out)
    evaluate.evaluate_logits(
        val,
        test,
        out,
        dataset=dataset,
        model=model,
        methods=methods,
        recal_fit=fit,
        seed=args.seed,
        notes=notes,
        force=args.force,
    )
    return _finish(out, t0, args.quiet)


def _cmd_eval(args: argparse.Namespace) -> int:
    from quantcal import study

    if (args.mean is None) != (args.std is None):
        raise ValueError("--mean and --std go together: give both or neither")
    if args.transform is not None and args.mean is not None:
        raise ValueError("--transform replaces --mean/--std: give one or the other")
    if args.onnx or args.logits:
        if args.plans or args.attribution:
            what = "--plans" if args.plans else "--attribution"
            raise ValueError(f"{what} quantizes the model itself: it needs --checkpoint")
        return _eval_given(args)
    if args.model is None or args.dataset is None:
        raise ValueError("--checkpoint needs --model (the code that builds it) and --dataset")

    split = lambda s: [x.strip() for x in s.split(",") if x.strip()]  # noqa: E731
    precisions = split(args.precisions)
    if "fp32" not in [p.lower() for p in precisions]:
        precisions = ["fp32", *precisions]
    raw = {
        "name": "eval",
        "seeds": [args.seed],
        "data": {"datasets": [args.dataset]},
        "model": [
            {
                "arch": _absolute_factory(args.model),
                "width": args.width,
                "checkpoint": str(Path(args.checkpoint).resolve()),
            }
        ],
        "quant": {
            "precisions": precisions,
            "observers": split(args.observers),
            "methods": split(args.methods),
            "plans": bool(args.plans),
        },
        "recal": {"methods": split(args.recal), "fit_on": args.recal_fit},
    }
    if args.attribution is not None:
        raw["quant"]["attribution"] = {
            "granularity": args.attribution,
            "samples": args.attribution_samples,
        }
    if args.threads is not None:
        raw["threads"] = args.threads
    if args.transform is not None:
        raw["data"]["transform"] = _absolute_factory(args.transform)
    if args.mean is not None:
        for name in ("mean", "std"):
            try:
                raw["data"][name] = [float(v) for v in split(getattr(args, name))]
            except ValueError:
                raise ValueError(
                    f"--{name} must be comma-separated numbers, got {getattr(args, name)!r}"
                ) from None
    t0 = time.perf_counter()
    out = Path(args.out)
    study.run_study(raw, out, device=args.device, quiet=args.quiet, force=args.force)
    return _finish(out, t0, args.quiet)


def _cmd_report(args: argparse.Namespace) -> int:
    from quantcal import report, study

    out = Path(args.run_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file; give the run's output folder")
    if args.format is not None:  # print the table; write nothing
        from quantcal import tables

        if not (out / "results.csv").exists() and (out / "cache").is_dir():
            raise FileNotFoundError(
                f"{out / 'results.csv'} does not exist yet: when every shard has finished, "
                f"`quantcal report {out}` (without --format) assembles it from the cache"
            )
        rows = report.load_rows(out)
        failed = [r for r in rows if r.get("status") != "ok"]
        records = tables.summary_records(rows)
        if not records:
            what = (
                "no result rows"
                if not rows
                else f"no successful cells ({len(failed)} of {len(rows)} rows failed)"
                if failed
                else "no rows of the main table"
            )
            print(
                f"quantcal report: error: {out / 'results.csv'} has {what}: no table to print",
                file=sys.stderr,
            )
            return report_failures(failed, out, len(rows)) or 2
        sys.stdout.write(tables.render(records, args.format, **tables.run_info(out)))
        return report_failures(failed, out, len(rows))
    if (out / "cache").exists():
        study.assemble(out)
    else:
        report.write_report(out)
    rows = report.load_rows(out)
    print(report.summary_table(rows))
    print(f"\nreport: {(out / 'report.html').resolve()}")
    return report_failures([r for r in rows if r.get("status") != "ok"], out, len(rows))


def _cmd_data(args: argparse.Namespace) -> int:
    from quantcal import data

    if args.data_command != "download":
        print("usage: quantcal data download NAME [--root DIR]", file=sys.stderr)
        return 2
    path = data.download(args.name, root=args.root)
    print(f"verified: {path}")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from quantcal import data, models, objectives, quant, recal
    from quantcal.studyconfig import REUSE_FP32_TEMPERATURE, builtin_studies

    print("models:          " + ", ".join(models.list_models()))
    print("datasets:        " + ", ".join(data.list_datasets()) + ", npz:PATH")
    print("precisions:      " + ", ".join(quant.PRECISIONS) + " (any wXaY with 2 <= X, Y <= 16)")
    print("range estimators:" + " " + ", ".join(quant.available_observers()))
    print("quant methods:   " + ", ".join(quant.available_methods()) + " ([quant] methods)")
    print("recalibrators:   " + ", ".join([*recal.available(), REUSE_FP32_TEMPERATURE]))
    print("objectives:      " + ", ".join(objectives.available()) + " ([train] objectives)")
    print("studies:         " + ", ".join(builtin_studies()))
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from quantcal import data, quant, study
    from quantcal._io import atomic_write_json

    split = [v.strip() for v in args.levels.split(",") if v.strip()]
    ece = None if args.max_ece_rise.strip().lower() == "none" else float(args.max_ece_rise)
    budget = quant.PlanBudget(args.max_accuracy_drop, ece, args.recal)
    splits = data.load_dataset(args.dataset, seed=args.seed)
    if (args.mean is None) != (args.std is None):
        raise ValueError("--mean and --std go together: give both or neither")
    if args.mean is not None:
        splits = data.with_normalization(
            splits,
            [float(v) for v in args.mean.split(",")],
            [float(v) for v in args.std.split(",")],
        )
    model = study.build_model(
        _absolute_factory(args.model),
        num_classes=splits.num_classes,
        image_size=splits.image_size,
        in_chans=splits.channels,
        width=args.width,
        seed=args.seed,
    )
    study.load_weights(model, args.checkpoint)
    device = study._resolve_device(args.device)
    model.to(device)
    t0 = time.perf_counter()
    result = quant.plan_mixed_precision(
        model,
        list(splits.ptq_calib.batches(256, device=device)),
        splits.val.batches(256, device=device),
        budget=budget,
        levels=split,
        cost=args.cost,
        seed=args.seed,
        log=None if args.quiet else (lambda line: print(f"plan: {line}", file=sys.stderr)),
    )
    record = {**result.as_dict(), "checkpoint": str(Path(args.checkpoint).resolve())}
    atomic_write_json(Path(args.out), record)
    per_level: dict[str, int] = {}
    for w, a in result.plan.values():
        per_level[f"W{w}A{a}"] = per_level.get(f"W{w}A{a}", 0) + 1
    m, f = result.metrics, result.fp32
    print(
        f"plan: {', '.join(f'{k} x{v}' for k, v in per_level.items())}; cost "
        f"{result.cost:.4g} {args.cost} ("
        + ", ".join(f"{k} {v:.4g}" for k, v in result.uniform_costs.items())
        + ")"
    )
    print(
        f"validation check half: accuracy {100 * m['accuracy']:.1f} % (fp32 "
        f"{100 * f['accuracy']:.1f} %)"
        + (
            f", ECE after {args.recal} {100 * m['ece']:.1f} % (fp32 {100 * f['ece']:.1f} %)"
            if "ece" in m
            else ""
        )
        + f"; {result.evaluations} evaluations, {time.perf_counter() - t0:.0f} s"
    )
    print(f"written: {args.out}")
    if not result.within_budget:
        print(
            "quantcal plan: even the top level breaks the budget: the all-top plan was written",
            file=sys.stderr,
        )
        return 1
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from quantcal.compare import compare_runs, format_comparison

    for d in (args.run_a, args.run_b):
        if not (Path(d) / "config.toml").is_file():
            raise FileNotFoundError(f"{d} is not a quantcal run folder (no config.toml)")
    result = compare_runs(args.run_a, args.run_b, metric=args.metric, n_resamples=args.bootstrap)
    if not result["rows"]:
        print(
            "quantcal compare: the two runs share no cell (dataset, model, seed, precision, "
            "range estimator, recalibrator): nothing to compare",
            file=sys.stderr,
        )
        return 1
    if args.format == "json":
        print(json.dumps(result, indent=1))
    else:
        sys.stdout.write(format_comparison(result, Path(args.run_a).name, Path(args.run_b).name))
    return 0


_COMMANDS = {
    "run": _cmd_run,
    "train": _cmd_train,
    "eval": _cmd_eval,
    "report": _cmd_report,
    "compare": _cmd_compare,
    "plan": _cmd_plan,
    "data": _cmd_data,
    "list": _cmd_list,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``quantcal`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        threads = getattr(args, "threads", None)
        if threads is not None:
            if threads < 1:
                raise ValueError(f"--threads must be >= 1, got {threads}")
            import torch

            torch.set_num_threads(threads)
        return _COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"quantcal {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk, a permission: what was finished is cached
        print(
            f"quantcal {args.command}: error: {exc}. Finished stages are cached; fix the cause "
            "and re-run the same command to resume",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print(
            "\ninterrupted: finished stages are cached; re-run the same command to resume",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
