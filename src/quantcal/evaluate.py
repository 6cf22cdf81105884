"""Scoring predictions that already exist: logits computed anywhere, or an ONNX model (fp32, or
int8 in QDQ or QOperator form, e.g. from onnxruntime's ``quantize_static``) run by onnxruntime.

Both end as a pair of (logits, labels) for the recalibration split and the test split, scored
exactly as a study cell is (``study._score``: every recalibrator, metrics with bootstrap
intervals) and written as ``results.csv``, ``details.json`` and ``report.html``. Nothing is
trained or quantized here, so the paired differences against an fp32 model are left empty.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

__all__ = ["evaluate_logits", "load_logits_npz", "onnx_logits"]


def load_logits_npz(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, labels)`` from an npz holding ``logits`` (N, C) floats and ``labels`` (N,)
    integers; ValueError naming the file and what is wrong otherwise."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"logits file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as z:
            if not {"logits", "labels"} <= set(z.files):
                raise ValueError(
                    f"{path} needs arrays 'logits' (N, C) and 'labels' (N,); it has {z.files}. "
                    "Write it with numpy.savez(path, logits=..., labels=...)"
                )
            logits, labels = z["logits"], z["labels"]
    except ValueError:
        raise
    except Exception as exc:
        raise ValueError(f"{path} cannot be read as an npz archive ({exc})") from exc
    if logits.ndim != 2 or not np.issubdtype(logits.dtype, np.floating):
        raise ValueError(
            f"{path}: logits must be floats of shape (N, C), got {logits.dtype} {logits.shape}"
        )
    if labels.shape != (logits.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"{path}: labels must be integers of shape ({logits.shape[0]},), got {labels.dtype} "
            f"{labels.shape}"
        )
    return torch.from_numpy(np.ascontiguousarray(logits)), torch.from_numpy(labels.astype(np.int64))


def onnx_logits(path: str | Path, split: Any, batch_size: int = 256) -> torch.Tensor:
    """Logits of an ONNX image classifier on a data split (its normalised float32 NCHW batches)
    through onnxruntime (CPU, the graph optimisations a deployment would use)."""
    from quantcal.quant import run_onnx

    xs = torch.cat([x for x, _ in split.batches(batch_size)])
    return run_onnx(path, xs, batch_size=batch_size, optimize=True).float()


def evaluate_logits(
    val: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    out_dir: str | Path,
    *,
    dataset: str,
    model: str,
    methods: Sequence[str] = ("none", "temperature"),
    recal_fit: str = "val",
    n_bins: int = 15,
    bootstrap: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    notes: Sequence[str] = (),
    force: bool = False,
    report: bool = True,
) -> Path:
    """Score ``test`` logits raw and after each recalibrator fitted on ``val`` (or cross-fitted
    on ``test`` with ``recal_fit="test_crossfit"``); write results.csv, details.json and
    report.html into ``out_dir`` (which must be new, empty or quantcal's; ``force`` adopts
    another). Returns the folder."""
    from quantcal import _runfolder, recal
    from quantcal._io import atomic_write_json, atomic_write_text
    from quantcal.study import (
        Group,
        QuantCell,
        _score,
        environment_record,
        reliability_details,
        write_csv,
    )
    from quantcal.studyconfig import ModelSpec, content_hash

    allowed = recal.available()
    bad = [m for m in methods if m not in allowed]
    if bad:
        raise ValueError(f"unknown recalibration method(s) {bad}; choose from {allowed}")
    if recal_fit not in ("val", "test_crossfit"):
        raise ValueError(f"recal_fit must be 'val' or 'test_crossfit', got {recal_fit!r}")
    if val[0].shape[1] != test[0].shape[1]:
        raise ValueError(
            f"val logits have {val[0].shape[1]} classes but test logits {test[0].shape[1]}"
        )
    out = _runfolder.claim(out_dir, force=force)
    config = SimpleNamespace(n_bins=n_bins, bootstrap=bootstrap, level=level, recal_fit=recal_fit)
    cell = QuantCell(Group(dataset, ModelSpec(arch=model), seed), "given", None, None)
    lg = {
        "val_logits": val[0],
        "val_labels": val[1],
        "test_logits": test[0],
        "test_labels": test[1],
    }
    rows = []
    for m in methods:
        row = _score(config, cell, m, lg, lg, None, list(notes), recal_fit)
        for k in ("ece_diff_vs_fp32", "ece_diff_vs_fp32_lo", "ece_diff_vs_fp32_hi"):
            row[k] = None  # no fp32 model to compare with
        row["row_id"] = content_hash({"model": model, "dataset": dataset, "recal": m})
        rows.append(row)
    write_csv(out, rows)
    atomic_write_json(out / "details.json", reliability_details(rows))
    atomic_write_json(out / "env.json", environment_record("cpu"))
    atomic_write_text(
        out / "config.toml",
        f'# scored with quantcal eval: no study\nmodel = "{model}"\ndataset = "{dataset}"\n'
        f'recal = {list(methods)}\nrecal_fit = "{recal_fit}"\nn_bins = {n_bins}\n'
        f"bootstrap = {bootstrap}\n",
    )
    if report:
        from quantcal import report as report_mod

        report_mod.write_report(out)
    return out
