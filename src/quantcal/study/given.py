"""Predictions given from outside a study: a logits file (``npz`` of logits and labels) or an ONNX
model (fp32, or int8 in QDQ or QOperator form) run by onnxruntime, each loaded and checked
against the dataset before anything is scored (``quantcal eval``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["OnnxModel", "load_logits_npz", "load_onnx_checked", "onnx_logits"]


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
