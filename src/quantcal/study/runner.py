"""The study runner: orders the stages, shards the work and reports progress.

A study is a pipeline of stages (``quantcal.study.stages``; ``docs/architecture.md`` draws it):
per training group data -> train -> deploy, per cell plan -> quantize -> logits -> rows ->
attribution, then the study-scope stages (``results.csv``, the sections of ``details.json``,
the report). Every expensive stage is cached on disk under ``out_dir/cache`` by a hash of its
canonical config plus the keys of its inputs (``quantcal.study.keys``), so re-running a finished
study does no training or inference and a run killed at any moment redoes only what is missing:

- train: keyed by the dataset's content digest (SHA-256 of an ``npz:`` file, the verified md5 of
  an official one), split sizes, seed, arch, width, recipe, pinned thread count and the
  checkpoint's SHA-256 where one is given; files ``cache/train/KEY/{model.pt, meta.json,
  last.pt}``.
- logits: keyed by the train key, the precision config and the range-calibration sample;
  files ``cache/logits/KEY.pt`` and ``KEY.json``.
- row: keyed by the logits key, the recalibration method, the fp32 logits key, the metric
  settings and the row schema (the result columns), so a new column recomputes rows but never
  retrains; file ``cache/rows/KEY.json``.

Each stage has its own version. Every entry is verified on read (tensor files against the
SHA-256 recorded in the JSON beside them); a damaged one is removed with a message and computed
again (see ``quantcal.store.cache``). The output folder must be quantcal's
(``quantcal.store.runfolder``).

Before computing anything, the inputs of this shard's groups are checked (datasets load, model
factories import, checkpoints fit): bad input raises ``ValueError`` and nothing is computed. A cell
that fails later becomes an error row (``status = "error"`` and the message) and the sweep goes
on; error rows are kept in ``cache/errors`` so that shards can assemble them, and are retried on
the next run (:func:`failed_rows` lists them). ``shard=(i, n)`` gives shard ``i`` every ``n``-th
training group; all shards share one output folder and the last to finish writes
``results.csv`` and the report.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from quantcal import _isa
from quantcal._io import atomic_write_json, atomic_write_text
from quantcal.calibration.recal_splits import crossfit_folds, fold, recalibrate
from quantcal.findings.rows import RESULT_COLUMNS
from quantcal.store import runfolder as _runfolder
from quantcal.study.cells import Group, QuantCell, expand_cells, parse_shard
from quantcal.study.config import StudyConfig, load_study
from quantcal.study.context import Context
from quantcal.study.details import write_results
from quantcal.study.environment import (
    environment_record,
    pinned_threads,
    rank,
    resolve_device,
    stderr_log,
)
from quantcal.study.factories import build_model, import_factory, load_weights
from quantcal.study.results import collect_rows
from quantcal.study.stages import STAGES, Outputs
from quantcal.study.stages.data import preflight

__all__ = [
    "RESULT_COLUMNS",
    "Group",
    "QuantCell",
    "StudyConfig",
    "assemble",
    "build_model",
    "environment_record",
    "expand_cells",
    "failed_attributions",
    "failed_rows",
    "import_factory",
    "iter_rows",
    "load_study",
    "load_weights",
    "open_run",
    "parse_shard",
    "recalibrated_test_logits",
    "resolve_device",
    "run_group",
    "run_study",
]


def run_group(ctx: Context, g: Group, cells: list[QuantCell]) -> None:
    """Run every eager stage for group ``g`` and then for each of its cells, in the order of
    :data:`~quantcal.study.stages.STAGES`; the others run when a stage needs them.

    The first cell is the group's fp32 reference (every row is paired with it): a failure on it,
    or of a group stage, is the failure of every cell (``stage.failed`` decides what that means:
    error rows). A failure on another cell is that cell's; a stage whose ``failed`` returns True
    (attribution) lets the cell's later stages run."""
    outputs = Outputs(ctx, {s.name: s for s in STAGES})
    for stage in STAGES:
        if stage.eager and stage.scope == "group":
            try:
                outputs.get(stage.name, g)
            except Exception as exc:
                if not stage.failed(ctx, cells, exc):
                    return
    for stage in STAGES:
        stage.prepare(ctx, outputs, g, cells)
    if rank() != 0:
        return  # under torchrun, ranks > 0 only help to train
    reference = cells[0]
    for cell in cells:
        for stage in STAGES:
            if not (stage.eager and stage.scope == "cell" and stage.applies(ctx, cell)):
                continue
            try:
                outputs.get(stage.name, cell)
            except Exception as exc:
                if not stage.failed(ctx, cells if cell is reference else [cell], exc):
                    if cell is reference:
                        return
                    break
        if cell is not reference:
            outputs.forget(cell)  # its quantized model: the next cell's is another


