"""Scoring predictions that already exist: logits computed anywhere, or an ONNX model (fp32, or
int8 in QDQ or QOperator form, e.g. from onnxruntime's ``quantize_static``) run by onnxruntime.

Both end as a pair of (logits, labels) for the recalibration split and the test split, scored
exactly as a study cell is (``quantcal.study.score.score``: every recalibrator, metrics with
bootstrap intervals) and written as ``results.csv``, ``details.json`` and ``report.html``. Given an
fp32 reference and one or more quantized models' logits on the same images, each quantized model
gets the paired differences vs fp32, a verdict and the why-section, as in a study;
:func:`verdict` gives the verdict from three arrays.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

__all__ = [
    "OnnxModel",
    "check_given",
    "check_predictions",
    "evaluate_logits",
    "load_logits_npz",
    "load_onnx_checked",
    "onnx_logits",
    "recalibrated_given_logits",
    "score_predictions",
    "verdict",
]


from quantcal.study.given import OnnxModel, load_logits_npz, load_onnx_checked, onnx_logits


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
    from quantcal.calibration import metrics

    try:  # metrics refuse what they cannot score as logits (probabilities, say)
        metrics.accuracy(logits, labels)
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}") from None


def _shape_of(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} {tuple(x.shape)}"
    return type(x).__name__


Pair = tuple[torch.Tensor, torch.Tensor]


def _check_same_images(reference: tuple[Pair, Pair], name: str, given: tuple[Pair, Pair]) -> None:
    """A quantized model's val and test labels must be the reference's, in the same order: the
    paired differences compare the two models image by image."""
    for split, (ref, q) in zip(("val", "test"), zip(reference, given, strict=True), strict=True):
        if ref[1].shape != q[1].shape or not torch.equal(ref[1], q[1]):
            raise ValueError(
                f"the {split} labels of {name!r} differ from the fp32 reference's: give logits "
                "of the same images in the same order (the differences vs fp32 are paired image "
                "by image)"
            )
        if ref[0].shape[1] != q[0].shape[1]:
            raise ValueError(
                f"{name!r} has {q[0].shape[1]} classes but the fp32 reference {ref[0].shape[1]}"
            )


def check_given(
    val: Pair,
    test: Pair,
    quantized: Mapping[str, tuple[Pair, Pair]] | None = None,
    *,
    sources: tuple[str, str] = ("the val logits", "the test logits"),
) -> None:
    """Every input of :func:`score_predictions` checked (ValueError naming it): each pair by
    :func:`check_predictions`, each quantized model named (not fp32) and given on the reference's
    images in the same order."""
    check_predictions(val, test, sources=sources)
    for name, (qv, qt) in (quantized or {}).items():
        if not isinstance(name, str) or not name.strip() or name.lower() == "fp32":
            raise ValueError(f"a quantized model needs a name other than fp32, got {name!r}")
        check_predictions(qv, qt, sources=(f"{name}'s val logits", f"{name}'s test logits"))
        _check_same_images((val, test), name, (qv, qt))


def score_predictions(
    val: Pair,
    test: Pair,
    *,
    quantized: Mapping[str, tuple[Pair, Pair]] | None = None,
    dataset: str = "given",
    model: str = "given logits",
    methods: Sequence[str] = ("none", "temperature"),
    recal_fit: str = "val",
    n_bins: int = 15,
    bootstrap: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    notes: Sequence[str] = (),
    sources: tuple[str, str] = ("the val logits", "the test logits"),
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Result rows (as a study writes them) and why-diagnostics of predictions given as logits.

    Without ``quantized``, ``val``/``test`` are one model's, scored as precision ``"given"``.
    With it, they are the fp32 reference and each entry ``name -> (val, test)`` a quantized
    model's predictions on the same images (its precision column is ``name``, e.g. "W8A8" or
    "int8"): every row then carries the paired ECE difference vs fp32 with the same
    recalibrator, ``temperature_fp32`` (the reference's temperature reused) is available, and the
    diagnostics (``diagnose.diagnose``: gap decomposition, prediction flips, NLL vs T) explain
    each quantized model against the reference. Every input is checked first (ValueError naming
    it: :func:`check_predictions`, same labels in the same order)."""
    from quantcal.calibration import diagnose, recal
    from quantcal.study.cells import Group, QuantCell
    from quantcal.study.config import REUSE_FP32_TEMPERATURE, ModelSpec, content_hash
    from quantcal.study.score import score as _score

    allowed = recal.available() + ([REUSE_FP32_TEMPERATURE] if quantized else [])
    bad = [m for m in methods if m not in allowed]
    if bad:
        extra = "" if quantized else f" ({REUSE_FP32_TEMPERATURE} needs quantized predictions)"
        raise ValueError(f"unknown recalibration method(s) {bad}; choose from {allowed}{extra}")
    if recal_fit not in ("val", "test_crossfit"):
        raise ValueError(f"recal_fit must be 'val' or 'test_crossfit', got {recal_fit!r}")
    check_given(val, test, quantized, sources=sources)
    config = SimpleNamespace(n_bins=n_bins, bootstrap=bootstrap, level=level, recal_fit=recal_fit)
    group = Group(dataset, ModelSpec(arch=model), seed)
    ref = {
        "val_logits": val[0],
        "val_labels": val[1],
        "test_logits": test[0],
        "test_labels": test[1],
    }
    subject = "the fp32 model" if quantized else "the model"
    found = diagnose.prediction_notes(
        val[0], val[1], test[0], test[1], methods=methods, recal_fit=recal_fit, subject=subject
    )
    base_notes = [*notes, *(n for n in found if n not in notes)]
    cells = [(QuantCell(group, "fp32" if quantized else "given", None, None), ref)]
    for name, (qv, qt) in (quantized or {}).items():
        lg = {"val_logits": qv[0], "val_labels": qv[1], "test_logits": qt[0], "test_labels": qt[1]}
        cells.append((QuantCell(group, name, "given", 0, "given"), lg))
    rows, diagnostics = [], []
    for cell, lg in cells:
        for m in methods:
            if m == REUSE_FP32_TEMPERATURE and cell.is_fp32:
                continue  # the reference's own temperature is its "temperature" row
            row = _score(config, cell, m, lg, ref, None, list(base_notes), recal_fit)
            if not quantized:
                for k in ("ece_diff_vs_fp32", "ece_diff_vs_fp32_lo", "ece_diff_vs_fp32_hi"):
                    row[k] = None  # no fp32 model to compare with
            row["row_id"] = content_hash(
                {"model": model, "dataset": dataset, "precision": cell.precision, "recal": m}
            )
            rows.append(row)
        if not cell.is_fp32:
            split = "test" if recal_fit == "test_crossfit" else "val"
            d = diagnose.diagnose(
                ref["test_logits"],
                lg["test_logits"],
                lg["test_labels"],
                lg[f"{split}_logits"],
                lg[f"{split}_labels"],
                fit_split=split,
            )
            d.update(
                dataset=dataset,
                arch=model,
                width=group.model.width,
                objective=group.objective,
                seed=seed,
                precision=cell.precision,
            )
            diagnostics.append(d)
    return rows, diagnostics


