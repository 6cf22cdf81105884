"""The study-scope stages: the sections of ``details.json``, each a function of the run's
context and its plan (every group with its cells) that reads the cache and returns one section.

``details.json`` holds what does not fit a tidy CSV row: each row's reliability bins (from the
rows), then one key per entry of :data:`SECTIONS`, in that order. A new section (a new study
axis's per-cell records, a new contrast) is one function and one line in :data:`SECTIONS`; the
report reads it by its name. The ablation and repair contrasts plug in this way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quantcal._io import atomic_write_json
from quantcal.study.cells import attribution_cells, group_identity
from quantcal.study.keys import logits_key
from quantcal.study.results import reliability_details, write_csv
from quantcal.training import images as _images

if TYPE_CHECKING:  # pragma: no cover
    from quantcal.study.context import Context

__all__ = ["SECTIONS", "Section", "write_results"]

#: A section: ``fn(ctx, plan) -> list of records``.
Section = Callable[..., list[dict[str, Any]]]


def _logits_records(ctx: Context, plan) -> Iterator[tuple[Any, Any, dict[str, Any]]]:
    """(group, cell, logits record) of every quantized cell whose logits are cached."""
    for g, cells in plan:
        tkey = ctx.train_key(g)
        for cell in cells[1:]:
            path = ctx.cache / "logits" / f"{logits_key(ctx.config, cell, tkey)}.json"
            lm = ctx.store.read_json(path)
            if lm is not None:
                yield g, cell, lm


def _inspect(ctx: Context, plan) -> list[dict[str, Any]]:
    """Per quantized cell, the per-layer inspection its logits stage recorded."""
    return [
        {
            **group_identity(g),
            "precision": cell.precision,
            "observer": cell.observer,
            "method": cell.method,
            "ptq_sample": cell.sample,
            "layers": lm["inspect"],
        }
        for g, cell, lm in _logits_records(ctx, plan)
        if lm.get("inspect")
    ]


def _training(ctx: Context, plan) -> list[dict[str, Any]]:
    """Per group, its training history and time (a trained model's ``meta.json``)."""
    out = []
    for g, _cells in plan:
        m = ctx.store.read_json(ctx.cache / "train" / ctx.train_key(g) / "meta.json")
        if m is not None:
            out.append(
                {**group_identity(g), "history": m.get("history", []), "seconds": m.get("seconds")}
            )
    return out


def _plans(ctx: Context, plan) -> list[dict[str, Any]]:
    """Per plan cell, the search's record (absent from details.json when there is none)."""
    return [
        {**group_identity(g), "precision": cell.precision, **lm["plan"]}
        for g, cell, lm in _logits_records(ctx, plan)
        if lm.get("plan")
    ]


def _stage_images(ctx: Context, plan) -> list[dict[str, Any]]:
    """Per group, which images its stages read (:func:`quantcal.study.cells.stage_images`):
    ``recal_fit`` (val or test_crossfit), ``search`` (what plans and attribution read: val or
    test_half), ``plans_scored_on`` (test, or test_other_half) and ``why``."""
    out = []
    for g, _cells in plan:
        p = ctx.stage_images(g)
        halved = p.search == _images.TEST_HALF
        out.append(
            {
                **group_identity(g),
                "recal_fit": p.recal,
                "search": p.search,
                "plans_scored_on": _images.REPORT_HALF if halved else "test",
                "why": p.describe(0, stage="plan search and attribution")["why"],
            }
        )
    return out


def _diagnostics(ctx: Context, plan) -> list[dict[str, Any]]:
    """:func:`quantcal.calibration.diagnose.diagnose` of every quantized cell of the first range
    estimator and range-calibration sample against its fp32 cell, from the cached logits (a cell
    whose logits are not cached, e.g. a failed one, is skipped)."""
    from quantcal.calibration import diagnose

    cfg = ctx.config
    out = []
    first_observer = cfg.observers[0]
    for g, cells in plan:
        tkey = ctx.train_key(g)
        fp32 = ctx.cached_logits(cells[0], tkey)
        if fp32 is None:
            continue
        fit = ctx.recal_fit(g)[0]
        split = "test" if fit == "test_crossfit" else "val"
        for cell in cells[1:]:
            if (
                cell.observer != first_observer
                or cell.sample != 0
                or cell.method != cfg.quant_methods[0]
            ):
                continue
            q = ctx.cached_logits(cell, tkey)
            if q is None:
                continue
            d = diagnose.diagnose(
                fp32["test_logits"],
                q["test_logits"],
                q["test_labels"],
                q[f"{split}_logits"],
                q[f"{split}_labels"],
                fit_split=split,
            )
            d.update(**group_identity(g), precision=cell.precision)
            out.append(d)
    return out


def _attributions(ctx: Context, plan) -> list[dict[str, Any]]:
    """The cached attribution of every attributed cell, with its group's identity; a cell
    whose attribution failed has ``error`` instead of numbers."""
    out = []
    errors = {e["label"]: e["error"] for e in ctx.attribution_errors}
    for g, cells in plan:
        tkey = ctx.train_key(g)
        for cell in attribution_cells(ctx.config, cells):
            ident = {**group_identity(g), "precision": cell.precision}
            rec = ctx.store.read_json(ctx.attribution_path(cell, tkey), ("groups",))
            if rec is not None:
                if not rec.get("images"):  # cached before records said it: val (keyed so)
                    rec["images"] = ctx.stage_images(g).describe(0, stage="the attribution")
                    rec["images"]["n_images"] = None
                out.append({**ident, **rec})
            else:
                error = errors.get(f"{g.label} {cell.precision}", "not computed (see the log)")
                out.append({**ident, "error": error})
    return out


def _ablation(ctx: Context, plan) -> list[dict[str, Any]]:
    """Paired contrasts of the ablation family (:mod:`quantcal.findings.ablation`) from cached
    logits."""
    from quantcal.findings import ablation

    return ablation.contrasts(ctx, plan)


def _ood(ctx: Context, plan) -> list[dict[str, Any]]:
    """Unknown-input detection per cell, recalibrator, set and score
    (:mod:`quantcal.study.stages.ood`); written to ``ood.csv`` as well."""
    from quantcal.study.stages.ood import ood_section

    return ood_section(ctx, plan)


def _repair(ctx: Context, plan) -> list[dict[str, Any]]:
    """Paired contrasts of the quantization methods (:mod:`quantcal.findings.repair`) from
    cached logits."""
    from quantcal.findings import repair

    return repair.contrasts(ctx, plan)


#: The sections of details.json after ``reliability``, in order: (key, function, kept when
#: empty). Add a section here.
SECTIONS: tuple[tuple[str, Section, bool], ...] = (
    ("inspect", _inspect, True),
    ("training", _training, True),
    ("plans", _plans, False),
    ("stage_images", _stage_images, True),
    ("diagnostics", _diagnostics, True),
    ("attribution", _attributions, True),
    ("ablation", _ablation, True),
    ("repair", _repair, True),
    ("ood", _ood, False),
)


def write_results(out_dir: Path, rows: list[dict], plan, ctx: Context) -> Path:
    """results.csv (tidy scalars) and details.json (reliability bins, then :data:`SECTIONS`)."""
    path = write_csv(out_dir, rows)
    details = reliability_details(rows)
    for key, section, keep_empty in SECTIONS:
        records = section(ctx, plan)
        if records or keep_empty:
            details[key] = records
    atomic_write_json(out_dir / "details.json", details)
    if details.get("ood"):
        from quantcal.study.stages.ood import OOD_COLUMNS

        write_csv(out_dir, [r for r in details["ood"] if "error" not in r], OOD_COLUMNS, "ood.csv")
    else:
        (out_dir / "ood.csv").unlink(missing_ok=True)
    return path
