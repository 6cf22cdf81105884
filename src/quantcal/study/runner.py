"""The study runner: train -> deploy -> quantize -> logits -> recalibrate -> measure -> rows.

Every expensive stage is cached on disk under ``out_dir/cache`` by a hash of its canonical config
plus the keys of its inputs, so re-running a finished study does no training or inference and a
run killed at any moment redoes only what is missing:

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
again (see ``quantcal.study.cache``). The output folder must be quantcal's (``quantcal.study.runfolder``).

Before computing anything, the inputs of this shard's groups are checked (datasets load, model
factories import, checkpoints fit): bad input raises ``ValueError`` and nothing is computed. A cell
that fails later becomes an error row (``status = "error"`` and the message) and the sweep goes
on; error rows are kept in ``cache/errors`` so that shards can assemble them, and are retried on
the next run (:func:`failed_rows` lists them). ``shard=(i, n)`` gives shard ``i`` every ``n``-th
training group; all shards share one output folder and the last to finish writes
``results.csv`` and the report.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantcal import _isa
from quantcal._io import atomic_write_bytes, atomic_write_json, atomic_write_text, torch_bytes
from quantcal.calibration.recal_splits import (
    FitFn,
    crossfit_folds,
    fit_and_apply,
    fold,
    recalibrate,
)
from quantcal.study import runfolder as _runfolder
from quantcal.study.cache import Cache
from quantcal.study.config import (
    REUSE_FP32_TEMPERATURE,
    ModelSpec,
    StudyConfig,
    content_hash,
    load_study,
)
from quantcal.study.digest import FileDigests
from quantcal.training import images as _images

__all__ = [
    "RESULT_COLUMNS",
    "Group",
    "QuantCell",
    "StudyConfig",
    "expand_cells",
    "failed_rows",
    "load_study",
    "parse_shard",
    "run_study",
]

# Each stage's cache version: bumping one recomputes that stage and those after it, never the
# stages before (v2: data content digests and pinned threads in the keys, verified entries;
# rows v3: smooth ECE and the plug-in l2 ECE measured).
_TRAIN_VERSION = 2
_LOGITS_VERSION = 2
_ROW_VERSION = 3
_ATTRIBUTION_VERSION = 1

#: Columns of results.csv, in order (one row per dataset, arch, width, training objective, seed,
#: precision, observer, quantization method, range-calibration sample and recalibration method).
RESULT_COLUMNS = (
    "dataset",
    "arch",
    "width",
    "objective",
    "seed",
    "precision",
    "observer",
    "method",
    "ptq_sample",
    "recal",
    "recal_fit",
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
    "ece_l2",
    "smooth_ece",
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
    "bops",
    "quantized_layers",
    "n_test",
    "n_fit",
    "n_classes",
    "n_bins",
    "row_id",
)


@dataclass(frozen=True)
class Group:
    """One trained network: a dataset, an architecture at a width, a training objective (its
    label, see :func:`quantcal.training.objectives.label`), a seed."""

    dataset: str
    model: ModelSpec
    seed: int
    objective: str = "ce"

    @property
    def label(self) -> str:
        obj = "" if self.objective == "ce" else f" / {self.objective}"
        return f"{self.dataset} / {self.model.label}{obj} / seed {self.seed}"


@dataclass(frozen=True)
class QuantCell:
    """One evaluated network: a group at a precision, range estimator, range-calib sample and
    quantization method (``quant.available_methods()``; "ptq" for fp32 too, where it is moot)."""

    group: Group
    precision: str
    observer: str | None  # None for fp32
    sample: int | None  # None for fp32
    method: str = "ptq"

    @property
    def where(self) -> str:
        """ " minmax sample 0" (and the method when not ptq); "" for fp32."""
        if self.is_fp32:
            return ""
        how = "" if self.method == "ptq" else f" {self.method}"
        return f" {self.observer} sample {self.sample}{how}"

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
    objectives = config.objective_labels()
    for dataset in config.datasets:
        for spec in config.models:
            for objective in objectives:
                for seed in config.seeds:
                    g = Group(dataset, spec, seed, objective)
                    cells = [QuantCell(g, "fp32", None, None)]
                    for p in config.precisions:
                        if p.lower() == "fp32":
                            continue
                        for obs in config.observers:
                            for s in range(config.ptq_calib_samples):
                                for m in config.quant_methods:
                                    cells.append(QuantCell(g, p, obs, s, m))
                    if config.plans is not None:
                        for kind in PLAN_KINDS:
                            cells.append(QuantCell(g, f"plan:{kind}", config.observers[0], 0))
                    out.append((g, cells))
    return out


def _objective_spec(config: StudyConfig, g: Group) -> dict[str, Any]:
    """The canonical objective of a group (looked up by its label)."""
    from quantcal.training import objectives

    for spec in config.objectives or ():
        if objectives.label(spec) == g.objective:
            return dict(spec)
    return objectives.canonical(g.objective)


# ---------------------------------------------------------------------------------------------
# Keys
# ---------------------------------------------------------------------------------------------
def _split_args(config: StudyConfig, g: Group) -> tuple:
    """What decides a group's splits besides the data's content."""
    return (
        g.dataset,
        g.seed,
        config.val_size,
        config.ptq_calib_size,
        config.ptq_calib_samples,
        config.train_size,
    )


def _train_key(
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
    dataset, seed, val_size, ptq_size, ptq_samples, train_size = _split_args(config, g)
    spec: dict[str, Any] = {
        "v": _TRAIN_VERSION,
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
        spec["train"] = {**config.train, "objective": _objective_spec(config, g), "seed": g.seed}
    return content_hash(spec)


def import_factory(arch: str) -> Callable[..., Any]:
    """The callable named by ``module:function`` or ``path/to/file.py:function`` (or, for
    ``timm:NAME``, a factory of timm's model NAME: :func:`quantcal.models.external.timm_factory`).

    A module is looked up on ``sys.path`` and then in the current folder; a ``.py`` path is
    loaded from that file (no ``PYTHONPATH`` needed). ValueError saying how to fix it if not."""
    import importlib
    import importlib.util
    import sys

    from quantcal.models.external import TIMM_PREFIX, timm_factory

    if arch.lower().startswith(TIMM_PREFIX):
        return timm_factory(arch[len(TIMM_PREFIX) :])
    mod_name, _, fn_name = arch.rpartition(":")
    try:
        if mod_name.endswith(".py"):
            path = Path(mod_name).expanduser().resolve()
            if not path.is_file():
                raise ImportError(f"no file {path}")
            name = f"quantcal_user_{hashlib.sha256(str(path).encode()).hexdigest()[:12]}"
            module = sys.modules.get(name)
            if module is None:
                spec = importlib.util.spec_from_file_location(name, path)
                if spec is None or spec.loader is None:
                    raise ImportError(f"cannot load {path} as a Python module")
                module = importlib.util.module_from_spec(spec)
                sys.modules[name] = module
                try:
                    spec.loader.exec_module(module)
                except BaseException:
                    del sys.modules[name]
                    raise
        else:
            try:
                module = importlib.import_module(mod_name)
            except ModuleNotFoundError:
                cwd = str(Path.cwd())
                if cwd in sys.path or not (
                    Path(cwd, *mod_name.split(".")).with_suffix(".py").is_file()
                    or Path(cwd, *mod_name.split("."), "__init__.py").is_file()
                ):
                    raise
                sys.path.append(cwd)
                module = importlib.import_module(mod_name)
        return getattr(module, fn_name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(
            f"cannot import model factory {arch!r}: {exc}. Give 'module:function' (the module "
            "on PYTHONPATH or in the current folder) or 'path/to/file.py:function'"
        ) from exc


def build_model(
    arch: str,
    *,
    num_classes: int,
    image_size: int,
    in_chans: int,
    width: float,
    seed: int | None = None,
):
    """A registry model, ``timm:NAME``, or ``module:factory``: a callable imported from a
    module and called with whichever of (num_classes, image_size, in_chans, width) its
    signature accepts."""
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
    factory = import_factory(arch)
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
    return load_state(model, obj, path)


def load_state(model, obj: Any, where: str | Path):
    """Load a loaded checkpoint object (see :func:`load_weights`) into ``model``; eval mode."""
    state = obj
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_state"):
            if isinstance(obj.get(key), dict):
                state = obj[key]
                break
    if not isinstance(state, dict):
        raise ValueError(
            f"checkpoint {where} holds a {type(state).__name__}, not a state dict; re-save it "
            "with torch.save(model.state_dict(), path)"
        )
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        shown = " ".join(lines[:3]) + (
            f" ... ({len(lines) - 3} more lines)" if len(lines) > 3 else ""
        )
        raise ValueError(
            f"checkpoint {where} does not fit the model: {shown}. Check the model name, width and "
            "number of classes"
        ) from exc
    return model.eval()


#: The mixed-precision cells of ``[quant] plans``: a calibration budget, and accuracy only.
PLAN_KINDS = ("calib", "accuracy")


def plan_notes(record: dict[str, Any], precision: str) -> list[str]:
    """What a plan cell's numbers may not mean: a search whose top level already broke the
    budget on its search images, as a point or by its upper bound (the plan is then all top
    level)."""
    if record.get("within_budget", True):
        return []
    top = next(iter(record["uniform_costs"]), "the top level")
    m, f = record["metrics"], record["fp32"]
    bound = record.get("bound") or {}
    level = bound.get("level")

    def upto(key: str, what: str) -> str:
        hi = m.get(key)
        if hi is None or level is None:
            return ""
        return f", {what} up to {100 * hi:.1f} points at {100 * level:.0f} % confidence"

    ece = (
        f", ECE after {record['budget']['recal']} {100 * m['ece']:.1f} % vs fp32 "
        f"{100 * f['ece']:.1f} %{upto('ece_rise_hi', 'rise')}"
        if "ece" in m and "ece" in f
        else ""
    )
    where = (
        "on its search half of test"
        if (record.get("images") or {}).get("split") == _images.TEST_HALF
        else "on validation"
    )
    return [
        f"{precision}: even uniform {top} breaks the budget {where} (accuracy "
        f"{100 * m['accuracy']:.1f} % vs fp32 {100 * f['accuracy']:.1f} %"
        f"{upto('accuracy_drop_hi', 'loss')}{ece}), so the plan "
        f"is all {top}: loosen the budget or add a level with more bits"
    ]


def stage_images(config: StudyConfig, g: Group) -> _images.StageImages:
    """Which images group ``g``'s stages may read (``quantcal.training.images``): the one policy behind
    where recalibrators are fitted, and what the plan search and the attribution read."""
    from quantcal.training import data

    return _images.stage_images(
        outside_checkpoint=g.model.checkpoint is not None,
        val_from_train=lambda: data.val_held_out_of_train(g.dataset),
        fit_on=config.recal_fit,
    )


#: How a plan keeps its budget (part of a plan cell's cache key): upper bounds at this level.
_PLAN_RULE = "upper_bound:0.9"


def _plan_spec(config: StudyConfig, cell: QuantCell) -> dict[str, Any] | None:
    """The search settings of a ``plan:KIND`` cell, else None."""
    if not cell.precision.startswith("plan:"):
        return None
    return config.plan_spec(cell.precision.split(":", 1)[1])


def _quant_config(config: StudyConfig, cell: QuantCell):
    """The cell's QuantConfig (None for fp32); for a plan cell, the top level's, which the
    search turns into the plan (``_Runner.plan_config``)."""
    from quantcal import quant

    spec = _plan_spec(config, cell)
    qc = quant.parse_precision(spec["levels"][0] if spec else cell.precision)
    if qc is None:
        return None
    return dataclasses.replace(
        qc,
        observer=cell.observer,
        first_last_8bit=config.first_last_8bit,
        sequential=config.sequential,
        weight_granularity=config.weight_granularity,
    )


def _logits_key(config: StudyConfig, cell: QuantCell, train_key: str) -> str:
    qc = _quant_config(config, cell)
    spec: dict[str, Any] = {
        "v": _LOGITS_VERSION,
        "train": train_key,
        "quant": None if qc is None else qc.to_dict(),
        "sample": cell.sample,
    }
    plan = _plan_spec(config, cell)
    if plan is not None:  # the plan is found from these and the data, deterministically
        spec["plan"] = {**plan, "seed": cell.group.seed, "rule": _PLAN_RULE}
        images = stage_images(config, cell.group).search
        if images != _images.VAL:
            spec["plan"]["images"] = images
    if qc is not None and cell.method != "ptq":  # ptq cells keep the keys of before
        from quantcal.quant.methods import get_method

        options = get_method(cell.method).resolve(config.method_options.get(cell.method))
        spec["method"] = {"name": cell.method, "options": options}
    return content_hash(spec)


def attribution_cells(config: StudyConfig, cells: list[QuantCell]) -> list[QuantCell]:
    """The cells that get a per-layer attribution (``[quant] attribution``): every uniform
    quantized precision (or those ``attribution.precisions`` lists) of the first range
    estimator and range-calibration sample."""
    if config.attribution is None:
        return []
    wanted = config.attribution.get("precisions")
    return [
        c
        for c in cells
        if not c.is_fp32
        and not c.precision.startswith("plan:")
        and (wanted is None or c.precision in wanted)
        and c.observer == config.observers[0]
        and c.sample == 0
        and c.method == config.quant_methods[0]
    ]


def _attribution_key(config: StudyConfig, logits_key: str, images: str = "val") -> str:
    spec = {"v": _ATTRIBUTION_VERSION, "logits": logits_key, **dict(config.attribution or {})}
    if images != _images.VAL:  # val-read attributions keep the keys of before
        spec["images"] = images
    return content_hash(spec)


def _row_key(
    config: StudyConfig, logits_key: str, fp32_key: str, method: str, recal_fit: str = "val"
) -> str:
    return content_hash(
        {
            "v": _ROW_VERSION,
            "schema": list(RESULT_COLUMNS),
            "logits": logits_key,
            "fp32": fp32_key,
            "recal": method,
            "recal_fit": recal_fit,
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
        "cpu_capability": str(torch.backends.cpu.get_cpu_capability()),
        "cpu_count": os.cpu_count(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if torch.cuda.is_available():
        rec["cuda"] = torch.version.cuda
        rec["gpu"] = torch.cuda.get_device_name(0)
    return rec


def resolve_device(device: str | None) -> str:
    """``device`` as torch names it ("auto" or None: cuda when available, else cpu); a
    ValueError naming --device when it does not exist here."""
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


_resolve_device = resolve_device


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
        *,
        assembling: bool = False,
    ):
        self.config = config
        self.out = out_dir
        self.cache = out_dir / "cache"
        self.device = device
        self.quiet = quiet
        self.log = log
        #: When only assembling cached rows, a data file or checkpoint that has since moved away
        #: is identified by the digest recorded when it was used.
        self.assembling = assembling
        self.store = Cache(self.cache, log)
        self.digests = FileDigests(self.cache / "digests.json")
        self.failures: list[dict[str, Any]] = []
        self.attribution_errors: list[dict[str, str]] = []
        self.scored = 0  # rows computed (not read from the cache) by this runner
        #: Notes for every row when the study's pinned instruction set did not hold.
        self.isa_notes: list[str] = []
        self._t0 = time.perf_counter()
        self._splits: dict[tuple, Any] = {}
        self._normalized: dict[tuple, Any] = {}
        self._recal_fit: dict[Group, tuple[str, list[str]]] = {}
        self._stage_images: dict[Group, _images.StageImages] = {}
        self._data_digests: dict[str, str] = {}
        # (train key, deploy model, its warnings) of the group being evaluated
        self._deployed: tuple[str, Any, list[str]] | None = None
        #: (logits key, quantized model) of the last cell quantized: its attribution reuses it.
        self._last_qnet: tuple[str, Any] | None = None
        #: Validation metrics of mixed plans, shared by a group's plan:calib and plan:accuracy.
        self._plan_memo: dict[tuple, dict] = {}
        #: Under torchrun: quantized models (or the exception) of cells whose method trains,
        #: made by every rank together before the rank-0-only stages (``train_methods``).
        self._pretrained: dict[str, Any] = {}
        self._fp32_fits: dict[tuple[str, str], tuple[tuple[Any, float | None], list[str]]] = {}

    def say(self, message: str) -> None:
        """A progress line with the run's elapsed time (stderr; one line, no terminal needed)."""
        s = int(time.perf_counter() - self._t0)
        self.log(f"[{s // 60:>3}:{s % 60:02d}] {message}")

    # -- identities ------------------------------------------------------------------------
    def file_digest(self, path: str) -> str:
        """SHA-256 of a file (memoised by size and mtime); when assembling, the digest last
        recorded for a file that is gone."""
        try:
            return self.digests(path)
        except FileNotFoundError:
            known = self.digests.last_known(path) if self.assembling else None
            if known is None:
                raise
            return known

    def data_digest(self, dataset: str) -> str:
        from quantcal.training import data

        if dataset not in self._data_digests:
            if dataset.lower().startswith("npz:"):
                digest = "sha256:" + self.file_digest(dataset[4:])
            else:
                digest = data.dataset_digest(dataset)
            self._data_digests[dataset] = digest
        return self._data_digests[dataset]

    def normalization(self, g: Group) -> tuple[tuple[float, ...], tuple[float, ...], str] | None:
        """(mean, std, where it comes from) when the group's inputs are not normalised with the
        dataset's own statistics: the study's ``[data] mean/std``, else what a ``module:factory``
        declares as ``factory.mean`` and ``factory.std``."""
        if self.config.mean is not None and self.config.std is not None:
            return self.config.mean, self.config.std, "the study's data.mean/std"
        if ":" in g.model.arch:
            factory = import_factory(g.model.arch)
            mean, std = getattr(factory, "mean", None), getattr(factory, "std", None)
            if mean is not None and std is not None:
                as_tuple = lambda v: (  # noqa: E731 - one value or one per channel
                    (float(v),) if isinstance(v, (int, float)) else tuple(float(x) for x in v)
                )
                return as_tuple(mean), as_tuple(std), f"declared by {g.model.arch}"
        return None

    def transform(self, g: Group) -> tuple[Callable[..., Any], str, str] | None:
        """(function, identity, where it comes from) when the group's model preprocesses its
        own inputs: the study's ``[data] transform``, else what a ``module:factory`` declares
        as ``factory.transform`` (a callable or a ``module:function`` string). The identity
        (its name and the SHA-256 of its source file) goes into the cache keys."""
        import inspect

        if self.config.transform is not None:
            spec: Any = self.config.transform
            source = "the study's data.transform"
        elif ":" in g.model.arch and self.config.mean is None:
            spec = getattr(import_factory(g.model.arch), "transform", None)
            source = f"declared by {g.model.arch}"
        else:
            spec = None
        if spec is None:
            return None
        fn = import_factory(spec) if isinstance(spec, str) else spec
        if not callable(fn):
            raise ValueError(
                f"the transform ({source}) must be a callable or a 'module:function' string, got "
                f"{type(fn).__name__}"
            )
        name = spec if isinstance(spec, str) else getattr(fn, "__qualname__", repr(fn))
        try:
            file = inspect.getsourcefile(fn)
        except TypeError:
            file = None
        identity = f"{name} sha256:{self.file_digest(file)}" if file else name
        return fn, identity, source

    def recal_fit(self, g: Group) -> tuple[str, list[str]]:
        """Where the group's recalibrators are fitted (``val`` or ``test_crossfit``) and the
        notes that go with it (see ``studyconfig.RECAL_FIT``)."""
        if g not in self._recal_fit:
            self._recal_fit[g] = self._resolve_recal_fit(g)
        return self._recal_fit[g]

    def _resolve_recal_fit(self, g: Group) -> tuple[str, list[str]]:
        policy = self.stage_images(g)
        return policy.recal, list(policy.notes)

    def stage_images(self, g: Group) -> _images.StageImages:
        """The group's image policy (:func:`stage_images`), resolved once."""
        if g not in self._stage_images:
            self._stage_images[g] = stage_images(self.config, g)
        return self._stage_images[g]

    def search_split(self, g: Group):
        """The images the group's plan search and attribution read: ``val``, or for a
        checkpoint trained elsewhere whose ``val`` was carved from train, the search half of
        test (``_images.test_halves``)."""
        splits = self.splits(g)
        if self.stage_images(g).search != _images.TEST_HALF:
            return splits.val
        half = _images.test_halves(splits.test.labels, g.seed)[_images.SEARCH]
        return _images.subset(splits.test, half)

    def report_fold(self, cell: QuantCell, labels) -> tuple[Any, Any] | None:
        """(search half, report half) of test for a plan cell searched on test: its rows are
        scored on the report half only, recalibrated by fits on the search half. Else None."""
        if not cell.precision.startswith("plan:"):
            return None
        if self.stage_images(cell.group).search != _images.TEST_HALF:
            return None
        return _images.test_halves(labels, cell.group.seed)

    def train_key(self, g: Group) -> str:
        ckpt = None if g.model.checkpoint is None else self.file_digest(g.model.checkpoint)
        norm = self.normalization(g)
        transform = self.transform(g)
        return _train_key(
            self.config,
            g,
            self.data_digest(g.dataset),
            ckpt,
            None if norm is None else norm[:2],
            None if transform is None else transform[1],
        )

    # -- data ------------------------------------------------------------------------------
    def splits(self, g: Group):
        """The group's splits, normalised as its model expects (said once on stderr)."""
        from quantcal.training import data

        base = self.base_splits(g)
        norm = self.normalization(g)
        transform = self.transform(g)
        key = (
            _split_args(self.config, g),
            None if norm is None else norm[:2],
            None if transform is None else transform[1],
        )
        if key not in self._normalized:
            if transform is not None:
                self._normalized[key] = data.with_transform(base, transform[0], transform[1])
                name = transform[1].split(" sha256:")[0]
                self.say(f"data   {g.dataset}: inputs are {name}(uint8 images) ({transform[2]})")
                return self._normalized[key]
            if norm is None:
                self._normalized[key] = base
                how = f"the dataset's statistics, mean {_fmt3(base.mean)}, std {_fmt3(base.std)}"
            else:
                self._normalized[key] = data.with_normalization(
                    base, norm[0], norm[1], names=("data.mean", "data.std")
                )
                s = self._normalized[key]
                how = f"mean {_fmt3(s.mean)}, std {_fmt3(s.std)} ({norm[2]})"
            self.say(f"data   {g.dataset}: inputs are (x / 255 - mean) / std with {how}")
        return self._normalized[key]

    def base_splits(self, g: Group):
        from quantcal.training import data

        key = _split_args(self.config, g)
        if key not in self._splits:
            kw: dict[str, Any] = {"seed": g.seed}
            if self.config.val_size is not None:
                kw["val_size"] = self.config.val_size
            if self.config.ptq_calib_size is not None:
                kw["ptq_calib_size"] = self.config.ptq_calib_size * self.config.ptq_calib_samples
            splits = data.load_dataset(g.dataset, **kw)
            if self.config.train_size is not None:
                splits = data.with_train_size(splits, self.config.train_size, seed=g.seed)
            for note in splits.notes:
                self.say(f"note   {g.dataset} (seed {g.seed}): {note}")
            self._splits[key] = splits
        return self._splits[key]

    def preflight(self, groups: list[Group]) -> None:
        """Check every input of ``groups`` before computing anything: each dataset loads, each
        ``module:factory`` imports, each checkpoint loads into its model. Raises ValueError
        naming the input (bad input exits 2 and computes nothing)."""
        for g in groups:
            if ":" in g.model.arch:
                import_factory(g.model.arch)
                self.reparameterizer(g)
            try:
                self.base_splits(g)
                self.data_digest(g.dataset)
            except (ValueError, OSError) as exc:
                raise ValueError(f"dataset {g.dataset!r}: {exc}") from exc
            try:  # a bad mean/std or transform is named by with_normalization/with_transform
                splits = self.splits(g)
            except TypeError as exc:
                raise ValueError(f"the inputs of {g.label}: {exc}") from exc
            if g.model.checkpoint is not None:
                load_weights(self.fresh_model(g, splits), g.model.checkpoint)

    def fresh_model(self, g: Group, splits):
        """The group's architecture, freshly initialised for its data (seeded)."""
        return build_model(
            g.model.arch,
            num_classes=splits.num_classes,
            image_size=splits.image_size,
            in_chans=splits.channels,
            width=g.model.width,
            seed=g.seed,
        )

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
    def train_config(self, g: Group):
        """The group's training recipe (``train.TrainConfig``)."""
        from quantcal.training import train

        return train.TrainConfig.from_dict(
            {**self.config.train, "objective": _objective_spec(self.config, g), "seed": g.seed}
        )

    def trained_model(self, g: Group):
        from quantcal.training import train

        key = self.train_key(g)
        folder = self.cache / "train" / key
        splits = self.splits(g)
        model = self.fresh_model(g, splits)
        if g.model.checkpoint is not None:
            return load_weights(model, g.model.checkpoint), key, {"checkpoint": g.model.checkpoint}
        final, meta_path, last = folder / "model.pt", folder / "meta.json", folder / "last.pt"
        meta = self.store.read_json(meta_path, ("history", "model_sha256"))
        if meta is not None:
            state = self.store.read_torch(final, meta["model_sha256"])
            if state is not None:
                return load_state(model, state, final), key, meta
            meta_path.unlink(missing_ok=True)  # its model is gone: train (or resume) again
        elif final.exists():
            self.store.heal(final, "no valid meta.json beside it")
        if last.exists():
            try:
                train.load_checkpoint(last)
            except ValueError as exc:
                self.store.heal(last, str(exc).split(". ")[0])
        cfg = self.train_config(g)
        self.say(f"train  {g.label}  ({cfg.epochs} epochs)")

        def epoch_line(epoch: int, _model, rec: dict[str, float]) -> None:
            if _rank() == 0:
                self.say(
                    f"train  {g.label}  epoch {epoch}/{cfg.epochs}  loss {rec['loss']:.3f}  "
                    f"train acc {100 * rec['train_acc']:.1f} %  ({rec['seconds']:.1f} s)"
                )

        result = train.train(
            model,
            splits,
            cfg,
            device=self.device,
            out_dir=folder,
            resume=True,
            progress=not self.quiet,
            on_epoch_end=epoch_line,
        )
        trained = result.model.to("cpu").eval()
        raw = torch_bytes({"model": trained.state_dict(), "config": getattr(trained, "config", {})})
        meta = {
            "group": g.label,
            "history": result.history,
            "seconds": result.seconds,
            "train_config": cfg.to_dict(),
            "model_sha256": hashlib.sha256(raw).hexdigest(),
        }
        if _rank() == 0:  # the model first: meta.json is what marks the entry complete
            atomic_write_bytes(final, raw)
            self.store.write_json(meta_path, meta)
        return trained, key, meta

    # -- logits stage ----------------------------------------------------------------------
    def deployed(self, model, train_key: str, g: Group):
        """The fp32 deploy form of the group's trained model, built once per group: every
        cell quantizes from it (``quantize`` copies it; ``to_deploy`` of a deploy graph is the
        same function, tested bit-identical) instead of re-deploying the training form. Its
        outputs are checked against the model's on the first range-calibration images."""
        from quantcal import models

        if self._deployed is None or self._deployed[0] != train_key:
            ptq_calib = self.splits(g).ptq_calib
            x = next(ptq_calib.batches(32, device=self.device))[0] if len(ptq_calib) else None
            with _recorded_warnings() as notes:
                deploy = models.to_deploy(
                    model, reparameterize=self.reparameterizer(g), check_input=x
                )
            self._deployed = (train_key, deploy, notes)
        return self._deployed[1]

    def reparameterizer(self, g: Group) -> Callable[..., Any] | None:
        """The deploy-form helper a ``module:factory`` declares as ``factory.reparameterize``
        (a callable, or a ``module:function`` string), else None (the blocks' own methods)."""
        if ":" not in g.model.arch:
            return None
        helper = getattr(import_factory(g.model.arch), "reparameterize", None)
        if isinstance(helper, str):
            helper = import_factory(helper)
        if helper is not None and not callable(helper):
            raise ValueError(
                f"{g.model.arch}.reparameterize must be a callable or a 'module:function' "
                f"string, got {type(helper).__name__}"
            )
        return helper

    def logits(self, cell: QuantCell, model, train_key: str) -> tuple[dict, dict, str]:

        from quantcal import models, quant
        from quantcal.training import train

        key = _logits_key(self.config, cell, train_key)
        path = self.cache / "logits" / f"{key}.pt"
        meta_path = path.with_suffix(".json")
        meta = self.store.read_json(meta_path, ("sha256", "precision"))
        if meta is not None:
            cached = self.store.read_torch(path, meta["sha256"])
            if cached is not None:
                return cached, meta, key
            meta_path.unlink(missing_ok=True)
        elif path.exists():
            self.store.heal(path, "no valid JSON record beside it")
        splits = self.splits(cell.group)
        t0 = time.perf_counter()
        qc = _quant_config(self.config, cell)
        meta = {
            "precision": cell.precision,
            "observer": cell.observer,
            "sample": cell.sample,
            "method": None if qc is None else cell.method,
        }
        deploy = self.deployed(model, train_key, cell.group)
        notes = list(self._deployed[2]) if self._deployed else []
        if qc is None:
            net = deploy
        else:
            calib = self.ptq_batches(splits, cell.sample)
            plan = _plan_spec(self.config, cell)
            if plan is not None:
                qc, meta["plan"] = self.plan_config(plan, qc, deploy, calib, splits, cell)
                notes.extend(plan_notes(meta["plan"], cell.precision))
                policy_note = self.stage_images(cell.group).plan_note
                if policy_note:
                    notes.append(policy_note)
            pre = self._pretrained.pop(key, None)
            if isinstance(pre, BaseException):
                raise pre
            if pre is not None:
                net, caught = pre
            else:
                with _recorded_warnings() as caught:
                    net = self.quantize(cell, deploy, qc, calib, splits, key)
            notes.extend(n for n in caught if n not in notes)
            self._last_qnet = (key, net)
            cov = getattr(net, "quant_coverage", None)
            if cov:
                meta["quantized_layers"] = f"{cov['quantized']}/{cov['total']}"
            try:
                meta["inspect"] = quant.inspect(net, calib[:2]).to_rows()
            except Exception as exc:  # a report nicety; never lose the cell for it
                meta["inspect_error"] = f"{type(exc).__name__}: {exc}"
        stats = models.describe(
            deploy, splits.image_size, in_chans=splits.channels, config=qc
        )  # weight bytes and BOPs at each layer's bits (a mixed plan's included)
        meta.update(
            params=stats.params, macs=stats.macs, weight_bytes=stats.weight_bytes, bops=stats.bops
        )
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
        if qc is None:
            notes.extend(_fp32_model_notes(out["val_logits"], out["val_labels"]))
            notes.extend(self.input_notes(model, splits))
        meta["notes"] = notes  # what the deploy form and the quantizer could not do as asked
        for note in notes:
            self.say(f"note   {cell.group.label}  {cell.precision}: {note}")
        raw = torch_bytes(out)
        meta["sha256"] = hashlib.sha256(raw).hexdigest()
        atomic_write_bytes(path, raw)
        self.store.write_json(meta_path, meta)  # last: it marks the entry complete
        self.say(
            f"eval   {cell.group.label}  {cell.precision}{cell.where}  ({meta['seconds']:.1f} s)"
        )
        return out, meta, key

    def input_notes(self, model, splits) -> list[str]:
        """A note when the validation inputs, as preprocessed, are not what the model's first
        BatchNorm saw in training (``diagnose.input_statistics_notes``)."""
        from quantcal.calibration import diagnose

        param = next(iter(model.parameters()), None)
        device = param.device if param is not None else self.device
        x = next(iter(splits.val.batches(256, device=device)), (None,))[0]
        if x is None:
            return []
        return diagnose.input_statistics_notes(model, x, preprocessing="mean/std or transform")

    def train_methods(self, g: Group, cells: list[QuantCell], model, tkey: str) -> None:
        """Under torchrun (``WORLD_SIZE`` > 1), the cells whose method trains (``qat``) are
        quantized here by every rank together (``train.train`` runs them with DDP); rank 0
        keeps each result for its logits stage, the other ranks drop theirs. A single process
        quantizes them in the logits stage instead."""
        from quantcal.quant.methods import get_method

        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return
        for cell in cells:
            if cell.is_fp32 or not get_method(cell.method).needs_train_data:
                continue
            if self.cached_logits(cell, tkey) is not None:
                continue
            key = _logits_key(self.config, cell, tkey)
            try:
                splits = self.splits(g)
                deploy = self.deployed(model, tkey, g)
                calib = self.ptq_batches(splits, cell.sample)
                with _recorded_warnings() as caught:
                    qc = _quant_config(self.config, cell)
                    net = self.quantize(cell, deploy, qc, calib, splits, key)
                result: Any = (net, caught)
            except Exception as exc:  # rank 0 records it as the cell's error in its turn
                result = exc
            if _rank() == 0:
                self._pretrained[key] = result

    def quantize(self, cell: QuantCell, deploy, qc, calib, splits, key: str):
        """The cell's quantized model by its method (``quant.quantize``); a method that
        trains (``qat``) fine-tunes on the group's training split with the study's recipe,
        resumable from ``cache/qat/KEY``."""
        from quantcal import quant
        from quantcal.quant.methods import get_method

        spec = get_method(cell.method)
        extra: dict[str, Any] = {}
        if spec.needs_train_data:
            extra = {
                "train_data": splits,
                "train_config": self.train_config(cell.group),
                "work_dir": self.cache / "qat" / key,
            }
        label = f"{cell.group.label}  {cell.precision}{cell.where}"
        return quant.quantize(
            deploy,
            qc,
            calib,
            method=cell.method,
            method_options=self.config.method_options.get(cell.method),
            log=lambda line: self.say(f"quant  {label}: {line}"),
            **extra,
        )

    def plan_config(self, spec: dict, top, deploy, calib, splits, cell: QuantCell):
        """The mixed-precision QuantConfig of a ``plan:KIND`` cell, searched on the group's
        range-calibration sample and its search images (:meth:`search_split`: val, or one half
        of test; ``quant.plan_mixed_precision``), and the search's record for details.json
        (``images``: what it read and what its rows are scored on)."""
        from quantcal import quant

        budget = quant.PlanBudget(
            max_accuracy_drop=spec["max_accuracy_drop"],
            max_ece_rise=spec["max_ece_rise"],
            recal=spec["recal"],
            confidence=None
            if spec.get("confidence", 0.9) is False
            else spec.get("confidence", 0.9),
        )
        t0 = time.perf_counter()
        search = self.search_split(cell.group)
        result = quant.plan_mixed_precision(
            deploy,
            calib,
            search.batches(self.config.eval_batch_size, device=self.device),
            budget=budget,
            levels=spec["levels"],
            cost=spec["cost"],
            base_config=top,
            seed=cell.group.seed,
            batch_size=self.config.eval_batch_size,
            memo=self._plan_memo.setdefault((cell.group, spec["recal"]), {}),
            log=lambda line: self.say(f"plan   {cell.group.label}  {cell.precision}: {line}"),
        )
        qc = dataclasses.replace(
            result.config, observer=top.observer, first_last_8bit=top.first_last_8bit
        )
        self.say(
            f"plan   {cell.group.label}  {cell.precision}: {len(qc.layer_bits)} of "
            f"{len(result.plan)} layers off {qc.name.split('+')[0]}, {result.evaluations} "
            f"evaluations ({time.perf_counter() - t0:.1f} s)"
        )
        record = result.as_dict()
        policy = self.stage_images(cell.group)
        record["images"] = policy.describe(len(search), stage="the plan search")
        halved = policy.search == _images.TEST_HALF
        record["images"]["scored_on"] = _images.REPORT_HALF if halved else "test"
        record["images"]["n_scored"] = len(splits.test) - (len(search) if halved else 0)
        return qc, record

    def attribution_path(self, cell: QuantCell, train_key: str) -> Path:
        lkey = _logits_key(self.config, cell, train_key)
        images = self.stage_images(cell.group).search
        return self.cache / "attribution" / f"{_attribution_key(self.config, lkey, images)}.json"

    def attribution(self, cell: QuantCell, model, train_key: str) -> dict[str, Any]:
        """The cell's per-layer attribution (``quant.attribute_layers`` on the first
        ``[quant] attribution.samples`` images of :meth:`search_split`: val, or the search half
        of test), cached like every stage; ``images`` in the record says which."""
        from quantcal import quant

        path = self.attribution_path(cell, train_key)
        cached = self.store.read_json(path, ("groups", "precision"))
        if cached is not None:
            return cached
        spec = self.config.attribution or {}
        splits = self.splits(cell.group)
        lkey = _logits_key(self.config, cell, train_key)
        if self._last_qnet is not None and self._last_qnet[0] == lkey:
            net = self._last_qnet[1]  # quantized moments ago by the logits stage
        else:  # its logits came from the cache: quantize again (deterministic)
            deploy = self.deployed(model, train_key, cell.group)
            calib = self.ptq_batches(splits, cell.sample)
            with _recorded_warnings():  # the logits stage has already named what they say
                qc = _quant_config(self.config, cell)
                net = self.quantize(cell, deploy, qc, calib, splits, lkey)
        search = self.search_split(cell.group)
        n = min(int(spec["samples"]), len(search))
        result = quant.attribute_layers(
            net,
            search.batches(self.config.eval_batch_size, device=self.device),
            granularity=spec["granularity"],
            n_bins=self.config.n_bins,
            max_samples=n,
        )
        result.images = self.stage_images(cell.group).describe(n, stage="the attribution")
        record = result.as_dict()
        self.store.write_json(path, record)
        for note in result.notes:
            self.say(f"note   {cell.group.label}  {cell.precision} attribution: {note}")
        self.say(
            f"attrib {cell.group.label}  {cell.precision}: {len(result.groups)} "
            f"{spec['granularity']}s x 2 over {n} {result.images['split']} images "
            f"({result.seconds:.1f} s, "
            f"{result.work_fraction:.0%} of the work of full passes)"
        )
        return record

    def cached_logits(self, cell: QuantCell, train_key: str) -> dict | None:
        """The cell's cached logits (verified), or None when absent or damaged."""
        path = self.cache / "logits" / f"{_logits_key(self.config, cell, train_key)}.pt"
        meta = self.store.read_json(path.with_suffix(".json"), ("sha256", "precision"))
        return None if meta is None else self.store.read_torch(path, meta["sha256"])

    # -- row stage -------------------------------------------------------------------------
    def _fp32_fit_for(self, fp32_key: str) -> FitFn:
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
                    result = fit_and_apply(method, fp32, fp32)
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
        fp32_meta: dict | None = None,
    ) -> dict[str, Any]:
        fit_on, fit_notes = self.recal_fit(cell.group)
        key = _row_key(self.config, lkey, fp32_key, method, fit_on)
        path = self.cache / "rows" / f"{key}.json"
        cached = self.store.read_json(path, ("row_id", "status"))
        if cached is not None:
            return cached
        notes: list[str] = []
        for n in (
            *self.splits(cell.group).notes,
            *(fp32_meta or {}).get("notes", []),  # the model's: they hold for every cell
            *lmeta.get("notes", []),
            *fit_notes,
            *self.isa_notes,
        ):
            if n not in notes:
                notes.append(n)
        self.scored += 1
        fp32_fit = self._fp32_fit_for(fp32_key)
        report_on = self.report_fold(cell, lg["test_labels"])
        row = _score(self.config, cell, method, lg, fp32, fp32_fit, notes, fit_on, report_on)
        row.update(
            params=lmeta.get("params"),
            macs=lmeta.get("macs"),
            weight_bytes=lmeta.get("weight_bytes"),
            bops=lmeta.get("bops"),
            quantized_layers=lmeta.get("quantized_layers"),
            row_id=key,
        )
        self.store.write_json(path, row)
        err = self.cache / "errors" / f"{key}.json"
        if err.exists():
            err.unlink()
        return row

    def error_row(self, cell: QuantCell, method: str, key: str, exc: BaseException) -> dict:
        """Record a failed (cell, method): in ``cache/errors`` for assembly and retry, and in
        :attr:`failures` (kept even when the disk refuses the record, e.g. when it is full)."""
        row = _base_row(self.config, cell, method)
        row.update(status="error", error=f"{type(exc).__name__}: {exc}", row_id=key)
        self.failures.append(row)
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        try:
            self.store.write_json(self.cache / "errors" / f"{key}.json", row)
            atomic_write_text(self.cache / "errors" / f"{key}.log", tb)
        except OSError as write_exc:
            self.say(f"error  cannot record the failure in {self.cache / 'errors'}: {write_exc}")
        return row

    def error_rows(self, cells: list[QuantCell], exc: BaseException) -> None:
        """Error rows for every method of cells whose logits never came to exist."""
        for cell in cells:
            for m in self.config.recal:
                self.error_row(cell, m, _pending_key(cell, m), exc)
        what = "every cell" if len(cells) > 1 else f"{cells[0].precision}"
        self.say(f"error  {cells[0].group.label} ({what}): {type(exc).__name__}: {exc}")

    # -- a whole group ---------------------------------------------------------------------
    def run_group(self, g: Group, cells: list[QuantCell]) -> None:
        methods = self.config.recal
        try:
            model, tkey, _ = self.trained_model(g)
        except Exception as exc:
            self.error_rows(cells, exc)
            return
        self.train_methods(g, cells, model, tkey)
        if _rank() != 0:
            return  # under torchrun, ranks > 0 only help to train
        fp32_cell = cells[0]
        try:
            fp32, fp32_meta, fp32_key = self.logits(fp32_cell, model, tkey)
        except Exception as exc:
            self.error_rows(cells, exc)
            return
        attributed = set(attribution_cells(self.config, cells))
        for cell in cells:
            try:
                if cell.is_fp32:
                    lg, lmeta, lkey = fp32, fp32_meta, fp32_key
                else:
                    lg, lmeta, lkey = self.logits(cell, model, tkey)
            except Exception as exc:
                self.error_rows([cell], exc)
                continue
            t0, scored = time.perf_counter(), self.scored
            for m in methods:
                try:
                    self.row(cell, m, lg, lmeta, lkey, fp32, fp32_key, fp32_meta)
                except Exception as exc:
                    rk = _row_key(self.config, lkey, fp32_key, m, self.recal_fit(g)[0])
                    self.error_row(cell, m, rk, exc)
                    self.say(f"error  {g.label} {cell.precision} {m}: {type(exc).__name__}: {exc}")
            if self.scored > scored:
                self.say(
                    f"score  {g.label}  {cell.precision}{cell.where}: {self.scored - scored} rows "
                    f"recalibrated and measured ({time.perf_counter() - t0:.1f} s)"
                )
            if cell in attributed:  # right after its logits: the quantized model is reused
                try:
                    self.attribution(cell, model, tkey)
                except Exception as exc:  # the rows stand; the failure is recorded and said
                    self.attribution_errors.append(
                        {
                            "label": f"{g.label} {cell.precision}",
                            "error": f"{type(exc).__name__}: {exc}",
                        }
                    )
                    self.say(
                        f"error  {g.label} {cell.precision} attribution: "
                        f"{type(exc).__name__}: {exc}"
                    )
        self._last_qnet = None  # the next group's cells are other models


