"""The study runner: train -> deploy -> quantize -> logits -> recalibrate -> measure -> rows.

Every expensive stage is cached on disk under ``out_dir/cache`` by a hash of its canonical config
plus the keys of its inputs, so re-running a finished study does no training or inference and a
run killed at any moment redoes only what is missing:

- train: keyed by dataset, split sizes, seed, arch, width and recipe;
  files ``cache/train/KEY/{model.pt, meta.json, last.pt}``.
- logits: keyed by the train key, the precision config and the range-calibration sample;
  files ``cache/logits/KEY.pt`` and ``KEY.json``.
- row: keyed by the logits key, the recalibration method, the fp32 logits key and the metric
  settings; file ``cache/rows/KEY.json``.

A failing cell becomes an error row (``status = "error"`` and the message) and the sweep goes on;
error rows are kept in ``cache/errors`` so that shards can assemble them, and are retried on the
next run. ``shard=(i, n)`` gives shard ``i`` every ``n``-th training group; all shards share one
output folder and the last to finish writes ``results.csv`` and the report.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantcal._io import atomic_torch_save, atomic_write_json, atomic_write_text
from quantcal.studyconfig import (
    REUSE_FP32_TEMPERATURE,
    ModelSpec,
    StudyConfig,
    content_hash,
    load_study,
)

__all__ = [
    "RESULT_COLUMNS",
    "Group",
    "QuantCell",
    "StudyConfig",
    "expand_cells",
    "load_study",
    "parse_shard",
    "run_study",
]

_CACHE_VERSION = 1

#: Columns of results.csv, in order (one row per dataset, arch, width, seed, precision,
#: observer, range-calibration sample and recalibration method).
RESULT_COLUMNS = (
    "dataset",
    "arch",
    "width",
    "seed",
    "precision",
    "observer",
    "ptq_sample",
    "recal",
    "status",
    "error",
    "notes",
    "accuracy",
    "accuracy_lo",
    "accuracy_hi",
    "ece",
    "ece_lo",
    "ece_hi",
    "mce",
    "adaptive_ece",
    "classwise_ece",
    "debiased_ece",
    "nll",
    "brier",
    "mean_confidence",
    "temperature",
    "ece_diff_vs_fp32",
    "ece_diff_vs_fp32_lo",
    "ece_diff_vs_fp32_hi",
    "ece_diff_vs_none",
    "ece_diff_vs_none_lo",
    "ece_diff_vs_none_hi",
    "params",
    "macs",
    "weight_bytes",
    "n_test",
    "n_bins",
    "row_id",
)


@dataclass(frozen=True)
class Group:
    """One trained network: a dataset, an architecture at a width, a seed."""

    dataset: str
    model: ModelSpec
    seed: int

    @property
    def label(self) -> str:
        return f"{self.dataset} / {self.model.label} / seed {self.seed}"


@dataclass(frozen=True)
class QuantCell:
    """One evaluated network: a group at a precision, range estimator and range-calib sample."""

    group: Group
    precision: str
    observer: str | None  # None for fp32
    sample: int | None  # None for fp32

    @property
    def is_fp32(self) -> bool:
        return self.observer is None


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> (I, N) with 0 <= I < N."""
    try:
        i_str, n_str = str(text).split("/")
        i, n = int(i_str), int(n_str)
    except ValueError as exc:
        raise ValueError(f"--shard must look like I/N (e.g. 0/4), got {text!r}") from exc
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"--shard I/N needs 0 <= I < N, got {text!r}")
    return i, n


def expand_cells(config: StudyConfig) -> list[tuple[Group, list[QuantCell]]]:
    """Every training group with its quantized cells, in the study's order (fp32 first)."""
    out = []
    for dataset in config.datasets:
        for spec in config.models:
            for seed in config.seeds:
                g = Group(dataset, spec, seed)
                cells = [QuantCell(g, "fp32", None, None)]
                for p in config.precisions:
                    if p.lower() == "fp32":
                        continue
                    for obs in config.observers:
                        for s in range(config.ptq_calib_samples):
                            cells.append(QuantCell(g, p, obs, s))
                out.append((g, cells))
    return out