def evaluate_logits(
    val: Pair,
    test: Pair,
    out_dir: str | Path,
    *,
    dataset: str,
    model: str,
    quantized: Mapping[str, tuple[Pair, Pair]] | None = None,
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
    budget: Mapping[str, float] | None = None,
) -> Path:
    """Score predictions (:func:`score_predictions`: one model's ``val``/``test`` logits, or an
    fp32 reference and ``quantized`` models' logits) and write results.csv, details.json (with
    the why-diagnostics) and report.html into ``out_dir`` (new, empty or quantcal's; ``force``
    adopts another). Every input is checked before anything is written. ``budget`` (the
    [report] keys, e.g. ``{"max_ece_rise": 0.02}``) sets the verdicts' budget. Returns the
    folder."""
    from quantcal._io import atomic_torch_save, atomic_write_json, atomic_write_text
    from quantcal.store import runfolder as _runfolder
    from quantcal.study.environment import environment_record
    from quantcal.study.results import reliability_details, write_csv

    rows, diagnostics = score_predictions(
        val,
        test,
        quantized=quantized,
        dataset=dataset,
        model=model,
        methods=methods,
        recal_fit=recal_fit,
        n_bins=n_bins,
        bootstrap=bootstrap,
        level=level,
        seed=seed,
        notes=notes,
        sources=sources,
    )
    out = _runfolder.claim(out_dir, force=force)
    models = {"fp32" if quantized else "given": (val, test), **(quantized or {})}
    atomic_torch_save(
        {
            "meta": {
                "dataset": dataset,
                "model": model,
                "methods": list(methods),
                "recal_fit": recal_fit,
                "seed": seed,
                "reference": bool(quantized),
            },
            "models": {
                name: {
                    "val_logits": v[0],
                    "val_labels": v[1],
                    "test_logits": t[0],
                    "test_labels": t[1],
                }
                for name, (v, t) in models.items()
            },
        },
        out / GIVEN_FILE,
    )
    write_csv(out, rows)
    details = reliability_details(rows)
    if diagnostics:
        details["diagnostics"] = diagnostics
    atomic_write_json(out / "details.json", details)
    atomic_write_json(out / "env.json", environment_record("cpu"))
    names = ["fp32", *quantized] if quantized else []
    atomic_write_text(
        out / "config.toml",
        f'# scored with quantcal eval: no study\nmodel = "{model}"\ndataset = "{dataset}"\n'
        + (f"precisions = {names}\n" if names else "")
        + f'recal = {list(methods)}\nrecal_fit = "{recal_fit}"\nn_bins = {n_bins}\n'
        f"bootstrap = {bootstrap}\n"
        + (
            "\n[report]\n" + "".join(f"{k} = {float(v)!r}\n" for k, v in budget.items())
            if budget
            else ""
        ),
    )
    if report:
        from quantcal.report import html as report_mod

        report_mod.write_report(out)
    return out


