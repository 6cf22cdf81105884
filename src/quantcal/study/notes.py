"""The notes a result row carries (DESIGN.md "Never silent"): warnings recorded as notes, the
fp32 model's sanity notes and a plan's broken budget."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from quantcal.training import images as _images

__all__ = ["fmt3", "fp32_model_notes", "plan_notes", "recorded_warnings"]


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


def fmt3(values: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def fp32_model_notes(logits, labels) -> list[str]:
    """Notes on the fp32 model from its validation logits, for every row of its group (near
    chance, an extreme temperature): ``diagnose.prediction_notes``, the one source of the sanity
    notes every path that yields a model's predictions gets."""
    from quantcal.calibration import diagnose

    return diagnose.prediction_notes(
        logits, labels, subject="the fp32 model", preprocessing="mean/std"
    )


@contextmanager
def recorded_warnings() -> Iterator[list[str]]:
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