# ---------------------------------------------------------------------------------------------
# Keys
# ---------------------------------------------------------------------------------------------
def _data_key(config: StudyConfig, g: Group) -> dict[str, Any]:
    return {
        "dataset": g.dataset,
        "seed": g.seed,
        "val_size": config.val_size,
        "ptq_calib_size": config.ptq_calib_size,
        "ptq_calib_samples": config.ptq_calib_samples,
    }


def _file_digest(path: str) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _train_key(config: StudyConfig, g: Group) -> str:
    spec: dict[str, Any] = {
        "v": _CACHE_VERSION,
        "data": _data_key(config, g),
        "arch": g.model.arch,
        "width": g.model.width,
    }
    if g.model.checkpoint is not None:
        spec["checkpoint"] = _file_digest(g.model.checkpoint)
    else:
        spec["train"] = {**config.train, "seed": g.seed}
    return content_hash(spec)


def build_model(
    arch: str,
    *,
    num_classes: int,
    image_size: int,
    in_chans: int,
    width: float,
    seed: int | None = None,
):
    """A registry model, or ``module:factory``: a callable imported from a module and called
    with whichever of (num_classes, image_size, in_chans, width) its signature accepts."""
    import importlib
    import inspect as pyinspect

    from quantcal import models

    if ":" not in arch:
        return models.create_model(
            arch,
            num_classes=num_classes,
            image_size=image_size,
            in_chans=in_chans,
            width=width,
            seed=seed,
        )
    mod_name, _, fn_name = arch.partition(":")
    try:
        factory = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(
            f"cannot import model factory {arch!r}: {exc}. Give 'module:function' with the "
            "module on PYTHONPATH"
        ) from exc
    if seed is not None:
        import torch

        torch.manual_seed(seed)
    offered = {
        "num_classes": num_classes,
        "image_size": image_size,
        "in_chans": in_chans,
        "width": width,
    }
    params = pyinspect.signature(factory).parameters
    takes_all = any(p.kind is p.VAR_KEYWORD for p in params.values())
    return factory(**{k: v for k, v in offered.items() if takes_all or k in params})


def load_weights(model, path: str | Path):
    """Load a checkpoint into ``model`` with ``weights_only=True``: a quantcal ``model.pt`` or
    ``last.pt``, a dict with ``state_dict``, or a bare state dict."""
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(
            f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}. It must be a "
            "torch.save'd state dict (weights only); re-save it with "
            "torch.save(model.state_dict(), path)"
        ) from exc
    state = obj
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_state"):
            if isinstance(obj.get(key), dict):
                state = obj[key]
                break
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(
            f"checkpoint {path} does not fit the model: {exc}. Check the model name, width and "
            "number of classes"
        ) from exc
    return model.eval()


def _quant_config(config: StudyConfig, cell: QuantCell):
    from quantcal import quant

    qc = quant.parse_precision(cell.precision)
    if qc is None:
        return None
    return dataclasses.replace(qc, observer=cell.observer, first_last_8bit=config.first_last_8bit)


def _logits_key(config: StudyConfig, cell: QuantCell, train_key: str) -> str:
    qc = _quant_config(config, cell)
    return content_hash(
        {
            "v": _CACHE_VERSION,
            "train": train_key,
            "quant": None if qc is None else qc.to_dict(),
            "sample": cell.sample,
        }
    )


def _row_key(config: StudyConfig, logits_key: str, fp32_key: str, method: str) -> str:
    return content_hash(
        {
            "v": _CACHE_VERSION,
            "logits": logits_key,
            "fp32": fp32_key,
            "recal": method,
            "n_bins": config.n_bins,
            "bootstrap": config.bootstrap,
            "level": config.level,
        }
    )


