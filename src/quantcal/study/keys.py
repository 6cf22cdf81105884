"""Cache keys of the study's stages: a content hash of each stage's own settings and the keys
of what it reads (``content_hash`` of canonical JSON).

These functions decide whether an existing run folder's entries are reused, so they are pinned
by tests (``tests/test_study_keys.py``): a refactor that changes one key recomputes every run.
Each stage has its own version; bumping one recomputes that stage and those after it, never the
stages before (v2: data content digests and pinned threads in the keys, verified entries;
rows v3: smooth ECE and the plug-in l2 ECE measured; rows v4: the selective-prediction and
threshold-transfer columns and the ``shift`` axis).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from quantcal import _isa
from quantcal.findings.rows import RESULT_COLUMNS
from quantcal.study.cells import Group, QuantCell, objective_spec, stage_images
from quantcal.study.config import StudyConfig, content_hash
from quantcal.training import images as _images

__all__ = [
    "ATTRIBUTION_VERSION",
    "CLEAN",
    "LOGITS_VERSION",
    "OOD_VERSION",
    "PLAN_RULE",
    "ROW_VERSION",
    "SHIFT_VERSION",
    "TRAIN_VERSION",
    "attribution_key",
    "logits_key",
    "ood_logits_key",
    "pending_key",
    "plan_spec",
    "quant_config",
    "row_key",
    "shift_logits_key",
    "split_args",
    "train_key",
]

TRAIN_VERSION = 2


LOGITS_VERSION = 2


ROW_VERSION = 4


SHIFT_VERSION = 1


OOD_VERSION = 1

#: The ``shift`` of a row scored on the clean test split.
CLEAN = "clean"


ATTRIBUTION_VERSION = 1


PLAN_RULE = "upper_bound:0.9"


def split_args(config: StudyConfig, g: Group) -> tuple:
    """What decides a group's splits besides the data's content."""
    return (
        g.dataset,
        g.seed,
        config.val_size,
        config.ptq_calib_size,
        config.ptq_calib_samples,
        config.train_size,
    )


def train_key(
    config: StudyConfig,
    g: Group,
    data_digest: str,
    checkpoint_digest: str | None = None,
    normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
    transform: str | None = None,
) -> str:
    """Key of a trained (or loaded) model: the data's content, its splits and input
    normalisation (when not the dataset's) or transform, the model, and the recipe with the
    pinned thread count (or the checkpoint's digest)."""
    dataset, seed, val_size, ptq_size, ptq_samples, train_size = split_args(config, g)
    spec: dict[str, Any] = {
        "v": TRAIN_VERSION,
        "data": {
            "dataset": dataset,
            "digest": data_digest,
            "seed": seed,
            "val_size": val_size,
            "ptq_calib_size": ptq_size,
            "ptq_calib_samples": ptq_samples,
        },
        "arch": g.model.arch,
        "width": g.model.width,
    }
    if g.model.arch.lower().startswith("timm:"):  # timm's model definitions change by version
        from quantcal.models.external import timm_version

        spec["timm"] = timm_version()
    if config.threads is not None:
        spec["threads"] = config.threads
    if config.isa is not None:  # the instruction set that ran (the pin may not have held)
        spec["isa"] = _isa.active()
    if train_size is not None:  # absent otherwise: earlier keys stay valid
        spec["data"]["train_size"] = train_size
    if normalization is not None:
        spec["data"]["normalization"] = [list(normalization[0]), list(normalization[1])]
    if transform is not None:
        spec["data"]["transform"] = transform
    if g.model.checkpoint is not None:
        spec["checkpoint"] = checkpoint_digest
    else:
        spec["train"] = {**config.train, "objective": objective_spec(config, g), "seed": g.seed}
    return content_hash(spec)


def plan_spec(config: StudyConfig, cell: QuantCell) -> dict[str, Any] | None:
    """The search settings of a ``plan:KIND`` cell, else None."""
    if not cell.precision.startswith("plan:"):
        return None
    return config.plan_spec(cell.precision.split(":", 1)[1])


def quant_config(config: StudyConfig, cell: QuantCell):
    """The cell's QuantConfig (None for fp32); for a plan cell, the top level's, which the
    search turns into the plan (``_Runner.plan_config``)."""
    from quantcal import quant

    spec = plan_spec(config, cell)
    qc = quant.parse_precision(spec["levels"][0] if spec else cell.precision)
    if qc is None:
        return None
    return dataclasses.replace(
        qc,
        observer=cell.observer,
        first_last_8bit=config.first_last_8bit,
        sequential=config.sequential,
        weight_granularity=config.weight_granularity,
        matmul_bits=config.matmul_bits,
    )


def logits_key(config: StudyConfig, cell: QuantCell, train_key: str) -> str:
    qc = quant_config(config, cell)
    spec: dict[str, Any] = {
        "v": LOGITS_VERSION,
        "train": train_key,
        "quant": None if qc is None else qc.to_dict(),
        "sample": cell.sample,
    }
    plan = plan_spec(config, cell)
    if plan is not None:  # the plan is found from these and the data, deterministically
        spec["plan"] = {**plan, "seed": cell.group.seed, "rule": PLAN_RULE}
        images = stage_images(config, cell.group).search
        if images != _images.VAL:
            spec["plan"]["images"] = images
    if qc is not None and cell.method != "ptq":  # ptq cells keep the keys of before
        from quantcal.quant.methods import get_method

        options = get_method(cell.method).resolve(config.method_options.get(cell.method))
        spec["method"] = {"name": cell.method, "options": options}
    return content_hash(spec)


def attribution_key(config: StudyConfig, logits_key: str, images: str = "val") -> str:
    spec = {"v": ATTRIBUTION_VERSION, "logits": logits_key, **dict(config.attribution or {})}
    if images != _images.VAL:  # val-read attributions keep the keys of before
        spec["images"] = images
    return content_hash(spec)


def row_key(
    config: StudyConfig,
    logits_key: str,
    fp32_key: str,
    method: str,
    recal_fit: str = "val",
    shift: str = CLEAN,
) -> str:
    spec: dict[str, Any] = {
        "v": ROW_VERSION,
        "schema": list(RESULT_COLUMNS),
        "logits": logits_key,
        "fp32": fp32_key,
        "recal": method,
        "recal_fit": recal_fit,
        "n_bins": config.n_bins,
        "bootstrap": config.bootstrap,
        "level": config.level,
        "target_risk": config.target_risk,
    }
    if shift != CLEAN:
        spec["shift"] = [shift, SHIFT_VERSION]
    return content_hash(spec)


def shift_logits_key(logits_key: str, shift: str) -> str:
    """Key of a cell's logits on test corrupted by ``shift`` ("name:severity"): the clean
    logits' key (the model) and the corruption, seeded by the group's seed."""
    return content_hash({"v": SHIFT_VERSION, "logits": logits_key, "shift": shift})


def ood_logits_key(logits_key: str, ood: str, digest: str | None = None) -> str:
    """Key of a cell's logits on the unknown-input set ``ood`` (an ``npz:`` file by its
    content's digest)."""
    spec: dict[str, Any] = {"v": OOD_VERSION, "logits": logits_key, "ood": ood}
    if digest is not None:
        spec["digest"] = digest
    return content_hash(spec)


def pending_key(cell: QuantCell, method: str, shift: str = CLEAN) -> str:
    """Key for an error row of a cell whose logits never existed (train/quantize failed)."""
    return "err-" + content_hash(
        {
            "cell": [
                cell.group.dataset,
                cell.group.model.label,
                cell.group.objective,
                cell.group.seed,
                cell.precision,
                cell.observer,
                cell.sample,
                method,
                *([] if cell.method == "ptq" else [cell.method]),
                *([] if shift == CLEAN else [shift]),
            ]
        }
    )
