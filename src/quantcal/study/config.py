"""Study files: a frozen, validated description of one sweep, read from TOML.

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
    method_options = {}            # per method, e.g. {adaround = {iterations = 500}}

    [recal]
    methods = ["none", "temperature", "temperature_fp32", "vector", "histogram", "isotonic"]
    fit_on = "auto"                # "val", "test_crossfit" or "auto" (see RECAL_FIT)

    [metrics]
    n_bins = 15
    bootstrap = 1000
    level = 0.95

    [report]                       # the deployer's budget behind each verdict (quantcal.findings.verdicts)
    max_accuracy_drop = 0.01       # top-1 accuracy lost vs fp32 (0.01 = 1 point)
    max_ece_rise = 0.01            # ECE above fp32's (as is; or after the best recalibrator)
    max_ece = 0.05                 # ECE at all, whatever fp32's: a cell as miscalibrated as an
                                   # over-confident fp32 reads "as trustworthy as fp32, which
                                   # is not" (1.0 turns this off)

``[train] objectives`` lists training objectives (names or tables, see
:mod:`quantcal.training.objectives`); each trains its own model, which then goes through every precision,
range estimator and recalibrator. Default ``["ce"]``; a single ``objective = ...`` is the same as
a one-item list.

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

import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantcal import _toml
from quantcal._inputs import check_input_file, check_number
from quantcal._registry import closest, unknown_name_message

#: Recalibration pseudo-method: apply the temperature fitted on the fp32 model's validation
#: logits to every precision (the deployment shortcut that skips a refit after quantization).
REUSE_FP32_TEMPERATURE = "temperature_fp32"
DEFAULT_RECAL = ("none", "temperature", REUSE_FP32_TEMPERATURE, "vector", "histogram", "isotonic")
#: Where recalibrators are fitted. ``val``: the validation split. ``test_crossfit``: two
#: stratified halves of the test split, each recalibrated by a fit on the other (nothing is
#: measured on images its recalibrator saw). ``auto``: ``val``, except for a checkpoint trained
#: elsewhere when ``val`` was held out of the train split, which such a model has probably seen
#: (temperatures fitted on its own training images come out too low): then ``test_crossfit``.
RECAL_FIT = ("auto", "val", "test_crossfit")
#: The largest seed: NumPy and PyTorch generators take any 32-bit unsigned integer.
MAX_SEED = 2**32 - 1


def canonical_json(obj: Any) -> str:
    """Key-sorted, compact JSON: equal configs give equal strings (and equal hashes)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def content_hash(obj: Any, length: int = 16) -> str:
    """SHA-256 of the canonical JSON of ``obj``, truncated to ``length`` hex digits."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:length]


@dataclass(frozen=True)
class ModelSpec:
    """One architecture of a study: a registry name (or ``module:factory``) and a width."""

    arch: str
    width: float = 1.0
    #: Optional trained weights: the study then skips training for this model and evaluates them.
    checkpoint: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.arch, str) or not self.arch:
            raise ValueError(f"model.arch must be a non-empty string, got {self.arch!r}")
        if (
            not isinstance(self.width, (int, float))
            or isinstance(self.width, bool)
            or self.width <= 0
        ):
            raise ValueError(f"model.width must be a positive number, got {self.width!r}")
        object.__setattr__(self, "width", float(self.width))

    @property
    def label(self) -> str:
        return f"{self.arch}@{self.width:g}"


def _tuple_of(name: str, value: Any, kind: type) -> tuple:
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"{name} must be a non-empty list, got {value!r}")
    for v in value:
        if kind is int and (not isinstance(v, int) or isinstance(v, bool)):
            raise ValueError(f"{name} must hold integers, got {v!r}")
        if kind is str and not isinstance(v, str):
            raise ValueError(f"{name} must hold strings, got {v!r}")
    if len(set(value)) != len(value):
        raise ValueError(f"{name} lists a value twice: {list(value)!r}")
    return tuple(value)


@dataclass(frozen=True)
class StudyConfig:
    """A validated study; see the module docstring for the TOML layout."""

    models: tuple[ModelSpec, ...]
    name: str = "study"
    seeds: tuple[int, ...] = (0,)
    datasets: tuple[str, ...] = ("digits",)
    val_size: int | None = None
    ptq_calib_size: int | None = None
    #: Train on a stratified subset of this many training images (None: all of them).
    train_size: int | None = None
    #: The model's input normalisation (per channel, on the [0, 1] pixel scale), or None for the
    #: dataset's own statistics (or what a ``module:factory`` declares as ``factory.mean/std``).
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    #: The model's own preprocessing (``module:function``) in place of mean/std, or None.
    transform: str | None = None
    train: Mapping[str, Any] = field(default_factory=dict)
    precisions: tuple[str, ...] = ("fp32", "W8A8", "W4A8", "W4A4")
    observers: tuple[str, ...] = ("minmax",)
    ptq_calib_samples: int = 1
    first_last_8bit: bool = False
    #: Mixed-precision plans searched per model (``quant.plan_mixed_precision``): None (off), or
    #: a dict with any of max_accuracy_drop, max_ece_rise (default: the [report] budget), recal
    #: ("temperature"), cost ("bops" or "weight_bytes"), levels (default: the study's quantized
    #: precisions, most bits first). Adds the cells ``plan:calib`` and ``plan:accuracy``.
    plans: Mapping[str, Any] | None = None
    #: Per-layer attribution of calibration loss (``quant.attribute_layers``) for every uniform
    #: quantized precision: None (off), or a dict with granularity ("layer" or "block") and
    #: samples (validation images used; the cost is 2 x groups partial passes over them).
    attribution: Mapping[str, Any] | None = None
    #: Quantization methods (``quant.available_methods()``), an axis: every quantized
    #: precision x range estimator x sample is quantized by each; the first is the study's main
    #: one (tables and findings of the other axes read its rows).
    quant_methods: tuple[str, ...] = ("ptq",)
    #: ``QuantConfig.sequential`` and ``QuantConfig.weight_granularity`` of every cell.
    sequential: bool = False
    weight_granularity: str = "channel"
    #: Options per method, e.g. ``{"adaround": {"iterations": 500}, "qat": {"epochs": 2}}``.
    method_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    recal: tuple[str, ...] = DEFAULT_RECAL
    recal_fit: str = "auto"
    n_bins: int = 15
    bootstrap: int = 1000
    level: float = 0.95
    eval_batch_size: int = 512
    #: The verdicts' budget: accuracy lost and ECE gained vs fp32 that a deployer accepts.
    max_accuracy_drop: float = 0.01
    max_ece_rise: float = 0.01
    #: The highest ECE a deployed model may have, whatever fp32's (quantcal.findings.verdicts).
    max_ece: float = 0.05
    threads: int | None = None
    #: The instruction set of PyTorch's CPU kernels ("avx2", "avx512"), or None (the CPU's best).
    isa: str | None = None
    #: Training objectives in canonical form (``{"name": ..., params}``); None: ``["ce"]``.
    objectives: tuple[Mapping[str, Any], ...] | None = None

    def __post_init__(self) -> None:
        from quantcal import quant
        from quantcal.calibration import recal
        from quantcal.training.train import TrainConfig

        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 - frozen dataclass
        models = self.models if isinstance(self.models, (list, tuple)) else [self.models]
        if not models:
            raise ValueError("a study needs at least one [[model]] table (arch = ..., width = ...)")
        set_("models", tuple(m if isinstance(m, ModelSpec) else ModelSpec(**m) for m in models))
        if len({m.label for m in self.models}) != len(self.models):
            raise ValueError(
                f"[[model]] lists an (arch, width) twice: {[m.label for m in self.models]}"
            )
        from quantcal import models as model_zoo

        known = model_zoo.list_models()
        for m in self.models:
            if ":" not in m.arch and m.arch.lower() not in known:
                hint = closest(m.arch, known)
                raise ValueError(
                    f"model.arch: unknown model {m.arch!r}"
                    + (f" (did you mean {hint!r}?)" if hint else "")
                    + f"; choose from {known} or give 'module:factory'"
                )
            if m.checkpoint is not None:
                try:
                    check_input_file(m.checkpoint, "model.checkpoint")
                except FileNotFoundError as exc:
                    raise ValueError(str(exc)) from None
        set_("seeds", _tuple_of("seeds", self.seeds, int))
        for seed in self.seeds:
            check_number(seed, "seeds", integer=True, minimum=0)
            if seed > MAX_SEED:
                raise ValueError(f"seeds must be integers in [0, 2**32 - 1], got {seed!r}")
        set_("datasets", _tuple_of("data.datasets", self.datasets, str))
        _check_datasets(self.datasets)
        precisions = [
            canonical_precision(p) for p in _tuple_of("quant.precisions", self.precisions, str)
        ]
        set_("precisions", _tuple_of("quant.precisions", precisions, str))
        if "fp32" not in [p.lower() for p in self.precisions]:
            raise ValueError(
                "quant.precisions must include 'fp32': every quantized cell is compared with it"
            )
        set_("observers", _tuple_of("quant.observers", self.observers, str))
        available_obs = quant.available_observers()
        for o in self.observers:
            if o not in available_obs:
                raise ValueError(
                    f"quant.observers: unknown range estimator {o!r}; choose from {available_obs}"
                )
        set_("quant_methods", _tuple_of("quant.methods", self.quant_methods, str))
        if not isinstance(self.sequential, bool):
            raise ValueError(f"quant.sequential must be true or false, got {self.sequential!r}")
        if self.weight_granularity not in ("channel", "tensor"):
            raise ValueError(
                "quant.weight_granularity must be 'channel' or 'tensor', got "
                f"{self.weight_granularity!r}"
            )
        set_("method_options", self._check_method_options(self.method_options))
        set_("recal", _tuple_of("recal.methods", self.recal, str))
        allowed = [*recal.available(), REUSE_FP32_TEMPERATURE]
        for m in self.recal:
            if m not in allowed:
                hint = closest(m, allowed)
                raise ValueError(
                    f"recal.methods: unknown method {m!r}"
                    + (f" (did you mean {hint!r}?)" if hint else "")
                    + f"; choose from {sorted(allowed)}"
                )
        if self.recal_fit not in RECAL_FIT:
            raise ValueError(
                f"recal.fit_on must be one of {', '.join(RECAL_FIT)}, got {self.recal_fit!r}"
            )
        for name, lo in (
            ("ptq_calib_samples", 1),
            ("n_bins", 1),
            ("bootstrap", 0),
            ("eval_batch_size", 1),
        ):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
        for name in ("val_size", "ptq_calib_size", "train_size"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"data.{name} must be a positive integer, got {v!r}")
        for name in ("mean", "std"):
            v = getattr(self, name)
            if v is not None:
                vals = [v] if isinstance(v, (int, float)) else v
                if (
                    not isinstance(vals, (list, tuple))
                    or not vals
                    or not all(
                        isinstance(x, (int, float)) and not isinstance(x, bool) for x in vals
                    )
                ):
                    raise ValueError(
                        f"data.{name} must be a number or a list of numbers, got {v!r}"
                    )
                set_(name, tuple(float(x) for x in vals))
        if (self.mean is None) != (self.std is None):
            raise ValueError("data.mean and data.std go together: give both or neither")
        if self.std is not None and min(self.std) <= 0:
            raise ValueError(f"data.std must be > 0, got {list(self.std)}")
        if self.transform is not None:
            if not isinstance(self.transform, str) or ":" not in self.transform:
                raise ValueError(
                    "data.transform must be 'module:function' or 'path/file.py:function', got "
                    f"{self.transform!r}"
                )
            if self.mean is not None:
                raise ValueError(
                    "data.transform replaces data.mean/std (it does the whole preprocessing): "
                    "give one or the other"
                )
        if self.threads is not None and (
            not isinstance(self.threads, int) or isinstance(self.threads, bool) or self.threads < 1
        ):
            raise ValueError(f"threads must be a positive integer, got {self.threads!r}")
        if self.isa is not None:
            from quantcal._isa import ISAS

            if self.isa not in ISAS:
                raise ValueError(
                    f"isa must be one of {', '.join(ISAS)} (or absent: the CPU's best), got "
                    f"{self.isa!r}"
                )
        if not (0.0 < float(self.level) < 1.0):
            raise ValueError(f"metrics.level must lie in (0, 1), got {self.level!r}")
        for name in ("max_accuracy_drop", "max_ece_rise", "max_ece"):
            v = getattr(self, name)
            what = {
                "max_accuracy_drop": "top-1 accuracy lost vs fp32",
                "max_ece_rise": "rise in ECE vs fp32",
                "max_ece": "ECE at all, whatever fp32's,",
            }[name]
            default = 0.05 if name == "max_ece" else 0.01
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                raise ValueError(
                    f"report.{name} must be a number in [0, 1], the {what} that a "
                    f"deployer accepts (0.01 = 1 point; 0 = none), got {v!r}; every verdict "
                    f"needs it, so it has no 'none' (leave the key out for the default {default})"
                )
            set_(name, float(v))
        set_("plans", self._check_plans(self.plans))
        set_("attribution", self._check_attribution(self.attribution))
        set_("objectives", _objectives_axis(self.objectives, dict(self.train)))
        if len(self.objectives) > 1 and any(m.checkpoint for m in self.models):
            raise ValueError(
                "[train] objectives lists several objectives, but a [[model]] gives a trained "
                "checkpoint: objectives apply to models the study trains. Put checkpoint "
                "models in a study of their own"
            )
        train = {k: v for k, v in self.train.items() if k not in ("objective", "objectives")}
        # Validates every field and names the closest valid key for a typo; the objective is
        # the axis above, so it is not part of the shared recipe.
        recipe = TrainConfig.from_dict(train).to_dict()
        recipe.pop("objective")
        set_("train", recipe)

    def _check_plans(self, plans: Any) -> dict[str, Any] | None:
        """The ``[quant] plans`` table checked by the functions ``quant.PlanBudget``,
        ``plan_mixed_precision`` and ``quantcal plan`` use (``quant.plan.check_*``), so a bad
        budget, recalibrator, cost or level list is refused here, before any training."""
        from quantcal.quant import plan as qplan

        if plans is None or plans is False:
            return None
        if plans is True:
            plans = {}
        if not isinstance(plans, Mapping):
            raise ValueError(f"quant.plans must be true, false or a table, got {plans!r}")
        allowed = ("max_accuracy_drop", "max_ece_rise", "recal", "cost", "levels", "confidence")
        for key in plans:
            if key not in allowed:
                raise ValueError(
                    "quant.plans: " + unknown_name_message("key", str(key), list(allowed))
                )
        out = dict(plans)

        def label(key: str) -> str:
            return f"quant.plans.{key}"

        ece = out.get("max_ece_rise", self.max_ece_rise)
        if ece is None or isinstance(ece, (str, bool)):
            raise ValueError(
                f"quant.plans.max_ece_rise must be a fraction in [0, 1] (0.01 = 1 point), got "
                f"{ece!r}; a study always searches the accuracy-only plan too (the "
                "plan:accuracy cells), so leave it out or give the calibration budget"
            )
        qplan.check_budget(
            out.get("max_accuracy_drop", self.max_accuracy_drop),
            ece,
            out.get("recal", "temperature"),
            label=label,
        )
        qplan.check_cost(out.get("cost", "bops"), label=label)
        if "confidence" in out:  # false: point estimates, as before the upper-bound rule
            c = out["confidence"]
            qplan.check_confidence(None if c is False else c, label=label)
        if "levels" in out:
            levels = out["levels"]
        else:  # the study's quantized precisions, most bits first
            levels = sorted(
                (p for p in self.precisions if p.lower() != "fp32"),
                key=lambda p: [-b for b in _bits(p)],
            )
            if len(levels) < 2:
                raise ValueError(
                    "quant.plans needs at least two quantized precisions to choose between: "
                    f"the study's precisions hold {len(levels)} ({', '.join(levels) or 'none'}); "
                    "add one to quant.precisions or give quant.plans.levels"
                )
        configs = qplan.check_levels(levels, label=label)
        out["levels"] = [f"W{c.weight_bits}A{c.act_bits}" for c in configs]
        return out

    def _check_method_options(self, value: Any) -> dict[str, dict[str, Any]]:
        """Each method known (an unknown one lists the valid ones), listed once, and its
        options valid (``QuantMethod.resolve``)."""
        from quantcal.quant.methods import get_method

        for name in self.quant_methods:
            try:
                get_method(name)
            except ValueError as err:
                raise ValueError(f"quant.methods: {err}") from None
        if len(set(self.quant_methods)) != len(self.quant_methods):
            raise ValueError(f"quant.methods lists a method twice: {list(self.quant_methods)}")
        if not isinstance(value, Mapping):
            raise ValueError(f"quant.method_options must be a table, got {value!r}")
        out: dict[str, dict[str, Any]] = {}
        for name, options in value.items():
            if name not in self.quant_methods:
                raise ValueError(
                    f"quant.method_options.{name}: {name!r} is not in quant.methods "
                    f"{list(self.quant_methods)}"
                )
            try:
                get_method(name).resolve(
                    dict(options) if isinstance(options, Mapping) else options,
                    where=f"quant.method_options.{name}",
                )
            except (TypeError, ValueError) as err:
                raise ValueError(str(err)) from None
            out[name] = dict(options)
        return out

    def _check_attribution(self, value: Any) -> dict[str, Any] | None:
        from quantcal.quant.attribution import GRANULARITIES

        if value is None or value is False:
            return None
        if value is True:
            value = {}
        if not isinstance(value, Mapping):
            raise ValueError(f"quant.attribution must be true, false or a table, got {value!r}")
        allowed = ("granularity", "samples", "precisions")
        for key in value:
            if key not in allowed:
                raise ValueError(
                    "quant.attribution: " + unknown_name_message("key", str(key), list(allowed))
                )
        out = {
            "granularity": value.get("granularity", "layer"),
            "samples": value.get("samples", 1000),
        }
        if out["granularity"] not in GRANULARITIES:
            raise ValueError(
                f"quant.attribution.granularity must be one of {', '.join(GRANULARITIES)}, got "
                f"{out['granularity']!r}"
            )
        n = out["samples"]
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"quant.attribution.samples must be a positive integer, got {n!r}")
        if "precisions" in value:
            precs = [
                canonical_precision(p) for p in _tuple_of("precisions", value["precisions"], str)
            ]
            missing = [p for p in precs if p not in self.precisions or p == "fp32"]
            if missing or not precs:
                raise ValueError(
                    f"quant.attribution.precisions must list quantized precisions of the study "
                    f"({', '.join(p for p in self.precisions if p != 'fp32')}), got "
                    f"{value['precisions']!r}"
                )
            out["precisions"] = precs
        return out

    def plan_spec(self, kind: str) -> dict[str, Any]:
        """The search settings of the ``plan:calib`` (kind "calib") or ``plan:accuracy`` cell,
        defaults filled in."""
        p = self.plans or {}
        return {
            "kind": kind,
            "max_accuracy_drop": float(p.get("max_accuracy_drop", self.max_accuracy_drop)),
            "max_ece_rise": (
                None if kind == "accuracy" else float(p.get("max_ece_rise", self.max_ece_rise))
            ),
            "recal": p.get("recal", "temperature"),
            "cost": p.get("cost", "bops"),
            "levels": list(p.get("levels", [])),
            # only when set: the plan cells of a study without it keep their cache keys
            **({"confidence": p["confidence"]} if "confidence" in p else {}),
        }

    def objective_labels(self) -> list[str]:
        """Short labels of the objectives, in order (``ce``, ``focal(gamma=3)``, ...)."""
        from quantcal.training import objectives

        return [objectives.label(o) for o in self.objectives or ()]

    # --- (de)serialisation ----------------------------------------------------------------
    def to_toml_dict(self) -> dict[str, Any]:
        """The nested layout of a study file (the inverse of :func:`from_toml_dict`)."""
        return {
            "name": self.name,
            "seeds": list(self.seeds),
            "threads": self.threads,
            "isa": self.isa,
            "data": {
                "datasets": list(self.datasets),
                "val_size": self.val_size,
                "train_size": self.train_size,
                "ptq_calib_size": self.ptq_calib_size,
                "mean": None if self.mean is None else list(self.mean),
                "std": None if self.std is None else list(self.std),
                "transform": self.transform,
            },
            "model": [
                {k: v for k, v in dataclasses.asdict(m).items() if v is not None}
                for m in self.models
            ],
            "train": {
                **self.train,
                "objectives": [dict(o) for o in self.objectives or ()],
            },
            "quant": {
                "precisions": list(self.precisions),
                "observers": list(self.observers),
                "ptq_calib_samples": self.ptq_calib_samples,
                "first_last_8bit": self.first_last_8bit,
                "plans": None if self.plans is None else dict(self.plans),
                "attribution": None if self.attribution is None else dict(self.attribution),
                **({"sequential": True} if self.sequential else {}),
                **(
                    {}
                    if self.weight_granularity == "channel"
                    else {"weight_granularity": self.weight_granularity}
                ),
                **(
                    {}
                    if self.quant_methods == ("ptq",) and not self.method_options
                    else {
                        "methods": list(self.quant_methods),
                        "method_options": {k: dict(v) for k, v in self.method_options.items()},
                    }
                ),
            },
            "recal": {"methods": list(self.recal), "fit_on": self.recal_fit},
            "metrics": {
                "n_bins": self.n_bins,
                "bootstrap": self.bootstrap,
                "level": self.level,
                "eval_batch_size": self.eval_batch_size,
            },
            "report": {
                "max_accuracy_drop": self.max_accuracy_drop,
                "max_ece_rise": self.max_ece_rise,
                "max_ece": self.max_ece,
            },
        }

    def trains_nothing(self) -> bool:
        """The ``[train]`` recipe reaches no result (:func:`recipe_unused`)."""
        return recipe_unused(
            [m.checkpoint is not None for m in self.models],
            self.quant_methods,
            self.objective_labels(),
        )

    def to_toml(self, *, applicable_only: bool = False) -> str:
        """The study file; with ``applicable_only``, without the ``[train]`` recipe when it
        reaches no result (:meth:`trains_nothing`), as an eval of a checkpoint writes it (read
        back, the defaults fill it in, and no cache key holds it)."""
        raw = self.to_toml_dict()
        if applicable_only and self.trains_nothing():
            raw.pop("train")
        return _toml.dumps(raw)


# section -> {toml key: StudyConfig field}
_LAYOUT: dict[str | None, dict[str, str]] = {
    None: {"name": "name", "seeds": "seeds", "threads": "threads", "isa": "isa"},
    "data": {
        "datasets": "datasets",
        "val_size": "val_size",
        "train_size": "train_size",
        "ptq_calib_size": "ptq_calib_size",
        "mean": "mean",
        "std": "std",
        "transform": "transform",
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
    },
    "recal": {"methods": "recal", "fit_on": "recal_fit"},
    "metrics": {
        "n_bins": "n_bins",
        "bootstrap": "bootstrap",
        "level": "level",
        "eval_batch_size": "eval_batch_size",
    },
    "report": {
        "max_accuracy_drop": "max_accuracy_drop",
        "max_ece_rise": "max_ece_rise",
        "max_ece": "max_ece",
    },
}
_TOP_TABLES = ("data", "model", "train", "quant", "recal", "metrics")


def _bits(precision: str) -> tuple[int, int]:
    """(weight bits, activation bits) of a canonical quantized precision ("W4A8")."""
    w, a = precision[1:].split("A")
    return int(w), int(a)


def recipe_unused(
    from_checkpoint: Sequence[bool], methods: Sequence[str], objectives: Sequence[str]
) -> bool:
    """True when a study's training recipe reaches no result: every model comes from a
    checkpoint (``from_checkpoint``), no quantization method trains (``qat``; an unknown name
    counts as one that does) and the objectives are the one default (``[]`` or ``["ce"]``).
    The report and an eval's config.toml leave the recipe out then."""
    from quantcal.quant.methods import get_method

    def trains(name: str) -> bool:
        try:
            return get_method(name).needs_train_data
        except ValueError:
            return True

    return (
        bool(from_checkpoint)
        and all(from_checkpoint)
        and not any(trains(m) for m in methods)
        and list(objectives) in ([], ["ce"])
    )