def _fmt3(values: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def _fp32_model_notes(logits, labels) -> list[str]:
    """Notes on the fp32 model from its validation logits, for every row of its group (near
    chance, an extreme temperature): ``diagnose.prediction_notes``, the one source of the sanity
    notes every path that yields a model's predictions gets."""
    from quantcal.calibration import diagnose

    return diagnose.prediction_notes(
        logits, labels, subject="the fp32 model", preprocessing="mean/std"
    )


@contextmanager
def _recorded_warnings() -> Iterator[list[str]]:
    """Collect the messages of warnings raised inside (each once) instead of printing them:
    they become notes on the result rows and progress lines on stderr."""
    import warnings

    messages: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield messages
    for w in caught:
        if str(w.message) not in messages:
            messages.append(str(w.message))


def _pending_key(cell: QuantCell, method: str) -> str:
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
            ]
        }
    )


def _base_row(config: StudyConfig, cell: QuantCell, method: str) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(RESULT_COLUMNS)
    row.update(
        dataset=cell.group.dataset,
        arch=cell.group.model.arch,
        width=cell.group.model.width,
        objective=cell.group.objective,
        seed=cell.group.seed,
        precision=cell.precision,
        observer=cell.observer or "-",
        method="-" if cell.is_fp32 else cell.method,
        ptq_sample=-1 if cell.sample is None else cell.sample,
        recal=method,
        recal_fit=config.recal_fit,
        status="ok",
        error="",
        n_bins=config.n_bins,
    )
    return row


