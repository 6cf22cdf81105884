"""The layout of a study file (TOML): its tables and keys, which
:class:`~quantcal.study.config.StudyConfig` field each key sets (``LAYOUT``), and dotted
overrides of a nested study dict.

A study is the product datasets x models (arch, width) x seeds, each trained once, then swept
over precisions x range estimators x range-calibration samples, each cell recalibrated by every
listed method and scored on the test split. File layout (every key optional but ``model``)::

    name = "demo"
    seeds = [0]
    threads = 1                    # CPU threads for PyTorch (absent: PyTorch's choice); see below
    isa = "avx2"                   # CPU instruction set of its kernels (absent: the CPU's best)

    [data]
    datasets = ["digits"]          # registry names, or "npz:PATH"
    val_size = 180                 # recalibration split (None: the dataset's default)
    train_size = 10000             # train on a stratified subset (None: every training image)
    ptq_calib_size = 100           # range-calibration images per sample
    mean = [0.485, 0.456, 0.406]   # optional, with std: the model's input normalisation,
    std = [0.229, 0.224, 0.225]    # (x / 255 - mean) / std; default the dataset's statistics
    transform = "mymodule:prep"    # or the model's own preprocessing of uint8 (B, C, H, W)
                                   # batches (module:function or path/file.py:function)
    shifts = ["gaussian_noise:3", "jpeg:5"]   # corrupted test copies (Hendrycks & Dietterich
                                   # 2019): "name:severity", a name alone (severities 1-5),
                                   # "all" or "all:3"; a `shift` column in results.csv
    ood = ["gaussian_noise", "npz:/data/svhn.npz"]  # unknown-input sets: built-in synthetic
                                   # ones or an npz image array; AUROC/FPR95 in ood.csv

    [[model]]                      # one table per architecture
    arch = "shufflenetv2"
    width = 0.25

    [train]                        # any quantcal.train.TrainConfig field, and:
    epochs = 30
    objectives = ["ce", {name = "focal", gamma = 3}]   # an axis: one model per objective

    [quant]
    precisions = ["fp32", "W8A8", "W4A8", "W4A4"]
    observers = ["minmax"]         # range estimators
    ptq_calib_samples = 1          # disjoint range-calibration samples (a source of variance)
    first_last_8bit = false
    plans = false                  # true, or a table: calibration-budgeted mixed precision
                                   # (plan:calib) beside an accuracy-only plan (plan:accuracy)
    attribution = false            # true, or a table: which layers decide calibration
                                   # (granularity = "layer"|"block", samples = 1000,
                                   # precisions = ["W4A4"]; default every quantized one)
    methods = ["ptq"]              # quantization methods: "ptq", "cle_bc", "adaround", "qat"
    sequential = false             # activation ranges set in graph order on the quantized net
    weight_granularity = "channel" # or "tensor": one weight scale per layer
    matmul_bits = 8                # attention's products Q·Kᵀ, A·V at 8 bits (default: each
                                   # precision's activation bits)
    method_options = {}            # per method, e.g. {adaround = {iterations = 500}}

    [recal]
    methods = ["none", "temperature", "temperature_fp32", "vector", "histogram", "isotonic"]
    fit_on = "auto"                # "val", "test_crossfit" or "auto" (see RECAL_FIT)

    [metrics]
    n_bins = 15
    bootstrap = 1000
    level = 0.95
    target_risk = 0.05             # abstention threshold: error rate among accepted images

    [report]                       # the deployer's budget behind each verdict
                                   # (quantcal.findings.verdicts)
    max_accuracy_drop = 0.01       # top-1 accuracy lost vs fp32 (0.01 = 1 point)
    max_ece_rise = 0.01            # ECE above fp32's (as is; or after the best recalibrator)
    max_ece = 0.05                 # ECE at all, whatever fp32's: a cell as miscalibrated as an
                                   # over-confident fp32 reads "as trustworthy as fp32, which
                                   # is not" (1.0 turns this off)

``[train] objectives`` lists training objectives (names or tables, see
:mod:`quantcal.training.objectives`); each trains its own model, which then goes through every
precision, range estimator and recalibrator. Default ``["ce"]``; a single ``objective = ...`` is
the same as a one-item list.

Unknown keys are an error naming the closest valid key. Precisions are stored in canonical form
(``"fp32"``, ``"W4A8"``), so ``["W4A4", "w4a4"]`` is refused as a duplicate.

``threads`` pins PyTorch's CPU thread count for the whole run and enters the cache keys: float
sums are ordered differently with another thread count, so a CPU study trained with 1 thread and
one trained with 2 are different experiments (the demo's W4A4 MobileOne accuracy moved from 32 %
to 19 % between them). A study whose numbers are quoted pins it; ``--threads`` overrides it.
``isa`` ("avx2" or "avx512") pins the instruction set of PyTorch's CPU kernels the same way
(:mod:`quantcal._isa`), so its numbers are the same on any x86-64 processor that has it; it
enters the cache keys as the instruction set that actually ran.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from quantcal._registry import closest

__all__ = ["LAYOUT", "TOP_TABLES", "apply_overrides", "unknown_key"]

# section -> {toml key: StudyConfig field}
LAYOUT: dict[str | None, dict[str, str]] = {
    None: {"name": "name", "seeds": "seeds", "threads": "threads", "isa": "isa"},
    "data": {
        "datasets": "datasets",
        "val_size": "val_size",
        "train_size": "train_size",
        "ptq_calib_size": "ptq_calib_size",
        "mean": "mean",
        "std": "std",
        "transform": "transform",
        "shifts": "shifts",
        "ood": "ood",
    },
    "quant": {
        "precisions": "precisions",
        "observers": "observers",
        "ptq_calib_samples": "ptq_calib_samples",
        "first_last_8bit": "first_last_8bit",
        "plans": "plans",
        "attribution": "attribution",
        "methods": "quant_methods",
        "method_options": "method_options",
        "sequential": "sequential",
        "weight_granularity": "weight_granularity",
        "matmul_bits": "matmul_bits",
    },
    "recal": {"methods": "recal", "fit_on": "recal_fit"},
    "metrics": {
        "n_bins": "n_bins",
        "bootstrap": "bootstrap",
        "level": "level",
        "target_risk": "target_risk",
        "eval_batch_size": "eval_batch_size",
    },
    "report": {
        "max_accuracy_drop": "max_accuracy_drop",
        "max_ece_rise": "max_ece_rise",
        "max_ece": "max_ece",
    },
}
TOP_TABLES = ("data", "model", "train", "quant", "recal", "metrics")


def unknown_key(where: str, key: str, valid: list[str]) -> ValueError:
    """The error for an unknown ``key`` in ``where``: the closest valid key, then all of them."""
    hint = closest(key, valid)
    did = f" Did you mean {hint!r}?" if hint else ""
    return ValueError(
        f"unknown key {key!r} in {where}.{did} Valid keys: {', '.join(sorted(valid))}."
    )


def apply_overrides(raw: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Set dotted keys (``train.epochs``, ``data.datasets``) in a nested study dict (a copy)."""
    out = json.loads(json.dumps(raw))
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {dotted!r}: {p!r} is not a table")
        node[parts[-1]] = value
    return out
