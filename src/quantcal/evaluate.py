"""Scoring predictions that already exist: logits computed anywhere, or an ONNX model (fp32, or
int8 in QDQ or QOperator form, e.g. from onnxruntime's ``quantize_static``) run by onnxruntime.

Both end as a pair of (logits, labels) for the recalibration split and the test split, scored
exactly as a study cell is (``study._score``: every recalibrator, metrics with bootstrap
intervals) and written as ``results.csv``, ``details.json`` and ``report.html``. Nothing is
trained or quantized here, so the paired differences against an fp32 model are left empty.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

__all__ = [
    "OnnxModel",
    "check_predictions",
    "evaluate_logits",
    "load_logits_npz",
    "load_onnx_checked",
    "onnx_logits",
]


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


@dataclass(frozen=True)
class OnnxModel:
    """An ONNX image classifier checked against a dataset by :func:`load_onnx_checked`, with its
    onnxruntime session (CPU, graph optimisation "all", what a deployment runs)."""

    path: Path
    session: Any = field(repr=False)
    #: The input's shape as declared: ints for fixed dimensions, names (or None) for symbolic.
    input_shape: tuple[Any, ...]
    #: The input's element type, e.g. "tensor(float)".
    input_type: str
    #: The batch size it was exported with, or None when any batch size runs.
    fixed_batch: int | None
    num_classes: int


def _shape_text(shape: Sequence[Any]) -> str:
    return "(" + ", ".join(str(d) if isinstance(d, int) else str(d or "?") for d in shape) + ")"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _file_kind(path: Path) -> str:
    """What a file that onnxruntime could not load looks like, from its first bytes."""
    with open(path, "rb") as fh:
        head = fh.read(512)
    if head.startswith(b"PK\x03\x04"):
        return (
            "a zip archive (a PyTorch checkpoint saved by torch.save is one): give it as "
            "--checkpoint with --model, or export the model with torch.onnx.export"
        )
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return (
            "a Python pickle (an old-style torch.save checkpoint?): give it as --checkpoint "
            "with --model, or export the model with torch.onnx.export"
        )
    if head.startswith(b"\x89HDF"):
        return "an HDF5 file (a Keras model?): convert it to ONNX first (e.g. with tf2onnx)"
    if b"\x00" not in head:
        try:
            head.decode("utf-8")
        except UnicodeDecodeError:
            pass
        else:
            return "a text file, not a binary ONNX model: give the .onnx file the export wrote"
    return (
        "not a complete ONNX model (a truncated or interrupted export?): export it again with "
        "torch.onnx.export"
    )


def _session(path: Path, what: str) -> Any:
    try:
        import onnxruntime as ort
    except ImportError:
        raise ValueError(
            f"{what} needs the onnxruntime package; install the optional extra: "
            "pip install quantcal[onnx]"
        ) from None
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ValueError(
            f"{what}: {path} cannot be loaded as an ONNX model ({_first_line(exc)}); it looks "
            f"like {_file_kind(path)}"
        ) from None


def load_onnx_checked(path: str | Path, splits: Any, *, what: str = "--onnx") -> OnnxModel:
    """Open the ONNX model at ``path`` and check it against dataset ``splits`` (as preprocessed:
    mean/std or a transform) before anything is scored. ValueError (FileNotFoundError for a
    missing path) naming ``what``, the file and what to do when: it is not a readable file, not
    an ONNX model (a text file, a torch checkpoint, a truncated export); it takes more than one
    input, a non-float input, or not (N, C, H, W) with fixed C, H, W equal to the dataset's
    (symbolic dimensions are fine); its output is not (N, classes) with the dataset's number of
    classes; or onnxruntime cannot run it on two of the dataset's images. A fixed batch size is
    fine: :func:`onnx_logits` runs it in chunks of that size."""
    from quantcal._inputs import check_input_file
    from quantcal.quant.export import ONNX_FLOAT_INPUTS, onnx_fixed_batch, run_onnx_session

    p = check_input_file(path, what)
    session = _session(p, what)
    inputs, outputs = session.get_inputs(), session.get_outputs()
    name = getattr(splits, "name", "the dataset")
    if len(inputs) != 1 or not outputs:
        raise ValueError(
            f"{what}: the ONNX model {p.name} takes {len(inputs)} inputs "
            f"({', '.join(i.name for i in inputs)}) and gives {len(outputs)} outputs; quantcal "
            "feeds one image batch (N, C, H, W) and reads one logits output (N, classes)"
        )
    inp = inputs[0]
    if inp.type not in ONNX_FLOAT_INPUTS:
        raise ValueError(
            f"{what}: the ONNX model {p.name} takes {inp.type} inputs; quantcal feeds float "
            "images already preprocessed ((x / 255 - mean) / std, or --transform): export the "
            "model with a float32 input and its preprocessing outside the graph"
        )
    x = splits.test.normalize(splits.test.images[:2])
    given = "(B, " + ", ".join(str(int(d)) for d in x.shape[1:]) + ")"
    if splits.transform_name:
        given += f" after --transform {splits.transform_name}"
    shape = tuple(inp.shape)
    if (
        len(shape) != 4
        or x.dim() != 4
        or any(
            isinstance(m, int) and m > 0 and m != int(d)
            for m, d in zip(shape[1:], x.shape[1:], strict=False)
        )
    ):
        fix = (
            f"check that --transform {splits.transform_name} returns what the model takes"
            if splits.transform_name
            else "give --transform MODULE:FUNCTION that resizes/converts the dataset's uint8 "
            "images to what the model takes, or the dataset the model was trained on"
        )
        raise ValueError(
            f"{what}: the ONNX model {p.name} takes inputs of shape {_shape_text(shape)} but "
            f"dataset {name} gives {given}: {fix}"
        )
    k = int(splits.num_classes)
    out_shape = tuple(outputs[0].shape)
    declared = out_shape[1] if len(out_shape) == 2 else None
    if len(out_shape) not in (0, 2) or (isinstance(declared, int) and declared != k):
        got = f"{declared} classes" if declared is not None else f"shape {_shape_text(out_shape)}"
        raise ValueError(
            f"{what}: the ONNX model {p.name} outputs {got} but dataset {name} has {k} classes: "
            f"give the dataset the model was trained on (or a model trained on {name})"
        )
    try:
        z = run_onnx_session(session, x, batch_size=2)
    except Exception as exc:
        raise ValueError(
            f"{what}: onnxruntime cannot run {p.name} on images of dataset {name} {given} "
            f"({_first_line(exc)}): check that the model takes this data's images"
        ) from None
    if z.ndim != 2 or z.shape != (x.shape[0], k):
        raise ValueError(
            f"{what}: the ONNX model {p.name} gives outputs of shape {tuple(z.shape)} for "
            f"{x.shape[0]} images, but quantcal needs logits ({x.shape[0]}, {k}), one per class "
            f"of dataset {name}: give the dataset the model was trained on, or export the logits"
        )
    return OnnxModel(
        path=p,
        session=session,
        input_shape=shape,
        input_type=inp.type,
        fixed_batch=onnx_fixed_batch(shape),
        num_classes=k,
    )


def onnx_logits(model: OnnxModel | str | Path, split: Any, batch_size: int = 256) -> torch.Tensor:
    """Logits of an ONNX image classifier on a data split (its preprocessed float32 NCHW
    batches) through onnxruntime (CPU, the graph optimisations a deployment would use).
    ``model`` is best the :class:`OnnxModel` of :func:`load_onnx_checked`; a path is run as it
    is. A model exported with a fixed batch size runs in chunks of that size."""
    from quantcal.quant import run_onnx
    from quantcal.quant.export import run_onnx_session

    xs = torch.cat([x for x, _ in split.batches(batch_size)])
    if isinstance(model, OnnxModel):
        return torch.from_numpy(run_onnx_session(model.session, xs, batch_size=batch_size))
    return run_onnx(model, xs, batch_size=batch_size, optimize=True).float()


def check_predictions(
    val: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    *,
    sources: tuple[str, str] = ("the val logits", "the test logits"),
) -> None:
    """ValueError naming the input (``sources``, e.g. the files they came from) unless each
    ``(logits, labels)`` pair is finite float logits (N, C), C >= 2, that metrics accept as logits
    (not probabilities), with integer labels (N,) in [0, C), and both pairs have the same C.
    :func:`evaluate_logits` runs it first; a caller can run it before creating any folder."""
    for (logits, labels), what in zip((val, test), sources, strict=True):
        _check_pair(logits, labels, what)
    if val[0].shape[1] != test[0].shape[1]:
        raise ValueError(
            f"{sources[0]} have {val[0].shape[1]} classes but {sources[1]} {test[0].shape[1]}: "
            "give predictions of the same model on the same task"
        )


def _check_pair(logits: Any, labels: Any, what: str) -> None:
    """ValueError naming ``what`` unless logits are finite floats (N, C), C >= 2, and labels
    integers (N,) in [0, C)."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"{what} must be a float tensor (N, C), got {_shape_of(logits)}")
    n, k = logits.shape
    if n == 0 or k < 2:
        raise ValueError(f"{what} must hold at least one row and two classes, got ({n}, {k})")
    if not isinstance(labels, torch.Tensor) or labels.shape != (n,) or labels.is_floating_point():
        raise ValueError(f"the labels of {what} must be integers ({n},), got {_shape_of(labels)}")
    bad = int((~torch.isfinite(logits)).any(1).sum())
    if bad:
        raise ValueError(
            f"{what} hold NaN or infinite values in {bad} of {n} rows: the model's outputs are "
            "broken (check its inputs and export); nothing can be scored"
        )
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= k:
        raise ValueError(
            f"the labels of {what} run from {lo} to {hi} but the logits have {k} columns "
            f"(classes 0 to {k - 1}): the labels and the logits belong to different tasks"
        )
    from quantcal import metrics

    try:  # metrics refuse what they cannot score as logits (probabilities, say)
        metrics.accuracy(logits, labels)
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}") from None


def _shape_of(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} {tuple(x.shape)}"
    return type(x).__name__


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
    sources: tuple[str, str] = ("the val logits", "the test logits"),
) -> Path:
    """Score ``test`` logits raw and after each recalibrator fitted on ``val`` (or cross-fitted
    on ``test`` with ``recal_fit="test_crossfit"``); write results.csv, details.json and
    report.html into ``out_dir`` (which must be new, empty or quantcal's; ``force`` adopts
    another). Returns the folder.

    Checked before anything is written: each pair is finite float logits (N, C) with integer
    labels (N,) in [0, C), both with the same C (a ValueError naming ``sources``, e.g. the
    files they came from). ``notes`` start every row's notes column, followed by
    :func:`quantcal.diagnose.prediction_notes` (near chance, an extreme temperature, per-class
    recalibrators on few images, val identical to test)."""
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
    check_predictions(val, test, sources=sources)
    from quantcal import diagnose

    found = diagnose.prediction_notes(
        val[0], val[1], test[0], test[1], methods=methods, recal_fit=recal_fit
    )
    notes = [*notes, *(n for n in found if n not in notes)]
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