def canonical_precision(text: str) -> str:
    """``"fp32"`` or ``"W{w}A{a}"`` for any spelling ``parse_precision`` accepts (ValueError
    naming the accepted forms otherwise)."""
    from quantcal import quant

    qc = quant.parse_precision(text)
    return "fp32" if qc is None else f"W{qc.weight_bits}A{qc.act_bits}"


def _objectives_axis(field_value: Any, train: Mapping[str, Any]) -> tuple[dict[str, Any], ...]:
    """The objectives axis from ``objectives=`` or ``[train] objectives`` / ``objective`` (one
    place only), canonical and without duplicates."""
    from quantcal.training import objectives

    given = [
        (where, v)
        for where, v in (
            ("objectives", field_value),
            ("[train] objectives", train.get("objectives")),
            ("[train] objective", train.get("objective")),
        )
        if v is not None
    ]
    if len(given) > 1:
        raise ValueError(
            f"the training objectives are given twice ({' and '.join(w for w, _ in given)}); "
            "list them once, as [train] objectives = [...]"
        )
    items = given[0][1] if given else ["ce"]
    if given and given[0][0] == "[train] objective":
        items = [items]
    if isinstance(items, (str, Mapping)):
        items = [items]
    if not isinstance(items, (list, tuple)) or not items:
        raise ValueError(f"[train] objectives must be a non-empty list, got {items!r}")
    canon = tuple(objectives.canonical(o) for o in items)
    labels = [objectives.label(o) for o in canon]
    if len(set(labels)) != len(labels):
        raise ValueError(f"[train] objectives lists an objective twice: {labels}")
    return canon