def run_study(
    config_or_path: StudyConfig | str | Path | None = None,
    out_dir: str | Path | None = None,
    *,
    resume: bool = True,
    shard: tuple[int, int] = (0, 1),
    device: str | None = None,
    quiet: bool = False,
    overrides: dict[str, Any] | None = None,
    log: Callable[[str], None] | None = None,
    report: bool = True,
    force: bool = False,
    identity: dict[str, Any] | None = None,
) -> Path:
    """Run (or finish) a study into ``out_dir``; returns the folder.

    ``out_dir`` must be new, empty or a quantcal run folder (``force=True`` adopts another
    non-empty folder); with ``identity`` (what this run is: ``{"command": "run", "study":
    name}``, an eval's source) a folder that records another identity is refused too (the CLI
    passes one; ``force`` replaces). A folder this call created is removed again when its input
    is refused, so bad input leaves nothing behind. ``resume=False`` first removes the cache
    entries quantcal wrote. Bad input (a dataset that does not load, a factory that does not
    import, a checkpoint that does not fit) raises ``ValueError`` before anything is computed;
    cells that fail later become error rows (see :func:`failed_rows`). With ``shard=(i, n)``
    only every n-th training group is computed here; whichever shard completes the last cell
    writes results.csv and the report.
    Progress and stage lines go to ``log`` (default stderr; none with ``quiet``).
    """
    from tqdm.auto import tqdm

    config = load_study(config_or_path, overrides)
    isa_notes = _isa.pin(config.isa)  # before any tensor operation of the run
    i, n = shard
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"shard must be (i, n) with 0 <= i < n, got {shard!r}")
    out = Path(out_dir) if out_dir is not None else Path("runs") / config.name
    _runfolder.check(out, force=force, identity=identity)
    existed = out.exists()
    made_here = not existed or not any(out.iterdir())
    _runfolder.claim(out, force=force, identity=identity)
    if log is None:
        log = (lambda s: None) if quiet else stderr_log
    if not resume:
        removed = _runfolder.clear_cache(out)
        if removed:
            log(f"fresh  removed {removed} cache entries of {out}")
    stale = _runfolder.remove_stale_tmp(out)
    if stale:
        log(f"cache  removed {len(stale)} temporary files left by a killed run")
    dev = resolve_device(device)
    with pinned_threads(config.threads):
        ctx = Context(config, out, dev, quiet, log)
        ctx.isa_notes = isa_notes
        for note in isa_notes:
            log(f"note   {note}")
        plan = expand_cells(config)
        mine = [(g, cells) for k, (g, cells) in enumerate(plan) if k % n == i]
        try:
            preflight(ctx, [g for g, _ in mine])
        except ValueError:
            if made_here and rank() == 0:  # leave no empty marked folder behind
                _runfolder.empty(out, remove_folder=not existed)
            raise
        atomic_write_text(out / "config.toml", config.to_toml(applicable_only=True))
        atomic_write_json(out / "env.json", environment_record(dev))
        bar = tqdm(mine, desc=f"study {config.name}", unit="model", disable=quiet or None)
        for g, cells in bar:
            bar.set_postfix_str(g.label)
            run_group(ctx, g, cells)
        if rank() != 0:
            return out
        rows, missing = collect_rows(ctx, plan)
    if missing:
        log(
            f"{missing} result rows are still missing (other shards running?); "
            f"when all shards are done, `quantcal report {out}` assembles them"
        )
        return out
    write_results(out, rows, plan, ctx)
    ctx.say(f"write  {out / 'results.csv'} ({len(rows)} rows)")
    if report:
        from quantcal.report import html as report_mod

        report_mod.write_report(out)
        ctx.say(f"write  {out / 'report.html'}")
    return out


def iter_rows(out_dir: str | Path) -> Iterator[dict[str, str]]:
    """Rows of ``out_dir/results.csv`` as dicts of strings."""
    import csv

    with open(Path(out_dir) / "results.csv", newline="", encoding="utf-8") as fh:
        yield from csv.DictReader(fh)