def _score(
    config: StudyConfig,
    cell: QuantCell,
    method: str,
    lg: dict,
    fp32: dict,
    fp32_fit: FitFn | None = None,
    notes: list[str] | None = None,
    recal_fit: str = "val",
    report_on: tuple[Any, Any] | None = None,
) -> dict[str, Any]:
    """One result row of (cell, method); ``notes`` (e.g. the data's) start its notes column.
    ``recal_fit`` is ``val`` or ``test_crossfit`` (:func:`quantcal.calibration.recal_splits.crossfit_folds`,
    seeded by the group's seed; the bootstrap then resamples test images with their out-of-fold
    recalibrated logits, so the intervals hold the test sampling but not the variability of the
    half-size fits).
    ``report_on`` (search half, report half) of test: the row is scored on the report half
    only, every recalibrator fitted on the search half (a plan searched on that half)."""
    from quantcal.calibration import metrics, recal

    fit_column = recal_fit
    if report_on is not None:
        lg, fp32 = fold(lg, *report_on), fold(fp32, *report_on)
        recal_fit, fp32_fit = "val", None  # fitted on the search half, the folds' "val"
    labels = lg["test_labels"]
    notes = list(notes or [])
    folds = None
    if recal_fit == "test_crossfit" and method != "none":
        folds = crossfit_folds(labels, cell.group.seed)
        fp32_fit = None  # the memoised fits are on val
    z, temperature = recalibrate(method, lg, fp32, notes, fp32_fit, folds)

    rep = metrics.calibration_report(z, labels, n_bins=config.n_bins)
    row = _base_row(config, cell, method)
    row.update({k: float(v) for k, v in rep.items() if k in row})
    row["n_test"] = int(labels.shape[0])
    row["recal_fit"] = fit_column
    row["temperature"] = temperature
    boot = {"n_resamples": config.bootstrap, "level": config.level, "seed": cell.group.seed}
    if config.bootstrap > 0:
        row["ece_lo"], row["ece_hi"] = metrics.bootstrap_ci("ece", z, labels, **boot)
        row["accuracy_lo"], row["accuracy_hi"] = metrics.bootstrap_ci("accuracy", z, labels, **boot)
        z_fp32, _ = recalibrate(method, fp32, fp32, [], fp32_fit, folds)
        d = metrics.paired_bootstrap_diff("ece", z, z_fp32, labels, **boot)
        row["ece_diff_vs_fp32"], row["ece_diff_vs_fp32_lo"], row["ece_diff_vs_fp32_hi"] = d
        d = metrics.paired_bootstrap_diff("ece", z, lg["test_logits"], labels, **boot)
        row["ece_diff_vs_none"], row["ece_diff_vs_none_lo"], row["ece_diff_vs_none_hi"] = d
    row["n_classes"] = int(lg["test_logits"].shape[1])
    if method == "none":
        row["n_fit"] = None
    elif folds is not None:
        row["n_fit"] = min(len(fit_idx) for fit_idx, _ in folds)
    else:  # the fp32 model's temperature (reused) was fitted on its own val split
        fit_on = fp32 if method == REUSE_FP32_TEMPERATURE else lg
        row["n_fit"] = int(fit_on["val_labels"].shape[0])
    diff = tuple(row.get(f"ece_diff_vs_none{s}") for s in ("", "_lo", "_hi"))
    for note in recal.fit_notes(method, row["n_fit"], row["n_classes"], diff):
        if note not in notes:
            notes.append(note)
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
        tkey = runner.train_key(g)
        fp32_key = _logits_key(cfg, cells[0], tkey)
        for cell in cells:
            lkey = _logits_key(cfg, cell, tkey)
            for m in cfg.recal:
                rk = _row_key(cfg, lkey, fp32_key, m, runner.recal_fit(g)[0])
                found = None
                for path in (
                    runner.cache / "rows" / f"{rk}.json",
                    runner.cache / "errors" / f"{rk}.json",
                    runner.cache / "errors" / f"{_pending_key(cell, m)}.json",
                ):
                    found = runner.store.read_json(path, ("row_id", "status"))
                    if found is not None:
                        break
                if found is None:
                    missing += 1
                else:
                    rows.append(found)
    return rows, missing


