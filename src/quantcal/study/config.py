"""Study files: a frozen, validated description of one sweep, read from TOML.

:class:`StudyConfig` (one sweep: datasets x models x seeds, swept over precisions, range
estimators and recalibrators), :func:`load_study` (from a path, a built-in name, a dict) and
:func:`from_toml_dict`, and :func:`content_hash` (the cache keys' hash). The file layout, every
key documented, is in :mod:`quantcal.study.config_layout`; the checks of each table in
:mod:`quantcal.study.config_checks`; the built-in studies in :mod:`quantcal.study.builtin`.
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
from quantcal._registry import closest
from quantcal.calibration.recal_splits import REUSE_FP32_TEMPERATURE
from quantcal.study.builtin import builtin_studies
from quantcal.study.config_checks import (
    canonical_precision,
    check_attribution,
    check_datasets,
    check_method_options,
    check_ood,
    check_plans,
    check_shifts,
    objectives_axis,
    tuple_of,
)
from quantcal.study.config_layout import LAYOUT, TOP_TABLES, apply_overrides, unknown_key

__all__ = [
    "DEFAULT_RECAL",
    "MAX_SEED",
    "RECAL_FIT",
    "REUSE_FP32_TEMPERATURE",
    "ModelSpec",
    "StudyConfig",
    "apply_overrides",
    "builtin_studies",
    "canonical_json",
    "canonical_precision",
    "content_hash",
    "from_toml_dict",
    "load_study",
    "recipe_unused",
]

#: Recalibration pseudo-method: apply the temperature fitted on the fp32 model's validation
#: logits to every precision (the deployment shortcut that skips a refit after quantization).
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


@dataclass(frozen=True)
class StudyConfig:
    """A validated study; see :mod:`quantcal.study.config_layout` for the TOML layout."""

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
    #: Corrupted copies of test (``"name:severity"``, :mod:`quantcal.training.corruptions`):
    #: each cell is also scored on each, recalibrated on clean validation images.
    shifts: tuple[str, ...] = ()
    #: Unknown-input sets (``"synthetic:NAME"`` or ``"npz:PATH"``) scored per cell.
    ood: tuple[str, ...] = ()
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
    #: ``QuantConfig.matmul_bits`` of every cell: the bits of attention's products (None: each
    #: precision's activation bits).
    matmul_bits: int | None = None
    #: Options per method, e.g. ``{"adaround": {"iterations": 500}, "qat": {"epochs": 2}}``.
    method_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    recal: tuple[str, ...] = DEFAULT_RECAL
    recal_fit: str = "auto"
    n_bins: int = 15
    bootstrap: int = 1000
    level: float = 0.95
    #: The abstention threshold's target: error rate among accepted images (threshold transfer).
    target_risk: float = 0.05
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
        set_("seeds", tuple_of("seeds", self.seeds, int))
        for seed in self.seeds:
            check_number(seed, "seeds", integer=True, minimum=0)
            if seed > MAX_SEED:
                raise ValueError(f"seeds must be integers in [0, 2**32 - 1], got {seed!r}")
        set_("datasets", tuple_of("data.datasets", self.datasets, str))
        check_datasets(self.datasets)
        precisions = [
            canonical_precision(p) for p in tuple_of("quant.precisions", self.precisions, str)
        ]
        set_("precisions", tuple_of("quant.precisions", precisions, str))
        if "fp32" not in [p.lower() for p in self.precisions]:
            raise ValueError(
                "quant.precisions must include 'fp32': every quantized cell is compared with it"
            )
        set_("observers", tuple_of("quant.observers", self.observers, str))
        available_obs = quant.available_observers()
        for o in self.observers:
            if o not in available_obs:
                raise ValueError(
                    f"quant.observers: unknown range estimator {o!r}; choose from {available_obs}"
                )
        set_("quant_methods", tuple_of("quant.methods", self.quant_methods, str))
        if not isinstance(self.sequential, bool):
            raise ValueError(f"quant.sequential must be true or false, got {self.sequential!r}")
        if self.weight_granularity not in ("channel", "tensor"):
            raise ValueError(
                "quant.weight_granularity must be 'channel' or 'tensor', got "
                f"{self.weight_granularity!r}"
            )
        if self.matmul_bits is not None:
            bits = self.matmul_bits
            if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
                raise ValueError(
                    f"quant.matmul_bits must be an int in 2..16 (8: attention at int8 whatever "
                    f"the precision), got {bits!r}"
                )
        set_("method_options", check_method_options(self, self.method_options))
        set_("recal", tuple_of("recal.methods", self.recal, str))
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
        set_("shifts", check_shifts(self.shifts))
        set_("ood", check_ood(self.ood))
        if (
            isinstance(self.target_risk, bool)
            or not isinstance(self.target_risk, (int, float))
            or not 0.0 < self.target_risk < 1.0
        ):
            raise ValueError(
                "metrics.target_risk must be a number in (0, 1), the error rate among accepted "
                f"images that the abstention threshold aims at (0.05 = 5 %), got "
                f"{self.target_risk!r}"
            )
        set_("target_risk", float(self.target_risk))
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
        set_("plans", check_plans(self, self.plans))
        set_("attribution", check_attribution(self, self.attribution))
        set_("objectives", objectives_axis(self.objectives, dict(self.train)))
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
                **({"shifts": list(self.shifts)} if self.shifts else {}),
                **({"ood": list(self.ood)} if self.ood else {}),
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
                **({} if self.matmul_bits is None else {"matmul_bits": self.matmul_bits}),
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
                "target_risk": self.target_risk,
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


def from_toml_dict(raw: Mapping[str, Any]) -> StudyConfig:
    """Build a :class:`StudyConfig` from the nested TOML layout, rejecting unknown keys."""
    kwargs: dict[str, Any] = {}
    top_valid = [*LAYOUT[None], *TOP_TABLES]
    for key, value in raw.items():
        if key in LAYOUT[None]:
            kwargs[LAYOUT[None][key]] = value
        elif key == "model":
            items = value if isinstance(value, list) else [value]
            models = []
            for item in items:
                if not isinstance(item, Mapping):
                    raise ValueError("[[model]] entries must be tables with 'arch' and 'width'")
                for k in item:
                    if k not in ("arch", "width", "checkpoint"):
                        raise unknown_key("[[model]]", k, ["arch", "width", "checkpoint"])
                if "arch" not in item:
                    raise ValueError("a [[model]] table needs 'arch' (see `quantcal list`)")
                models.append(ModelSpec(**item))
            kwargs["models"] = tuple(models)
        elif key == "train":
            if not isinstance(value, Mapping):
                raise ValueError("[train] must be a table of TrainConfig fields")
            kwargs["train"] = dict(value)
        elif key in LAYOUT:
            if not isinstance(value, Mapping):
                raise ValueError(f"[{key}] must be a table")
            for k, v in value.items():
                if k not in LAYOUT[key]:
                    raise unknown_key(f"[{key}]", k, list(LAYOUT[key]))
                kwargs[LAYOUT[key][k]] = v
        else:
            raise unknown_key("the study file", key, top_valid)
    if "models" not in kwargs:
        raise ValueError("a study needs at least one [[model]] table (arch = ..., width = ...)")
    return StudyConfig(**kwargs)


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