# ---------------------------------------------------------------------------------------------
# Environment record
# ---------------------------------------------------------------------------------------------
def environment_record(device: str) -> dict[str, Any]:
    """Versions, device and threads: saved as env.json beside every result."""
    import numpy
    import torch

    import quantcal

    rec: dict[str, Any] = {
        "quantcal": quantcal.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if torch.cuda.is_available():
        rec["cuda"] = torch.version.cuda
        rec["gpu"] = torch.cuda.get_device_name(0)
    return rec


def _resolve_device(device: str | None) -> str:
    import torch

    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"--device: {exc}; use 'cpu', 'cuda', 'cuda:1' or 'auto'") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch.cuda.is_available() is False")
    return str(dev)


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


# ---------------------------------------------------------------------------------------------
# The runner
# ---------------------------------------------------------------------------------------------
class _Runner:
    def __init__(
        self,
        config: StudyConfig,
        out_dir: Path,
        device: str,
        quiet: bool,
        log: Callable[[str], None],
    ):
        self.config = config
        self.out = out_dir
        self.cache = out_dir / "cache"
        self.device = device
        self.quiet = quiet
        self.log = log
        self._splits: dict[tuple, Any] = {}
        self._deployed: tuple[str, Any] | None = None  # (train key, deploy model) of the group
        self._fp32_fits: dict[tuple[str, str], tuple[tuple[Any, float | None], list[str]]] = {}

    # -- data ------------------------------------------------------------------------------
    def splits(self, g: Group):
        from quantcal import data

        key = tuple(sorted(_data_key(self.config, g).items()))
        if key not in self._splits:
            kw: dict[str, Any] = {"seed": g.seed}
            if self.config.val_size is not None:
                kw["val_size"] = self.config.val_size
            if self.config.ptq_calib_size is not None:
                kw["ptq_calib_size"] = self.config.ptq_calib_size * self.config.ptq_calib_samples
            self._splits[key] = data.load_dataset(g.dataset, **kw)
        return self._splits[key]

    def ptq_batches(self, splits, sample: int) -> list:
        """Range-calibration sample ``sample``: the sample-th of equal disjoint slices."""
        k = self.config.ptq_calib_samples
        pool = splits.ptq_calib
        size = len(pool) // k
        if size < 1:
            raise ValueError(
                f"the ptq_calib split has {len(pool)} images, too few for {k} disjoint samples"
            )
        part = dataclasses.replace(
            pool,
            images=pool.images[sample * size : (sample + 1) * size],
            labels=pool.labels[sample * size : (sample + 1) * size],
            indices=pool.indices[sample * size : (sample + 1) * size],
        )
        return [x for x, _ in part.batches(256, device=self.device)]

    # -- train stage -----------------------------------------------------------------------
    def trained_model(self, g: Group):
        from quantcal import train

        key = _train_key(self.config, g)
        folder = self.cache / "train" / key
        splits = self.splits(g)
        model = build_model(
            g.model.arch,
            num_classes=splits.num_classes,
            image_size=splits.image_size,
            in_chans=splits.channels,
            width=g.model.width,
            seed=g.seed,
        )
        if g.model.checkpoint is not None:
            return load_weights(model, g.model.checkpoint), key, {"checkpoint": g.model.checkpoint}
        final = folder / "model.pt"
        if final.exists() and (folder / "meta.json").exists():
            return load_weights(model, final), key, json.loads((folder / "meta.json").read_text())
        cfg = train.TrainConfig.from_dict({**self.config.train, "seed": g.seed})
        self.log(f"train  {g.label}  ({cfg.epochs} epochs)")
        result = train.train(
            model,
            splits,
            cfg,
            device=self.device,
            out_dir=folder,
            resume=True,
            progress=not self.quiet,
        )
        trained = result.model.to("cpu").eval()
        meta = {
            "group": g.label,
            "history": result.history,
            "seconds": result.seconds,
            "train_config": cfg.to_dict(),
        }
        if _rank() == 0:
            atomic_write_json(folder / "meta.json", meta)
            atomic_torch_save(
                {"model": trained.state_dict(), "config": getattr(trained, "config", {})}, final
            )
        return trained, key, meta

    # -- logits stage ----------------------------------------------------------------------
    def deployed(self, model, train_key: str):
        """The fp32 deploy form of the group's trained model, built once per group: every
        cell quantizes from it (``quantize`` copies it; ``to_deploy`` of a deploy graph is the
        same function, tested bit-identical) instead of re-deploying the training form."""
        from quantcal import models

        if self._deployed is None or self._deployed[0] != train_key:
            self._deployed = (train_key, models.to_deploy(model))
        return self._deployed[1]

    def logits(self, cell: QuantCell, model, train_key: str) -> tuple[dict, dict, str]:
        import torch

        from quantcal import models, quant, train

        key = _logits_key(self.config, cell, train_key)
        path = self.cache / "logits" / f"{key}.pt"
        meta_path = path.with_suffix(".json")
        if path.exists() and meta_path.exists():
            return (
                torch.load(path, map_location="cpu", weights_only=True),
                json.loads(meta_path.read_text()),
                key,
            )
        splits = self.splits(cell.group)
        t0 = time.perf_counter()
        qc = _quant_config(self.config, cell)
        meta: dict[str, Any] = {
            "precision": cell.precision,
            "observer": cell.observer,
            "sample": cell.sample,
        }
        deploy = self.deployed(model, train_key)
        if qc is None:
            net = deploy
        else:
            calib = self.ptq_batches(splits, cell.sample)
            net = quant.quantize(deploy, qc, calib)
            try:
                meta["inspect"] = quant.inspect(net, calib[:2]).to_rows()
            except Exception as exc:  # a report nicety; never lose the cell for it
                meta["inspect_error"] = f"{type(exc).__name__}: {exc}"
        bits = 32 if qc is None else qc.weight_bits
        stats = models.describe(
            deploy, splits.image_size, in_chans=splits.channels, weight_bits=bits
        )
        meta.update(params=stats.params, macs=stats.macs, weight_bytes=stats.weight_bytes)
        out = {}
        for name in ("val", "test"):
            lg, lb = train.predict_logits(
                net,
                getattr(splits, name),
                batch_size=self.config.eval_batch_size,
                device=self.device,
            )
            out[f"{name}_logits"], out[f"{name}_labels"] = lg, lb
        meta["seconds"] = time.perf_counter() - t0
        atomic_torch_save(out, path)
        atomic_write_json(meta_path, meta)
        return out, meta, key

    # -- row stage -------------------------------------------------------------------------
    def _fp32_fit_for(self, fp32_key: str) -> _FitFn:
        """The fp32 cell's recalibrator fits, each fitted once per group (every quantized
        cell's paired difference vs fp32 and ``temperature_fp32`` reuse them)."""

        def fit(method: str, fp32: dict) -> tuple[Any, float | None]:
            import warnings

            key = (fp32_key, method)
            if key not in self._fp32_fits:
                if len(self._fp32_fits) > 64:
                    self._fp32_fits.clear()
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    result = _fit_and_apply(method, fp32, fp32)
                self._fp32_fits[key] = (result, [str(w.message) for w in caught])
            result, messages = self._fp32_fits[key]
            for message in messages:  # each caller records the fit's warnings, cached or not
                warnings.warn(message, RuntimeWarning, stacklevel=2)
            return result

        return fit

    def row(
        self,
        cell: QuantCell,
        method: str,
        lg: dict,
        lmeta: dict,
        lkey: str,
        fp32: dict,
        fp32_key: str,
    ) -> dict[str, Any]:
        key = _row_key(self.config, lkey, fp32_key, method)
        path = self.cache / "rows" / f"{key}.json"
        if path.exists():
            return json.loads(path.read_text())
        row = _score(self.config, cell, method, lg, fp32, self._fp32_fit_for(fp32_key))
        row.update(
            params=lmeta.get("params"),
            macs=lmeta.get("macs"),
            weight_bytes=lmeta.get("weight_bytes"),
            row_id=key,
        )
        atomic_write_json(path, row)
        err = self.cache / "errors" / f"{key}.json"
        if err.exists():
            err.unlink()
        return row

    def error_row(self, cell: QuantCell, method: str, key: str, exc: BaseException) -> dict:
        row = _base_row(self.config, cell, method)
        row.update(status="error", error=f"{type(exc).__name__}: {exc}", row_id=key)
        atomic_write_json(self.cache / "errors" / f"{key}.json", row)
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        atomic_write_text(self.cache / "errors" / f"{key}.log", tb)
        self.log(
            f"error  {cell.group.label} {cell.precision} {method}: {type(exc).__name__}: {exc}"
        )
        return row

    def error_rows(self, cells: list[QuantCell], exc: BaseException) -> None:
        """Error rows for every method of cells whose logits never came to exist."""
        for cell in cells:
            for m in self.config.recal:
                self.error_row(cell, m, _pending_key(cell, m), exc)

    # -- a whole group ---------------------------------------------------------------------
    def run_group(self, g: Group, cells: list[QuantCell]) -> None:
        methods = self.config.recal
        try:
            model, tkey, _ = self.trained_model(g)
        except Exception as exc:
            self.error_rows(cells, exc)
            return
        if _rank() != 0:
            return  # under torchrun, ranks > 0 only help to train
        fp32_cell = cells[0]
        try:
            fp32, fp32_meta, fp32_key = self.logits(fp32_cell, model, tkey)
        except Exception as exc:
            self.error_rows(cells, exc)
            return
        for cell in cells:
            try:
                if cell.is_fp32:
                    lg, lmeta, lkey = fp32, fp32_meta, fp32_key
                else:
                    lg, lmeta, lkey = self.logits(cell, model, tkey)
            except Exception as exc:
                self.error_rows([cell], exc)
                continue
            for m in methods:
                try:
                    self.row(cell, m, lg, lmeta, lkey, fp32, fp32_key)
                except Exception as exc:
                    self.error_row(cell, m, _row_key(self.config, lkey, fp32_key, m), exc)