#: The predictions an eval of given logits or an ONNX model keeps in its folder, so that
#: ``quantcal compare`` can rebuild every recalibrated cell (a study keeps them in its cache).
GIVEN_FILE = "given_logits.pt"


def recalibrated_given_logits(out_dir: str | Path) -> dict[tuple, tuple[Any, Any]]:
    """Every row's recalibrated test logits of an eval of given predictions, keyed by the row
    identity as results.csv writes it (as ``study.recalibrated_test_logits`` does for a run):
    each recalibrator refitted exactly as the row was scored. ValueError when the folder keeps
    no predictions."""
    from quantcal.calibration.recal_splits import crossfit_folds, recalibrate
    from quantcal.study.config import REUSE_FP32_TEMPERATURE

    path = Path(out_dir) / GIVEN_FILE
    if not path.is_file():
        raise ValueError(f"{out_dir} keeps no given predictions ({GIVEN_FILE})")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        meta, models = saved["meta"], saved["models"]
    except Exception as exc:
        raise ValueError(f"{path} cannot be read ({type(exc).__name__}: {exc})") from None
    names = list(models)
    ref = models[names[0]]
    out: dict[tuple, tuple[Any, Any]] = {}
    for name in names:
        lg = models[name]
        is_ref = name == names[0]
        labels = lg["test_labels"]
        for method in meta["methods"]:
            if method == REUSE_FP32_TEMPERATURE and is_ref:
                continue
            folds = None
            if meta["recal_fit"] == "test_crossfit" and method != "none":
                folds = crossfit_folds(labels, meta["seed"])
            z, _ = recalibrate(method, lg, lg if is_ref else ref, [], None, folds)
            key = (
                meta["dataset"],
                meta["model"],
                1.0,
                "ce",
                meta["seed"],
                name,
                "-" if is_ref else "given",
                "-" if is_ref else "given",
                -1 if is_ref else 0,
                method,
            )
            out[key] = (z, labels)
    return out


def verdict(
    fp32_logits: torch.Tensor,
    quantized_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    val: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    methods: Sequence[str] = ("none", "temperature", "temperature_fp32"),
    budget: Any = None,
    n_bins: int = 15,
    bootstrap: int = 1000,
    seed: int = 0,
) -> Any:
    """The deployer's verdict on a quantized model from logits alone (``verdicts.Verdict``:
    ``.outcome``, ``.reason``, the numbers behind it).

    ``fp32_logits`` and ``quantized_logits`` are the two models' test logits (N, C) on the same
    images, ``labels`` their labels (N,). ``val = (fp32_val_logits, quantized_val_logits,
    val_labels)`` fits the recalibrators on held-out images; without it they are cross-fitted on
    two stratified halves of the test images (each half recalibrated by a fit on the other).
    ``budget`` is a ``verdicts.Budget`` (default: 1 point of accuracy and of ECE vs fp32, and
    ECE at most 5 %)::

        v = quantcal.verdict(fp32_logits, int8_logits, labels)
        print(v.outcome, "-", v.reason)
    """
    from quantcal.findings import verdicts as verdicts_mod

    labels = torch.as_tensor(labels)
    if val is None:
        ref_val, q_val, fit = (fp32_logits, labels), (quantized_logits, labels), "test_crossfit"
    else:
        if len(val) != 3:
            raise ValueError("val must be (fp32_val_logits, quantized_val_logits, val_labels)")
        vl = torch.as_tensor(val[2])
        ref_val, q_val, fit = (val[0], vl), (val[1], vl), "val"
    rows, _ = score_predictions(
        ref_val,
        (fp32_logits, labels),
        quantized={"quantized": (q_val, (quantized_logits, labels))},
        methods=methods,
        recal_fit=fit,
        n_bins=n_bins,
        bootstrap=bootstrap,
        seed=seed,
        sources=("the fp32 val logits", "the fp32 test logits"),
    )
    found = verdicts_mod.verdicts(rows, budget)
    if not found:
        raise ValueError("no verdict: the rows of the two models could not be compared")
    return found[0]