def _check_datasets(names: tuple[str, ...]) -> None:
    """Each name is a registered dataset or ``npz:PATH`` (the file itself is checked when the
    run starts: a study file may be written on one machine and run on another)."""
    from quantcal.training.data import check_dataset_name

    for name in names:
        check_dataset_name(name, "data.datasets")


def _unknown_key(where: str, key: str, valid: list[str]) -> ValueError:
    hint = closest(key, valid)
    did = f" Did you mean {hint!r}?" if hint else ""
    return ValueError(
        f"unknown key {key!r} in {where}.{did} Valid keys: {', '.join(sorted(valid))}."
    )


def from_toml_dict(raw: Mapping[str, Any]) -> StudyConfig:
    """Build a :class:`StudyConfig` from the nested TOML layout, rejecting unknown keys."""
    kwargs: dict[str, Any] = {}
    top_valid = [*_LAYOUT[None], *_TOP_TABLES]
    for key, value in raw.items():
        if key in _LAYOUT[None]:
            kwargs[_LAYOUT[None][key]] = value
        elif key == "model":
            items = value if isinstance(value, list) else [value]
            models = []
            for item in items:
                if not isinstance(item, Mapping):
                    raise ValueError("[[model]] entries must be tables with 'arch' and 'width'")
                for k in item:
                    if k not in ("arch", "width", "checkpoint"):
                        raise _unknown_key("[[model]]", k, ["arch", "width", "checkpoint"])
                if "arch" not in item:
                    raise ValueError("a [[model]] table needs 'arch' (see `quantcal list`)")
                models.append(ModelSpec(**item))
            kwargs["models"] = tuple(models)
        elif key == "train":
            if not isinstance(value, Mapping):
                raise ValueError("[train] must be a table of TrainConfig fields")
            kwargs["train"] = dict(value)
        elif key in _LAYOUT:
            if not isinstance(value, Mapping):
                raise ValueError(f"[{key}] must be a table")
            for k, v in value.items():
                if k not in _LAYOUT[key]:
                    raise _unknown_key(f"[{key}]", k, list(_LAYOUT[key]))
                kwargs[_LAYOUT[key][k]] = v
        else:
            raise _unknown_key("the study file", key, top_valid)
    if "models" not in kwargs:
        raise ValueError("a study needs at least one [[model]] table (arch = ..., width = ...)")
    return StudyConfig(**kwargs)


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


