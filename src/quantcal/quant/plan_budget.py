"""The settings and the record of a mixed-precision search: the checks of each setting (shared
by ``PlanBudget`` / ``plan_mixed_precision``, the ``quantcal plan`` command and a study's
``[quant] plans``), the ``PlanBudget`` a plan must keep, and the ``PlanResult`` it returns.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from quantcal.quant.config import QuantConfig, parse_precision
from quantcal.quant.plan_costs import COSTS

__all__ = [
    "BOUND_RESAMPLES",
    "Label",
    "PlanBudget",
    "PlanResult",
    "check_budget",
    "check_confidence",
    "check_cost",
    "check_levels",
]

#: Paired-bootstrap resamples behind each upper confidence bound of a plan's loss.
BOUND_RESAMPLES = 1000


# ----------------------------------------------------------------------------- settings
# One check per setting, shared by PlanBudget / plan_mixed_precision, the `quantcal plan`
# command and a study's [quant] plans: ``label(key)`` names the setting as the user wrote it
# ("PlanBudget.max_ece_rise", "quant.plans.max_ece_rise", "--max-ece-rise").
Label = Callable[[str], str]


def _budget_label(key: str) -> str:
    return f"PlanBudget.{key}"


def check_budget(
    max_accuracy_drop: Any, max_ece_rise: Any, recal: Any, *, label: Label = _budget_label
) -> None:
    """ValueError naming the setting unless both budgets are fractions in [0, 1]
    (``max_ece_rise`` may be None: accuracy only) and ``recal`` a registered recalibrator."""
    from quantcal.calibration import recal as recalibrators

    for name, v in (("max_accuracy_drop", max_accuracy_drop), ("max_ece_rise", max_ece_rise)):
        if v is None and name == "max_ece_rise":
            continue
        bad = isinstance(v, bool) or not isinstance(v, (int, float))
        if bad or not math.isfinite(v) or not 0.0 <= v <= 1.0:
            raise ValueError(
                f"{label(name)} must be a fraction in [0, 1] (0.01 = 1 point)"
                + (" or None (accuracy only)" if name == "max_ece_rise" else "")
                + f", got {v!r}"
            )
    if not isinstance(recal, str) or recal not in recalibrators.available():
        raise ValueError(
            f"{label('recal')}: unknown recalibrator {recal!r}; choose one of "
            f"{', '.join(recalibrators.available())}"
        )


def check_cost(cost: Any, *, label: Label = _budget_label) -> str:
    """``cost`` if it is one of :data:`COSTS`, else a ValueError naming the setting."""
    if cost not in COSTS:
        raise ValueError(
            f"{label('cost')}: unknown cost {cost!r}; choose one of {', '.join(COSTS)}"
        )
    return cost


def check_confidence(confidence: Any, *, label: Label = _budget_label) -> None:
    """ValueError naming the setting unless ``confidence`` is a one-sided level in [0.5, 1)
    (0.9: a 90 % upper confidence bound of the loss) or None (point estimates)."""
    c = confidence
    if c is not None and (
        isinstance(c, bool) or not isinstance(c, (int, float)) or not 0.5 <= c < 1.0
    ):
        raise ValueError(
            f"{label('confidence')} must be a one-sided level in [0.5, 1) (0.9 = a 90 % upper "
            f"bound) or none (point estimates), got {c!r}"
        )


def check_levels(levels: Any, *, label: Label = _budget_label) -> list[QuantConfig]:
    """The plan levels as QuantConfigs: at least two quantized precisions ("W8A8", ...), going
    from most to fewest bits (neither weight nor activation bits rising), none twice; else a
    ValueError naming the setting and what was given."""
    given = [levels] if isinstance(levels, str) else levels
    if not isinstance(given, (list, tuple)):
        raise ValueError(
            f"{label('levels')} must be a list of precisions like ['W8A8', 'W4A4'], got {levels!r}"
        )
    configs = []
    for p in given:
        try:
            qc = parse_precision(p) if isinstance(p, str) else None
        except ValueError:
            qc = None
        if qc is None:
            raise ValueError(
                f"{label('levels')}: plan levels must be quantized precisions like 'W4A8', "
                f"got {p!r}"
            )
        configs.append(qc)
    if len(configs) < 2:
        raise ValueError(
            f"{label('levels')}: plan levels need at least two precisions, e.g. "
            f"['W8A8', 'W4A4'], got {list(given)!r}"
        )
    keys = [(c.weight_bits, c.act_bits) for c in configs]
    if any(b[0] > a[0] or b[1] > a[1] for a, b in itertools.pairwise(keys)) or len(set(keys)) < len(
        keys
    ):
        raise ValueError(
            f"{label('levels')}: plan levels must go from most to fewest bits (neither weight "
            f"nor activation bits rising, none twice), got {list(given)!r}"
        )
    return configs


@dataclass(frozen=True)
class PlanBudget:
    """What the plan may lose vs fp32 on the validation check half: top-1 accuracy, and the ECE
    after ``recal`` (None: an accuracy-only budget, as other tools use). Fractions: 0.01 is one
    point. ``confidence``: the one-sided level of the upper bounds that must stay within the
    budget (0.9: a 90 % upper confidence bound of the loss); None checks point estimates."""

    max_accuracy_drop: float = 0.01
    max_ece_rise: float | None = 0.01
    recal: str = "temperature"
    confidence: float | None = 0.9

    def __post_init__(self) -> None:
        check_budget(self.max_accuracy_drop, self.max_ece_rise, self.recal)
        check_confidence(self.confidence)

    @property
    def calibration(self) -> bool:
        return self.max_ece_rise is not None


@dataclass
class PlanResult:
    """The found plan and how it was found.

    ``config`` quantizes the model with the plan (``quantize(model, result.config, batches)``);
    ``plan`` is ``{layer: (weight_bits, act_bits)}`` for every quantized layer; ``cost`` and
    ``uniform_costs`` (per level) are in the ``cost_kind`` unit; ``metrics`` and ``fp32`` hold
    the check half's accuracy, ECE after the recalibrator and NLL (``metrics`` also the upper
    bounds ``accuracy_drop_hi`` and ``ece_rise_hi`` when the budget has a ``confidence``);
    ``evaluations`` counts whole validation passes; ``sensitivity`` the per-layer penalties
    (``{layer: {level: penalty}}``); ``n_check`` the images the budget was checked on.
    """

    plan: dict[str, tuple[int, int]]
    config: QuantConfig
    budget: PlanBudget
    cost_kind: str
    cost: float
    uniform_costs: dict[str, float]
    metrics: dict[str, float]
    fp32: dict[str, float]
    evaluations: int
    seconds: float
    sensitivity: dict[str, dict[str, float]] = field(default_factory=dict)
    within_budget: bool = True
    n_check: int = 0

    @property
    def bound(self) -> dict[str, Any]:
        """How the budget was checked: the rule, the one-sided level, the resamples, the check
        images, and the found plan's point losses with their upper bounds (``None`` where not
        measured). JSON-ready."""
        m, f, b = self.metrics, self.fp32, self.budget
        out: dict[str, Any] = {
            "rule": "upper_bound" if b.confidence is not None else "point",
            "level": b.confidence,
            "one_sided": True,
            "method": "paired bootstrap over the check images" if b.confidence else None,
            "n_resamples": BOUND_RESAMPLES if b.confidence else 0,
            "n_check": self.n_check,
            "accuracy_drop": f["accuracy"] - m["accuracy"],
            "accuracy_drop_hi": m.get("accuracy_drop_hi"),
            "ece_rise": (m["ece"] - f["ece"]) if "ece" in m and "ece" in f else None,
            "ece_rise_hi": m.get("ece_rise_hi") if b.calibration else None,
        }
        return out

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "plan": {k: list(v) for k, v in self.plan.items()},
            "layer_bits": [list(t) for t in self.config.layer_bits],
            "base": self.config.name.split("+")[0],
            #: ``QuantConfig.from_dict(record["quant_config"])`` quantizes with this plan
            "quant_config": self.config.to_dict(),
            "budget": {
                "max_accuracy_drop": self.budget.max_accuracy_drop,
                "max_ece_rise": self.budget.max_ece_rise,
                "recal": self.budget.recal,
                "confidence": self.budget.confidence,
            },
            "bound": self.bound,
            "cost_kind": self.cost_kind,
            "cost": self.cost,
            "uniform_costs": self.uniform_costs,
            "metrics": self.metrics,
            "fp32": self.fp32,
            "evaluations": self.evaluations,
            "seconds": self.seconds,
            "sensitivity": self.sensitivity,
            "within_budget": self.within_budget,
        }
