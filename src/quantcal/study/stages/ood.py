"""The unknown-input stages (issue #25, item 4): each cell's logits on every ``[data] ood`` set
and how well its confidence tells test images from them, per recalibrator.

``ood_images`` (group scope, not cached) makes each set on first use, preprocessed like test
(:func:`quantcal.training.ood_sets.ood_split`: a built-in synthetic set from the group's test
images, or an ``npz:`` file). ``ood_logits`` (cell scope) caches ``{set: logits}`` under
:func:`quantcal.study.keys.ood_logits_key` in ``cache/ood_logits``. ``ood`` (cell scope, eager)
scores them: for every recalibrator (fitted on clean validation logits and applied to the
unknown images as to test) and every score (MSP, max logit, energy), the AUROC of test against
the set and the FPR at 95 % TPR, with the paired bootstrap difference against the fp32 cell on
the same images; records in ``cache/ood/KEY.json``, one per (cell, set), and ``ood.csv``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from quantcal.findings.rows import RESULT_COLUMNS
from quantcal.study.cells import Group, QuantCell, group_identity
from quantcal.study.config import content_hash
from quantcal.study.keys import logits_key, ood_logits_key
from quantcal.study.stages.base import Need, Stage
from quantcal.study.stages.shift import logits_per_set

if TYPE_CHECKING:  # pragma: no cover
    from quantcal.study.context import Context

__all__ = ["OOD_COLUMNS", "Ood", "OodImages", "OodLogits", "ood_keys", "ood_section"]

#: Columns of ood.csv.
OOD_COLUMNS = (
    # a cell's identity and recalibrator, as results.csv names them
    *(c for c in RESULT_COLUMNS[: RESULT_COLUMNS.index("recal") + 1] if c != "shift"),
    "ood_set",
    "score",
    "auroc",
    "auroc_lo",
    "auroc_hi",
    "fpr95",
    "auroc_diff_vs_fp32",
    "auroc_diff_vs_fp32_lo",
    "auroc_diff_vs_fp32_hi",
    "n_test",
    "n_ood",
)


class OodImages(Stage):
    """``set -> unknown-input split`` (a callable, lazy), preprocessed like test."""

    name: ClassVar[str] = "ood_images"
    scope: ClassVar[str] = "group"
    reads: ClassVar[tuple[str, ...]] = ("data",)

    def run(self, ctx: Context, item: Group, need: Need) -> Any:
        from quantcal.training.ood_sets import ood_split

        test, made = need("data").test, {}

        def get(spec: str):
            if spec not in made:
                made[spec] = ood_split(spec, test, seed=item.seed)
            return made[spec]

        return get


def _applies(ctx: Context, cell: QuantCell) -> bool:
    return bool(ctx.config.ood) and not cell.precision.startswith("plan:")


def ood_keys(ctx: Context, cell: QuantCell) -> list[str]:
    """The ``ood_logits`` keys of a cell, one per ``[data] ood`` set (an ``npz:`` file keyed
    by its content)."""
    lkey = logits_key(ctx.config, cell, ctx.train_key(cell.group))
    return [
        ood_logits_key(lkey, s, ctx.file_digest(s[4:]) if s.startswith("npz:") else None)
        for s in ctx.config.ood
    ]


class OodLogits(Stage):
    """``{set: logits}`` of a cell on every unknown-input set."""

    name: ClassVar[str] = "ood_logits"
    reads: ClassVar[tuple[str, ...]] = ("ood_images", "deploy", "quantize")
    cache: ClassVar[str | None] = "ood_logits"

    def applies(self, ctx: Context, item: QuantCell) -> bool:
        return _applies(ctx, item)

    def keys(self, ctx: Context, item: QuantCell) -> list[str]:
        return ood_keys(ctx, item) if _applies(ctx, item) else []

    def run(self, ctx: Context, item: QuantCell, need: Need) -> Any:
        keys = ood_keys(ctx, item)
        return logits_per_set(ctx, need, item, "ood_images", "ood_logits", ctx.config.ood, keys)[0]


def _record_key(ctx: Context, key: str, fp32_key: str) -> str:
    cfg = ctx.config
    spec = {"ood": key, "fp32": fp32_key, "recal": list(cfg.recal), "columns": OOD_COLUMNS}
    spec.update(bootstrap=cfg.bootstrap, level=cfg.level)
    return content_hash(spec)


class Ood(Stage):
    """The cell's unknown-input records, one list per set (see the module docstring)."""

    name: ClassVar[str] = "ood"
    reads: ClassVar[tuple[str, ...]] = ("logits", "ood_logits")
    eager: ClassVar[bool] = True
    cache: ClassVar[str | None] = "ood"

    def applies(self, ctx: Context, item: QuantCell) -> bool:
        return _applies(ctx, item)

    def keys(self, ctx: Context, item: QuantCell) -> list[str]:
        if not _applies(ctx, item):
            return []
        fp32 = QuantCell(item.group, "fp32", None, None)
        return [
            _record_key(ctx, k, f)
            for k, f in zip(ood_keys(ctx, item), ood_keys(ctx, fp32), strict=True)
        ]

    def failed(self, ctx: Context, cells: list[Any], exc: BaseException) -> bool:
        errors = ctx.memo("ood_errors")
        for cell in cells:
            errors[cell] = f"{type(exc).__name__}: {exc}"
            ctx.say(f"error  {cell.group.label} {cell.precision} unknown inputs: {errors[cell]}")
        return True

    def run(self, ctx: Context, item: QuantCell, need: Need) -> Any:
        out = []
        fp32_cell = QuantCell(item.group, "fp32", None, None)
        for spec, key in zip(ctx.config.ood, self.keys(ctx, item), strict=True):
            path = ctx.cache / "ood" / f"{key}.json"
            hit = ctx.store.read_json(path, ("records",))
            if hit is None:
                lg, _, _ = need("logits")
                fp32, _, _ = need("logits", fp32_cell)
                unknown = need("ood_logits")[spec]
                fp32_unknown = need("ood_logits", fp32_cell)[spec]
                hit = {"records": score_ood(ctx, item, spec, lg, fp32, unknown, fp32_unknown)}
                ctx.store.write_json(path, hit)
            out.extend(hit["records"])
        return out