def _pending_key(cell: QuantCell, method: str) -> str:
    """Key for an error row of a cell whose logits never existed (train/quantize failed)."""
    return "err-" + content_hash(
        {
            "cell": [
                cell.group.dataset,
                cell.group.model.label,
                cell.group.seed,
                cell.precision,
                cell.observer,
                cell.sample,
                method,
            ]
        }
    )


def _base_row(config: StudyConfig, cell: QuantCell, method: str) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(RESULT_COLUMNS)
    row.update(
        dataset=cell.group.dataset,
        arch=cell.group.model.arch,
        width=cell.group.model.width,
        seed=cell.group.seed,
        precision=cell.precision,
        observer=cell.observer or "-",
        ptq_sample=-1 if cell.sample is None else cell.sample,
        recal=method,
        status="ok",
        error="",
        n_bins=config.n_bins,
    )
    return row


_FitFn = Callable[[str, dict], tuple[Any, "float | None"]]


def _fit_and_apply(method: str, fit_on: dict, apply_to: dict) -> tuple[Any, float | None]:
    """Fit ``method`` on ``fit_on``'s validation logits and apply it to ``apply_to``'s test
    logits; returns (test logits, temperature or None)."""
    from quantcal import recal

    r = recal.get(method)().fit(fit_on["val_logits"], fit_on["val_labels"])
    temp = getattr(r, "temperature", None)
    return r(apply_to["test_logits"]), (None if temp is None else float(temp))