def write_csv(out_dir: Path, rows: list[dict]) -> Path:
    """``out_dir/results.csv``: one line per row, the columns of :data:`RESULT_COLUMNS`."""
    import csv
    import io

    buf = io.StringIO()
    w = csv.DictWriter(
        buf, fieldnames=list(RESULT_COLUMNS), extrasaction="ignore", lineterminator="\n"
    )
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in RESULT_COLUMNS})
    return atomic_write_text(out_dir / "results.csv", buf.getvalue())


def reliability_details(rows: list[dict]) -> dict[str, Any]:
    """The ``details.json`` skeleton with each row's reliability bins by row id."""
    details: dict[str, Any] = {"reliability": {}, "inspect": [], "training": []}
    for r in rows:
        if r.get("reliability"):
            details["reliability"][r["row_id"]] = r["reliability"]
    return details


def write_results(out_dir: Path, rows: list[dict], plan, runner: _Runner) -> Path:
    """results.csv (tidy scalars) and details.json (reliability bins, per-layer data, history)."""
    path = write_csv(out_dir, rows)
    details = reliability_details(rows)
    cfg = runner.config
    for g, cells in plan:
        tkey = runner.train_key(g)
        group = {
            "dataset": g.dataset,
            "arch": g.model.arch,
            "width": g.model.width,
            "objective": g.objective,
            "seed": g.seed,
        }
        m = runner.store.read_json(runner.cache / "train" / tkey / "meta.json")
        if m is not None:
            details["training"].append(
                {**group, "history": m.get("history", []), "seconds": m.get("seconds")}
            )
        for cell in cells[1:]:
            lm = runner.store.read_json(
                runner.cache / "logits" / f"{_logits_key(cfg, cell, tkey)}.json"
            )
            if lm is not None and lm.get("plan"):
                details.setdefault("plans", []).append(
                    {**group, "precision": cell.precision, **lm["plan"]}
                )
            if lm is not None and lm.get("inspect"):
                details["inspect"].append(
                    {
                        **group,
                        "precision": cell.precision,
                        "observer": cell.observer,
                        "method": cell.method,
                        "ptq_sample": cell.sample,
                        "layers": lm["inspect"],
                    }
                )
    details["stage_images"] = _stage_images_records(runner, plan)
    details["diagnostics"] = _diagnostics(runner, plan)
    details["attribution"] = _attributions(runner, plan)
    details["ablation"] = _ablation_contrasts(runner, plan)
    details["repair"] = _repair_contrasts(runner, plan)
    atomic_write_json(out_dir / "details.json", details)
    return path