def score_ood(
    ctx: Context, cell: QuantCell, spec: str, lg: dict, fp32: dict, unknown, fp32_unknown
) -> list[dict[str, Any]]:
    """One record per (recalibrator, score) of a cell on the unknown-input set ``spec``."""
    from quantcal.calibration import ood
    from quantcal.calibration.recal_splits import recalibrate

    cfg = ctx.config
    boot = {"n_resamples": max(cfg.bootstrap, 1), "level": cfg.level, "seed": cell.group.seed}
    records = []
    for method in cfg.recal:
        both = {"test_logits": lg["test_logits"], "ood": unknown}
        f_both = {"test_logits": fp32["test_logits"], "ood": fp32_unknown}
        z = {}
        for part in ("test_logits", "ood"):
            q = {**lg, "test_logits": both[part]}
            f = {**fp32, "test_logits": f_both[part]}
            z[part] = recalibrate(method, f if cell.is_fp32 else q, f)[0]
            z["fp32_" + part] = recalibrate(method, f, f)[0]
        for score in ood.OOD_SCORES:
            rec: dict[str, Any] = {
                **group_identity(cell.group),
                "precision": cell.precision,
                "observer": cell.observer or "-",
                "method": "-" if cell.is_fp32 else cell.method,
                "ptq_sample": -1 if cell.sample is None else cell.sample,
                "recal": method,
                "ood_set": spec,
                "score": score,
                "fpr95": ood.ood_fpr_at_tpr(z["test_logits"], z["ood"], score),
                "n_test": int(lg["test_logits"].shape[0]),
                "n_ood": int(unknown.shape[0]),
            }
            pair = (z["test_logits"], z["ood"])
            if cfg.bootstrap > 0:
                rec["auroc"], rec["auroc_lo"], rec["auroc_hi"] = ood.ood_auroc_contrast(
                    [pair], [1.0], score, **boot
                )
                d = ood.ood_auroc_contrast(
                    [pair, (z["fp32_test_logits"], z["fp32_ood"])], [1.0, -1.0], score, **boot
                )
                keys = ("auroc_diff_vs_fp32", "auroc_diff_vs_fp32_lo", "auroc_diff_vs_fp32_hi")
                rec.update(zip(keys, d))
            else:
                rec["auroc"] = ood.ood_auroc(*pair, score)
            records.append(rec)
    return records


def ood_section(ctx: Context, plan) -> list[dict[str, Any]]:
    """details.json's ``ood``: every cached record of the run's cells, and for a cell whose
    scoring failed, one record with its identity and ``error``."""
    stage, errors = Ood(), ctx.memo("ood_errors")
    out: list[dict[str, Any]] = []
    for _g, cells in plan:
        for cell in cells:
            if not stage.applies(ctx, cell):
                continue
            for spec, key in zip(ctx.config.ood, stage.keys(ctx, cell), strict=True):
                hit = ctx.store.read_json(ctx.cache / "ood" / f"{key}.json", ("records",))
                if hit is not None:
                    out.extend(hit["records"])
                    continue
                out.append(
                    {
                        **group_identity(cell.group),
                        "precision": cell.precision,
                        "ood_set": spec,
                        "error": errors.get(cell, "not computed (see the log)"),
                    }
                )
    return out
