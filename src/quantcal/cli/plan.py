"""``quantcal plan``: the cheapest per-layer bit plan within an accuracy and calibration budget."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantcal.cli._common import Common, absolute_factory, add_common, common, split_list

#: The key a plan file carries, so that ``--out`` replaces only quantcal's own plans.
PLAN_MARK = "quantcal plan"


@dataclass(frozen=True)
class PlanRequest:
    checkpoint: Path
    model: str
    width: float
    dataset: str
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    levels: tuple[str, ...]
    budget: Any  # quant.PlanBudget
    cost: str
    seed: int
    out: Path
    force: bool
    common: Common


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "plan",
        help="find the cheapest per-layer bit plan that keeps accuracy and calibration",
        description="Mixed precision under a calibration budget: search the per-layer weight "
        "and activation bits (from --levels) of a trained checkpoint so that, on the dataset's "
        "validation split (for a dataset whose val is carved from train, which the checkpoint "
        "has probably seen: one stratified half of test), top-1 accuracy and the ECE after "
        "--recal stay within the budget of fp32 with their upper confidence bounds (--confidence) "
        "(recalibrators fitted on one half, the budget checked on the other), at the "
        'lowest --cost. Writes the plan as JSON; quant.QuantConfig.from_dict(its "quant_config") '
        "quantizes with it.",
        epilog="examples:\n  quantcal plan --checkpoint model.pt --model shufflenetv2 --width 0.5 "
        "--dataset cifar100\n  quantcal plan --checkpoint net.pt --model nets.py:build "
        "--dataset npz:data.npz --max-ece-rise none --cost weight_bytes --out acc_plan.json"
        "\n\n--out must be a new file or a plan quantcal wrote (--force replaces another file)."
        "\n\nexit status: 0 a plan within the budget, 1 even the top level breaks it (the "
        "all-top plan is written), 2 bad input (checked before the search; nothing written), "
        "130 interrupted",
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
    p.add_argument(
        "--confidence",
        default="0.9",
        help="a move is accepted when the one-sided upper confidence bound of its loss at this "
        "level stays within the budget (paired bootstrap over the check half; default 0.9); "
        "'none' checks point estimates",
    )
    p.add_argument("--cost", default="bops", choices=("bops", "weight_bytes"))
    p.add_argument("--seed", type=int, default=0, help="seed of the data split and halves")
    p.add_argument("--out", default="plan.json", help="where the plan is written (JSON)")
    p.add_argument(
        "--force", action="store_true", help="replace an --out file that is not a quantcal plan"
    )
    add_common(p)


def _check_out(out: Path, force: bool) -> None:
    """``out`` may be written: not a folder, its folder writable, and not a file of the user's
    (a plan quantcal wrote is replaced; anything else only with ``force``)."""
    if out.is_dir():
        raise ValueError(
            f"--out {out} is a folder; give the plan's file name, e.g. {out}/plan.json"
        )
    parent = out.parent if str(out.parent) else Path(".")
    existing = next((p for p in [parent, *parent.parents] if p.exists()), Path("."))
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: cannot create a file in {existing} (not a writable folder)")
    if out.exists() and not force:
        try:
            mine = json.loads(out.read_text(encoding="utf-8")).get("created_by") == PLAN_MARK
        except (OSError, ValueError, AttributeError):
            mine = False
        if not mine:
            raise ValueError(
                f"--out {out} exists and is not a plan quantcal wrote. Nothing was computed. "
                "Choose another --out, or pass --force to replace it"
            )


def resolve(args: argparse.Namespace) -> PlanRequest:
    from quantcal import quant
    from quantcal._inputs import (
        check_input_file,
        check_number,
        parse_float_list,
    )
    from quantcal.training.data import check_dataset_name

    checkpoint = check_input_file(args.checkpoint, "--checkpoint")
    check_dataset_name(args.dataset, "--dataset")
    check_number(args.width, "--width", minimum=0, exclusive_minimum=True)
    check_number(args.seed, "--seed", integer=True, minimum=0)
    from quantcal.quant.plan import check_budget, check_confidence, check_levels

    def flag(key: str) -> str:
        return "--" + key.replace("_", "-")

    levels = [
        f"W{c.weight_bits}A{c.act_bits}" for c in check_levels(split_list(args.levels), label=flag)
    ]
    text = args.max_ece_rise.strip().lower()
    try:
        ece = None if text == "none" else float(text)
    except ValueError:
        raise ValueError(
            f"--max-ece-rise must be a fraction (0.01 = 1 point) or 'none', got "
            f"{args.max_ece_rise!r}"
        ) from None
    check_budget(args.max_accuracy_drop, ece, args.recal, label=flag)
    text = args.confidence.strip().lower()
    try:
        confidence = None if text == "none" else float(text)
    except ValueError:
        raise ValueError(
            f"--confidence must be a level in [0.5, 1) or 'none', got {args.confidence!r}"
        ) from None
    check_confidence(confidence, label=flag)
    budget = quant.PlanBudget(args.max_accuracy_drop, ece, args.recal, confidence)
    if (args.mean is None) != (args.std is None):
        raise ValueError("--mean and --std go together: give both or neither")
    mean = std = None
    if args.mean is not None:
        mean = tuple(parse_float_list(args.mean, "--mean"))
        std = tuple(parse_float_list(args.std, "--std"))
    out = Path(args.out)
    _check_out(out, bool(args.force))
    return PlanRequest(
        checkpoint,
        absolute_factory(args.model),
        args.width,
        args.dataset,
        mean,
        std,
        tuple(levels),
        budget,
        args.cost,
        args.seed,
        out,
        bool(args.force),
        common(args),
    )


def execute(req: PlanRequest) -> int:
    from quantcal import quant
    from quantcal._io import atomic_write_json
    from quantcal.study import runner as study
    from quantcal.training import data
    from quantcal.training import images as _images

    splits = data.load_dataset(req.dataset, seed=req.seed)
    if req.mean is not None:
        splits = data.with_normalization(
            splits, list(req.mean), list(req.std or ()), names=("--mean", "--std")
        )
    model = study.build_model(
        req.model,
        num_classes=splits.num_classes,
        image_size=splits.image_size,
        in_chans=splits.channels,
        width=req.width,
        seed=req.seed,
    )
    study.load_weights(model, req.checkpoint)
    device = study.resolve_device(req.common.device)
    model.to(device)
    # the checkpoint was trained elsewhere: where val is carved from train, search on one
    # stratified half of test (the study's rule, quantcal.training.images)
    policy = _images.stage_images(
        outside_checkpoint=True,
        val_from_train=lambda: data.val_held_out_of_train(req.dataset),
        fit_on="auto",
    )
    search = splits.val
    if policy.search == _images.TEST_HALF:
        half = _images.test_halves(splits.test.labels, req.seed)[_images.SEARCH]
        search = _images.subset(splits.test, half)
        print(
            f"quantcal plan: searching on one stratified half of test ({len(search)} images, "
            f"seed {req.seed}): val is carved from the train split the checkpoint has probably "
            "seen; measure the plan on the other half only",
            file=sys.stderr,
        )
    t0 = time.perf_counter()
    result = quant.plan_mixed_precision(
        model,
        list(splits.ptq_calib.batches(256, device=device)),
        search.batches(256, device=device),
        budget=req.budget,
        levels=list(req.levels),
        cost=req.cost,
        seed=req.seed,
        log=None if req.common.quiet else (lambda line: print(f"plan: {line}", file=sys.stderr)),
    )
    record = {
        "created_by": PLAN_MARK,
        **result.as_dict(),
        "images": policy.describe(len(search), stage="the plan search"),
        "checkpoint": str(req.checkpoint.resolve()),
    }
    atomic_write_json(req.out, record)
    per_level: dict[str, int] = {}
    for w, a in result.plan.values():
        per_level[f"W{w}A{a}"] = per_level.get(f"W{w}A{a}", 0) + 1
    m, f, b = result.metrics, result.fp32, result.bound
    where = "test search half" if policy.search == _images.TEST_HALF else "validation"

    def upto(key: str, what: str) -> str:
        hi = b.get(key)
        if hi is None or b["level"] is None:
            return ""
        return f", {what} up to {100 * hi:.1f} points at {100 * b['level']:.0f} % confidence"

    print(
        f"plan: {', '.join(f'{k} x{v}' for k, v in per_level.items())}; cost "
        f"{result.cost:.4g} {req.cost} ("
        + ", ".join(f"{k} {v:.4g}" for k, v in result.uniform_costs.items())
        + ")"
    )
    print(
        f"{where}, check half ({b['n_check']} images): accuracy {100 * m['accuracy']:.1f} % "
        f"(fp32 {100 * f['accuracy']:.1f} %{upto('accuracy_drop_hi', 'loss')})"
        + (
            f", ECE after {req.budget.recal} {100 * m['ece']:.1f} % (fp32 {100 * f['ece']:.1f} %"
            f"{upto('ece_rise_hi', 'rise')})"
            if "ece" in m
            else ""
        )
        + f"; {result.evaluations} evaluations, {time.perf_counter() - t0:.0f} s"
    )
    print(f"written: {req.out}")
    if not result.within_budget:
        print(
            "quantcal plan: even the top level breaks the budget: the all-top plan was written",
            file=sys.stderr,
        )
        return 1
    return 0