def _diagnostics(runner: _Runner, plan) -> list[dict[str, Any]]:
    """:func:`quantcal.calibration.diagnose.diagnose` of every quantized cell of the first range estimator
    and range-calibration sample against its fp32 cell, from the cached logits (a cell whose
    logits are not cached, e.g. a failed one, is skipped)."""
    from quantcal.calibration import diagnose

    cfg = runner.config
    out = []
    first_observer = cfg.observers[0]
    for g, cells in plan:
        tkey = runner.train_key(g)
        fp32 = runner.cached_logits(cells[0], tkey)
        if fp32 is None:
            continue
        fit = runner.recal_fit(g)[0]
        split = "test" if fit == "test_crossfit" else "val"
        for cell in cells[1:]:
            if (
                cell.observer != first_observer
                or cell.sample != 0
                or cell.method != cfg.quant_methods[0]
            ):
                continue
            q = runner.cached_logits(cell, tkey)
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
            d.update(
                dataset=g.dataset,
                arch=g.model.arch,
                width=g.model.width,
                objective=g.objective,
                seed=g.seed,
                precision=cell.precision,
            )
            out.append(d)
    return out


def _stage_images_records(runner: _Runner, plan) -> list[dict[str, Any]]:
    """Per group, which images its stages read (:func:`stage_images`): ``recal_fit`` (val or
    test_crossfit), ``search`` (what plans and attribution read: val or test_half),
    ``plans_scored_on`` (test, or test_other_half) and ``why``."""
    out = []
    for g, _cells in plan:
        p = runner.stage_images(g)
        halved = p.search == _images.TEST_HALF
        out.append(
            {
                "dataset": g.dataset,
                "arch": g.model.arch,
                "width": g.model.width,
                "objective": g.objective,
                "seed": g.seed,
                "recal_fit": p.recal,
                "search": p.search,
                "plans_scored_on": _images.REPORT_HALF if halved else "test",
                "why": p.describe(0, stage="plan search and attribution")["why"],
            }
        )
    return out


