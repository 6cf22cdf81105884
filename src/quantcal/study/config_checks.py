"""The checks of a study's values that :class:`~quantcal.study.config.StudyConfig` runs on
construction, one per table or axis: lists (``tuple_of``), precisions in canonical form, the
datasets, the objectives axis, and the ``[quant]`` tables ``plans``, ``method_options`` and
``attribution``, each refused with a message naming the key and what it accepts."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from quantcal._registry import unknown_name_message

if TYPE_CHECKING:  # pragma: no cover - for type checkers only
    from quantcal.study.config import StudyConfig

__all__ = [
    "canonical_precision",
    "check_attribution",
    "check_datasets",
    "check_method_options",
    "check_ood",
    "check_plans",
    "check_shifts",
    "objectives_axis",
    "tuple_of",
]


def tuple_of(name: str, value: Any, kind: type) -> tuple:
    """``value`` (one item or a non-empty list of ``kind``, no item twice) as a tuple; the
    ValueError names the key ``name``."""
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


def _bits(precision: str) -> tuple[int, int]:
    """(weight bits, activation bits) of a canonical quantized precision ("W4A8")."""
    w, a = precision[1:].split("A")
    return int(w), int(a)


def canonical_precision(text: str) -> str:
    """``"fp32"`` or ``"W{w}A{a}"`` for any spelling ``parse_precision`` accepts (ValueError
    naming the accepted forms otherwise)."""
    from quantcal import quant

    qc = quant.parse_precision(text)
    return "fp32" if qc is None else f"W{qc.weight_bits}A{qc.act_bits}"


def objectives_axis(field_value: Any, train: Mapping[str, Any]) -> tuple[dict[str, Any], ...]:
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


def check_datasets(names: tuple[str, ...]) -> None:
    """Each name is a registered dataset or ``npz:PATH`` (the file itself is checked when the
    run starts: a study file may be written on one machine and run on another)."""
    from quantcal.training.data import check_dataset_name

    for name in names:
        check_dataset_name(name, "data.datasets")


def check_plans(study: StudyConfig, plans: Any) -> dict[str, Any] | None:
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
            raise ValueError("quant.plans: " + unknown_name_message("key", str(key), list(allowed)))
    out = dict(plans)

    def label(key: str) -> str:
        return f"quant.plans.{key}"

    ece = out.get("max_ece_rise", study.max_ece_rise)
    if ece is None or isinstance(ece, (str, bool)):
        raise ValueError(
            f"quant.plans.max_ece_rise must be a fraction in [0, 1] (0.01 = 1 point), got "
            f"{ece!r}; a study always searches the accuracy-only plan too (the "
            "plan:accuracy cells), so leave it out or give the calibration budget"
        )
    qplan.check_budget(
        out.get("max_accuracy_drop", study.max_accuracy_drop),
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
            (p for p in study.precisions if p.lower() != "fp32"),
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


def check_method_options(study: StudyConfig, value: Any) -> dict[str, dict[str, Any]]:
    """Each method known (an unknown one lists the valid ones), listed once, and its
    options valid (``QuantMethod.resolve``)."""
    from quantcal.quant.methods import get_method

    for name in study.quant_methods:
        try:
            get_method(name)
        except ValueError as err:
            raise ValueError(f"quant.methods: {err}") from None
    if len(set(study.quant_methods)) != len(study.quant_methods):
        raise ValueError(f"quant.methods lists a method twice: {list(study.quant_methods)}")
    if not isinstance(value, Mapping):
        raise ValueError(f"quant.method_options must be a table, got {value!r}")
    out: dict[str, dict[str, Any]] = {}
    for name, options in value.items():
        if name not in study.quant_methods:
            raise ValueError(
                f"quant.method_options.{name}: {name!r} is not in quant.methods "
                f"{list(study.quant_methods)}"
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


def check_attribution(study: StudyConfig, value: Any) -> dict[str, Any] | None:
    """The ``[quant] attribution`` table (true, false or granularity, samples, precisions),
    defaults filled in; None when off."""
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
        precs = [canonical_precision(p) for p in tuple_of("precisions", value["precisions"], str)]
        missing = [p for p in precs if p not in study.precisions or p == "fp32"]
        if missing or not precs:
            raise ValueError(
                f"quant.attribution.precisions must list quantized precisions of the study "
                f"({', '.join(p for p in study.precisions if p != 'fp32')}), got "
                f"{value['precisions']!r}"
            )
        out["precisions"] = precs
    return out


def _spec_list(value: Any, key: str, what: str) -> list[str]:
    """A list of strings (one string counts as a list of one; None or [] is empty), or a
    ValueError naming ``key`` and ``what`` it holds."""
    if value is None:
        return []
    specs = [value] if isinstance(value, str) else value
    if not isinstance(specs, (list, tuple)) or not all(isinstance(v, str) for v in specs):
        raise ValueError(f"{key} must be a list of {what}, got {value!r}")
    return list(specs)


def check_shifts(value: Any) -> tuple[str, ...]:
    """``[data] shifts``: corruption specs (``"gaussian_noise:3"``, ``"jpeg:5"``, a name alone
    for its five severities, ``"all"`` or ``"all:3"``) as canonical ``"name:severity"`` strings
    (:func:`quantcal.training.corruptions.expand_shifts`); ``[]`` is none."""
    specs = _spec_list(value, "data.shifts", 'corruption specs like "gaussian_noise:3"')
    if not specs:
        return ()
    from quantcal.training import corruptions

    try:
        return tuple(corruptions.expand_shifts(specs))
    except ValueError as exc:
        raise ValueError(f"data.shifts: {exc}") from None


def check_ood(value: Any) -> tuple[str, ...]:
    """``[data] ood``: unknown-input sets, each a built-in synthetic set (its name or
    ``"synthetic:NAME"``, :data:`quantcal.training.ood_sets.SYNTHETIC_OOD`) or
    ``"npz:PATH"`` (an image array, see :func:`quantcal.training.ood_sets.load_ood_npz`), in
    canonical form (``"synthetic:NAME"``, ``"npz:PATH"``); ``[]`` is none."""
    from quantcal.training.ood_sets import SYNTHETIC_OOD

    specs = _spec_list(value, "data.ood", 'sets like "gaussian_noise" or "npz:PATH"')
    out: list[str] = []
    for spec in specs:
        if spec.lower().startswith("npz:"):
            canonical = "npz:" + spec[4:]
            if not spec[4:]:
                raise ValueError("data.ood: 'npz:' needs a path, e.g. npz:/data/svhn.npz")
        else:
            name = spec.split(":", 1)[1] if spec.lower().startswith("synthetic:") else spec
            if name not in SYNTHETIC_OOD:
                raise ValueError(
                    "data.ood: "
                    + unknown_name_message("unknown-input set", name, list(SYNTHETIC_OOD))
                    + ", or npz:PATH"
                )
            canonical = f"synthetic:{name}"
        if canonical in out:
            raise ValueError(f"data.ood lists {canonical!r} twice")
        out.append(canonical)
    return tuple(out)