def _recalibrate(
    method: str,
    lg: dict,
    fp32: dict,
    notes: list[str] | None = None,
    fp32_fit: _FitFn | None = None,
):
    """Fit ``method`` on this cell's validation logits; return (test logits, temperature).

    ``temperature_fp32`` applies the fp32 model's temperature instead. ``fp32_fit(method,
    fp32)`` returns the fp32 model's fit (the runner memoises it per group); by default it is
    refitted. Warnings of the fit (a temperature at its bound, say) are appended to ``notes``."""
    import warnings

    from quantcal import recal

    fp32_fit = fp32_fit or (lambda m, f: _fit_and_apply(m, f, f))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if method == REUSE_FP32_TEMPERATURE:
            _, t_fp32 = fp32_fit("temperature", fp32)
            fixed = recal.get("temperature").fixed(t_fp32)
            out = fixed(lg["test_logits"]), float(t_fp32)
        elif lg is fp32:
            out = fp32_fit(method, fp32)
        else:
            out = _fit_and_apply(method, lg, lg)
    if notes is not None:
        notes.extend(str(w.message) for w in caught if str(w.message) not in notes)
    return out


def _score(
    config: StudyConfig,
    cell: QuantCell,
    method: str,
    lg: dict,
    fp32: dict,
    fp32_fit: _FitFn | None = None,
) -> dict[str, Any]:
    from quantcal import metrics

    labels = lg["test_labels"]
    notes: list[str] = []
    z, temperature = _recalibrate(method, lg, fp32, notes, fp32_fit)
    rep = metrics.calibration_report(z, labels, n_bins=config.n_bins)
    row = _base_row(config, cell, method)
    row.update({k: float(v) for k, v in rep.items() if k in row})
    row["n_test"] = int(labels.shape[0])
    row["temperature"] = temperature
    boot = {"n_resamples": config.bootstrap, "level": config.level, "seed": cell.group.seed}
    if config.bootstrap > 0:
        row["ece_lo"], row["ece_hi"] = metrics.bootstrap_ci("ece", z, labels, **boot)
        row["accuracy_lo"], row["accuracy_hi"] = metrics.bootstrap_ci("accuracy", z, labels, **boot)
        z_fp32, _ = _recalibrate(method, fp32, fp32, [], fp32_fit)
        d = metrics.paired_bootstrap_diff("ece", z, z_fp32, labels, **boot)
        row["ece_diff_vs_fp32"], row["ece_diff_vs_fp32_lo"], row["ece_diff_vs_fp32_hi"] = d
        d = metrics.paired_bootstrap_diff("ece", z, lg["test_logits"], labels, **boot)
        row["ece_diff_vs_none"], row["ece_diff_vs_none_lo"], row["ece_diff_vs_none_hi"] = d
    row["notes"] = " | ".join(notes)
    rel = metrics.reliability(z, labels, n_bins=config.n_bins)
    row["reliability"] = {
        "edges": [float(x) for x in rel.edges],
        "count": [int(x) for x in rel.count],
        "confidence": [None if x != x else float(x) for x in rel.confidence],
        "accuracy": [None if x != x else float(x) for x in rel.accuracy],
    }
    return {k: (float(v) if hasattr(v, "item") else v) for k, v in row.items()}