def _attributions(runner: _Runner, plan) -> list[dict[str, Any]]:
    """The cached attribution of every attributed cell, with its group's identity; a cell
    whose attribution failed has ``error`` instead of numbers."""
    out = []
    errors = {e["label"]: e["error"] for e in runner.attribution_errors}
    for g, cells in plan:
        tkey = runner.train_key(g)
        for cell in attribution_cells(runner.config, cells):
            ident = {
                "dataset": g.dataset,
                "arch": g.model.arch,
                "width": g.model.width,
                "objective": g.objective,
                "seed": g.seed,
                "precision": cell.precision,
            }
            rec = runner.store.read_json(runner.attribution_path(cell, tkey), ("groups",))
            if rec is not None:
                if not rec.get("images"):  # cached before records said it: val (keyed so)
                    rec["images"] = runner.stage_images(g).describe(0, stage="the attribution")
                    rec["images"]["n_images"] = None
                out.append({**ident, **rec})
            else:
                error = errors.get(f"{g.label} {cell.precision}", "not computed (see the log)")
                out.append({**ident, "error": error})
    return out


def _ablation_contrasts(runner: _Runner, plan) -> list[dict[str, Any]]:
    """Paired contrasts of the ablation family (:mod:`quantcal.findings.ablation`) from cached logits."""
    from quantcal.findings import ablation

    return ablation.contrasts(runner, plan)