def builtin_studies() -> dict[str, Path]:
    """Study files shipped inside the package: name -> path."""
    folder = Path(__file__).parents[1] / "studies"
    return {p.stem: p for p in sorted(folder.glob("*.toml"))}


def load_study(
    source: str | Path | Mapping[str, Any] | StudyConfig | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> StudyConfig:
    """A study from a path, a built-in name (``demo``), a nested dict or a StudyConfig.

    ``None`` is the embedded demo. ``overrides`` maps dotted keys to values.
    """
    if isinstance(source, StudyConfig):
        if not overrides:
            return source
        source = source.to_toml_dict()
    if source is None:
        source = "demo"
    if isinstance(source, Mapping):
        raw = dict(source)
    else:
        path = Path(source)
        builtins = builtin_studies()
        if not path.exists() and str(source) in builtins:
            path = builtins[str(source)]
        if path.is_dir():
            raise ValueError(
                f"study {str(source)!r} is a folder; give a .toml study file or one of the "
                f"built-in studies: {', '.join(builtins)}"
            )
        if not path.exists():
            raise FileNotFoundError(
                f"study file {str(source)!r} not found; give a path to a .toml file or one of the "
                f"built-in studies: {', '.join(builtins)}"
            )
        try:
            raw = _toml.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from exc
    if overrides:
        raw = apply_overrides(raw, overrides)
    return from_toml_dict(raw)