# ---------------------------------------------------------------------------------------------
# Assembly
# ---------------------------------------------------------------------------------------------
def _collect_rows(runner: _Runner, plan) -> tuple[list[dict], int]:
    """Rows for every (cell, method) of the plan from the cache; returns (rows, missing)."""
    cfg = runner.config
    rows, missing = [], 0
    for g, cells in plan:
        tkey = _train_key(cfg, g)
        fp32_key = _logits_key(cfg, cells[0], tkey)
        for cell in cells:
            lkey = _logits_key(cfg, cell, tkey)
            for m in cfg.recal:
                rk = _row_key(cfg, lkey, fp32_key, m)
                found = None
                for path in (
                    runner.cache / "rows" / f"{rk}.json",
                    runner.cache / "errors" / f"{rk}.json",
                    runner.cache / "errors" / f"{_pending_key(cell, m)}.json",
                ):
                    if path.exists():
                        found = json.loads(path.read_text())
                        break
                if found is None:
                    missing += 1
                else:
                    rows.append(found)
    return rows, missing


def write_results(out_dir: Path, rows: list[dict], plan, runner: _Runner) -> Path:
    """results.csv (tidy scalars) and details.json (reliability bins, per-layer data, history)."""
    import csv
    import io

    buf = io.StringIO()
    w = csv.DictWriter(
        buf, fieldnames=list(RESULT_COLUMNS), extrasaction="ignore", lineterminator="\n"
    )
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in RESULT_COLUMNS})
    path = atomic_write_text(out_dir / "results.csv", buf.getvalue())
    details: dict[str, Any] = {"reliability": {}, "inspect": [], "training": []}
    for r in rows:
        if r.get("reliability"):
            details["reliability"][r["row_id"]] = r["reliability"]
    cfg = runner.config
    for g, cells in plan:
        tkey = _train_key(cfg, g)
        meta = runner.cache / "train" / tkey / "meta.json"
        if meta.exists():
            m = json.loads(meta.read_text())
            details["training"].append(
                {
                    "dataset": g.dataset,
                    "arch": g.model.arch,
                    "width": g.model.width,
                    "seed": g.seed,
                    "history": m.get("history", []),
                    "seconds": m.get("seconds"),
                }
            )
        for cell in cells[1:]:
            lpath = runner.cache / "logits" / f"{_logits_key(cfg, cell, tkey)}.json"
            if lpath.exists():
                lm = json.loads(lpath.read_text())
                if lm.get("inspect"):
                    details["inspect"].append(
                        {
                            "dataset": g.dataset,
                            "arch": g.model.arch,
                            "width": g.model.width,
                            "seed": g.seed,
                            "precision": cell.precision,
                            "observer": cell.observer,
                            "ptq_sample": cell.sample,
                            "layers": lm["inspect"],
                        }
                    )
    atomic_write_json(out_dir / "details.json", details)
    return path


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
) -> Path:
    """Run (or finish) a study into ``out_dir``; returns the folder.

    ``resume=False`` clears the cache first. With ``shard=(i, n)`` only every n-th training group
    is computed here; whichever shard completes the last cell writes results.csv and the report.
    """
    import shutil

    from tqdm.auto import tqdm

    config = load_study(config_or_path, overrides)
    i, n = shard
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"shard must be (i, n) with 0 <= i < n, got {shard!r}")
    out = Path(out_dir) if out_dir is not None else Path("runs") / config.name
    out.mkdir(parents=True, exist_ok=True)
    if not resume and (out / "cache").exists():
        shutil.rmtree(out / "cache")
    dev = _resolve_device(device)
    if log is None:
        log = (lambda s: None) if quiet else (lambda s: tqdm.write(s))
    atomic_write_text(out / "config.toml", config.to_toml())
    atomic_write_json(out / "env.json", environment_record(dev))
    runner = _Runner(config, out, dev, quiet, log)
    plan = expand_cells(config)
    mine = [(g, cells) for k, (g, cells) in enumerate(plan) if k % n == i]
    bar = tqdm(mine, desc=f"study {config.name}", unit="model", disable=quiet or None)
    for g, cells in bar:
        bar.set_postfix_str(g.label)
        runner.run_group(g, cells)
    if _rank() != 0:
        return out
    rows, missing = _collect_rows(runner, plan)
    if missing:
        log(
            f"{missing} result rows are still missing (other shards running?); "
            f"when all shards are done, `quantcal report {out}` assembles them"
        )
        return out
    write_results(out, rows, plan, runner)
    if report:
        from quantcal import report as report_mod

        report_mod.write_report(out)
    return out