def _repair_contrasts(runner: _Runner, plan) -> list[dict[str, Any]]:
    """Paired contrasts of the quantization methods (:mod:`quantcal.findings.repair`) from cached
    logits."""
    from quantcal.findings import repair

    return repair.contrasts(runner, plan)


def _stderr_log(message: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(message, file=sys.stderr)


@contextmanager
def _pinned_threads(threads: int | None) -> Iterator[None]:
    """Run with ``threads`` intra-op CPU threads (None: leave PyTorch's setting), then restore."""
    import torch

    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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
        log = (lambda s: None) if quiet else _stderr_log
    if not resume:
        removed = _runfolder.clear_cache(out)
        if removed:
            log(f"fresh  removed {removed} cache entries of {out}")
    stale = _runfolder.remove_stale_tmp(out)
    if stale:
        log(f"cache  removed {len(stale)} temporary files left by a killed run")
    dev = _resolve_device(device)
    with _pinned_threads(config.threads):
        runner = _Runner(config, out, dev, quiet, log)
        runner.isa_notes = isa_notes
        for note in isa_notes:
            log(f"note   {note}")
        plan = expand_cells(config)
        mine = [(g, cells) for k, (g, cells) in enumerate(plan) if k % n == i]
        try:
            runner.preflight([g for g, _ in mine])
        except ValueError:
            if made_here and _rank() == 0:  # leave no empty marked folder behind
                _runfolder.empty(out, remove_folder=not existed)
            raise
        atomic_write_text(out / "config.toml", config.to_toml(applicable_only=True))
        atomic_write_json(out / "env.json", environment_record(dev))
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
    runner.say(f"write  {out / 'results.csv'} ({len(rows)} rows)")
    if report:
        from quantcal.report import html as report_mod

        report_mod.write_report(out)
        runner.say(f"write  {out / 'report.html'}")
    return out


def iter_rows(out_dir: str | Path) -> Iterator[dict[str, str]]:
    """Rows of ``out_dir/results.csv`` as dicts of strings."""
    import csv

    with open(Path(out_dir) / "results.csv", newline="", encoding="utf-8") as fh:
        yield from csv.DictReader(fh)


def _assembler(out_dir: str | Path, log: Callable[[str], None]) -> tuple[_Runner, list]:
    out = Path(out_dir)
    cfg_path = out / "config.toml"
    if not cfg_path.is_file():
        raise FileNotFoundError(
            f"{out} holds no config.toml: is it a `quantcal run` output folder?"
        )
    config = load_study(cfg_path)
    _isa.pin(config.isa)  # the keys hold the instruction set: ask for the run's
    return _Runner(config, out, "cpu", True, log, assembling=True), expand_cells(config)


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
    runner, plan = _assembler(out_dir, lambda s: None)
    cfg = runner.config
    out: dict[tuple, tuple[Any, Any]] = {}
    for g, cells in plan:
        tkey = runner.train_key(g)

        fp32 = runner.cached_logits(cells[0], tkey)
        if fp32 is None:
            continue
        fit = runner.recal_fit(g)[0]
        for cell in cells:
            if first_sample_only and cell.sample not in (None, 0):
                continue
            lg = fp32 if cell.is_fp32 else runner.cached_logits(cell, tkey)
            if lg is None:
                continue
            labels = lg["test_labels"]
            report_on = None if cell.is_fp32 else runner.report_fold(cell, labels)
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
    """The attributions of a finished run that failed (``details.json``, with ``error``)."""
    path = Path(out_dir) / "details.json"
    if not path.is_file():
        return []
    return [r for r in json.loads(path.read_text()).get("attribution", []) if "error" in r]


def failed_rows(out_dir: str | Path) -> list[dict[str, Any]]:
    """The error rows recorded in a run folder's cache (every shard's), for its study."""
    runner, plan = _assembler(out_dir, lambda s: None)
    rows, _ = _collect_rows(runner, plan)
    return [r for r in rows if r.get("status") != "ok"]


def assemble(
    out_dir: str | Path, *, report: bool = True, log: Callable[[str], None] | None = None
) -> Path:
    """Collect the cached rows of a (possibly sharded) run into results.csv and the report.

    Raises ``ValueError`` naming how many rows are missing when some cells never ran (or their
    cache entries were damaged: those are named on ``log`` and rebuilt by the next run).
    """
    out = Path(out_dir)
    runner, plan = _assembler(out, log or _stderr_log)
    rows, missing = _collect_rows(runner, plan)
    if missing:
        raise ValueError(
            f"{missing} result rows of {out} are missing: some cells have not run yet, their "
            f"cache entries were damaged, or they were computed by a quantcal with other result "
            f"columns. Re-run `quantcal run` with the same study and --out (every shard): it "
            f"computes only what is missing (rows from the cached logits, no retraining)."
        )
    write_results(out, rows, plan, runner)
    if report:
        from quantcal.report import html as report_mod

        report_mod.write_report(out)
    return out