def open_run(
    out_dir: str | Path, log: Callable[[str], None] = lambda s: None
) -> tuple[Context, list]:
    """(context, plan) of a finished or partial run folder, for reading its cache: the study is
    its ``config.toml`` (FileNotFoundError when there is none), the instruction set pinned as the
    run's (its keys hold it), and files that have moved away since are identified by the
    digests recorded when they were used."""
    out = Path(out_dir)
    cfg_path = out / "config.toml"
    if not cfg_path.is_file():
        raise FileNotFoundError(
            f"{out} holds no config.toml: is it a `quantcal run` output folder?"
        )
    config = load_study(cfg_path)
    _isa.pin(config.isa)  # the keys hold the instruction set: ask for the run's
    return Context(config, out, "cpu", True, log, assembling=True), expand_cells(config)


def recalibrated_test_logits(
    out_dir: str | Path, *, first_sample_only: bool = True
) -> dict[tuple, tuple[Any, Any]]:
    """Every cell's recalibrated test logits of a finished run, from its cache: ``{(dataset,
    arch, width, objective, seed, precision, observer, method, ptq_sample, recal): (logits,
    labels)}`` with the identity as results.csv writes it (fp32: observer and method ``"-"``,
    sample -1). Each
    recalibrator is refitted exactly as the row was scored (on val, or cross-fitted on test).
    ``first_sample_only`` keeps range-calibration sample 0. A cell whose logits are not cached
    is left out."""
    ctx, plan = open_run(out_dir, lambda s: None)
    cfg = ctx.config
    out: dict[tuple, tuple[Any, Any]] = {}
    for g, cells in plan:
        tkey = ctx.train_key(g)

        fp32 = ctx.cached_logits(cells[0], tkey)
        if fp32 is None:
            continue
        fit = ctx.recal_fit(g)[0]
        for cell in cells:
            if first_sample_only and cell.sample not in (None, 0):
                continue
            lg = fp32 if cell.is_fp32 else ctx.cached_logits(cell, tkey)
            if lg is None:
                continue
            labels = lg["test_labels"]
            report_on = None if cell.is_fp32 else ctx.report_fold(cell, labels)
            for method in cfg.recal:
                if report_on is not None:  # a plan searched on one half: the other half only
                    lg_r, fp32_r = fold(lg, *report_on), fold(fp32, *report_on)
                    z, _ = recalibrate(method, lg_r, fp32_r, [], None, None)
                    key_labels = lg_r["test_labels"]
                else:
                    folds = None
                    if fit == "test_crossfit" and method != "none":
                        folds = crossfit_folds(labels, g.seed)
                    z, _ = recalibrate(method, lg, fp32, [], None, folds)
                    key_labels = labels
                key = (
                    g.dataset,
                    g.model.arch,
                    float(g.model.width),
                    g.objective,
                    g.seed,
                    cell.precision,
                    cell.observer or "-",
                    "-" if cell.is_fp32 else cell.method,
                    -1 if cell.sample is None else cell.sample,
                    method,
                )
                out[key] = (z, key_labels)
    return out


def failed_attributions(out_dir: str | Path) -> list[dict[str, Any]]:
    """The attributions and unknown-input scorings of a finished run that failed
    (``details.json``, with ``error``; ``what`` says which)."""
    path = Path(out_dir) / "details.json"
    if not path.is_file():
        return []
    details = json.loads(path.read_text())
    return [
        {**r, "what": what}
        for key, what in (("attribution", "attribution"), ("ood", "unknown-input scoring"))
        for r in details.get(key, [])
        if "error" in r
    ]


def failed_rows(out_dir: str | Path) -> list[dict[str, Any]]:
    """The error rows recorded in a run folder's cache (every shard's), for its study."""
    ctx, plan = open_run(out_dir, lambda s: None)
    rows, _ = collect_rows(ctx, plan)
    return [r for r in rows if r.get("status") != "ok"]


def assemble(
    out_dir: str | Path, *, report: bool = True, log: Callable[[str], None] | None = None
) -> Path:
    """Collect the cached rows of a (possibly sharded) run into results.csv and the report.

    Raises ``ValueError`` naming how many rows are missing when some cells never ran (or their
    cache entries were damaged: those are named on ``log`` and rebuilt by the next run).
    """
    out = Path(out_dir)
    ctx, plan = open_run(out, log or stderr_log)
    rows, missing = collect_rows(ctx, plan)
    if missing:
        raise ValueError(
            f"{missing} result rows of {out} are missing: some cells have not run yet, their "
            f"cache entries were damaged, or they were computed by a quantcal with other result "
            f"columns. Re-run `quantcal run` with the same study and --out (every shard): it "
            f"computes only what is missing (rows from the cached logits, no retraining)."
        )
    write_results(out, rows, plan, ctx)
    if report:
        from quantcal.report import html as report_mod

        report_mod.write_report(out)
    return out