def iter_rows(out_dir: str | Path) -> Iterator[dict[str, str]]:
    """Rows of ``out_dir/results.csv`` as dicts of strings."""
    import csv

    with open(Path(out_dir) / "results.csv", newline="", encoding="utf-8") as fh:
        yield from csv.DictReader(fh)


def assemble(out_dir: str | Path, *, report: bool = True) -> Path:
    """Collect the cached rows of a (possibly sharded) run into results.csv and the report.

    Raises ``ValueError`` naming how many rows are missing when some cells never ran.
    """
    out = Path(out_dir)
    cfg_path = out / "config.toml"
    if not cfg_path.exists():
        raise FileNotFoundError(
            f"{out} holds no config.toml: is it a `quantcal run` output folder?"
        )
    config = load_study(cfg_path)
    runner = _Runner(config, out, "cpu", True, lambda s: None)
    plan = expand_cells(config)
    rows, missing = _collect_rows(runner, plan)
    if missing:
        raise ValueError(
            f"{missing} result rows of {out} are missing: some cells have not run yet. Finish the "
            f"study (re-run `quantcal run` with the same study and --out; every shard) first."
        )
    write_results(out, rows, plan, runner)
    if report:
        from quantcal import report as report_mod

        report_mod.write_report(out)
    return out
