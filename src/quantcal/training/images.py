"""Which images each stage of a study may read: one policy for recalibration, the mixed-precision
plan search and the per-layer attribution.

A model quantcal trained never saw ``val``, so every stage that fits or chooses something (a
recalibrator, a plan, a layer ranking) reads ``val`` and the test split is only scored. A
checkpoint trained elsewhere has probably seen the whole train split, and when the dataset has no
official validation split ``val`` is carved out of train (``data.val_held_out_of_train``): on
those images such a model looks more accurate and less over-confident than it is (a public
ResNet-20 on CIFAR-100: 90.6 % accuracy and T = 0.80 on val against 66.6 % and T = 1.77 on test).
There (with ``recal.fit_on`` ``auto`` or ``test_crossfit``):

- recalibrators are cross-fitted on two stratified halves of test (``test_crossfit``);
- the plan search and the attribution read only the first half (``SEARCH``), and a plan's
  numbers are scored on the second half only (``REPORT``), so no plan is scored on images its
  search chose it on.

The halves are those of :func:`test_halves` (seeded by the group's seed), the same as the first
fold of the recalibration cross-fit, so a plan's recalibrator is fitted on the search half and
applied to the report half.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

__all__ = [
    "REPORT",
    "REPORT_HALF",
    "SEARCH",
    "TEST_HALF",
    "VAL",
    "StageImages",
    "stage_images",
    "subset",
    "test_halves",
]

#: ``StageImages.search`` values: the stages that choose read ``val``, or one half of test.
VAL, TEST_HALF = "val", "test_half"
#: What a plan searched on ``TEST_HALF`` is scored on (``images["scored_on"]``; else "test").
REPORT_HALF = "test_other_half"
SEARCH, REPORT = 0, 1  # positions in test_halves()

_RECAL_NOTE_AUTO = (
    "the checkpoint was trained elsewhere and val is held out of the train split it "
    "has probably seen: recalibrators are cross-fitted on the test split instead "
    "(recal.fit_on = auto)"
)
_RECAL_NOTE_VAL = (
    "recalibrators were fitted on val, held out of the train split that a checkpoint "
    "trained elsewhere has probably seen: fitted temperatures may be too low (set "
    "recal.fit_on = test_crossfit, or give a dataset file with its own val split)"
)
_SEARCH_NOTE_VAL = (
    "this plan was searched on val, held out of the train split that a checkpoint trained "
    "elsewhere has probably seen: it may keep its budget there and not on test (recal.fit_on "
    "= auto searches on one half of test)"
)


@dataclass(frozen=True)
class StageImages:
    """What a group's stages may read.

    ``recal``: where recalibrators are fitted (``val`` or ``test_crossfit``); ``search``: what the
    plan search and the attribution read (``val``, or ``test_half``: the first stratified half
    of test, plans then scored on the second half only); ``notes``: what every row of the group
    says about recalibration; ``val_seen``: val is probably part of what the model trained on.
    """

    recal: str
    search: str
    notes: tuple[str, ...] = ()
    val_seen: bool = False

    @property
    def plan_note(self) -> str | None:
        """The sentence on a plan cell's rows when its search read test, or read a val split
        the model has probably seen (else None)."""
        if self.search != TEST_HALF:
            return _SEARCH_NOTE_VAL if self.val_seen else None
        return (
            "this plan was searched on one stratified half of test (val is carved from the "
            "train split the checkpoint has probably seen) and its numbers are measured on the "
            "other half only"
        )

    def describe(self, n_images: int, *, stage: str) -> dict[str, Any]:
        """The record a plan or attribution keeps in details.json: ``{"split": "val" |
        "test_half", "n_images": N, "why": ...}`` (``stage`` names it in ``why``)."""
        why = (
            f"{stage} read one stratified half of test: val is carved from the train split "
            "a checkpoint trained elsewhere has probably seen"
            if self.search == TEST_HALF
            else f"{stage} read the val split"
            + (", which the checkpoint has probably seen in training" if self.val_seen else "")
        )
        return {"split": self.search, "n_images": int(n_images), "why": why}


def stage_images(*, outside_checkpoint: bool, val_from_train: bool, fit_on: str) -> StageImages:
    """The policy for one group (``fit_on`` is ``recal.fit_on``: auto, val or test_crossfit).

    ``val_from_train`` (``data.val_held_out_of_train``) is only consulted for an outside
    checkpoint; pass a callable to defer reading it."""
    if fit_on == "test_crossfit" and not outside_checkpoint:
        return StageImages("test_crossfit", VAL)  # asked for; val is clean for plans
    if not outside_checkpoint:
        return StageImages(VAL, VAL)
    contaminated = val_from_train() if callable(val_from_train) else bool(val_from_train)
    if not contaminated:
        return StageImages("test_crossfit" if fit_on == "test_crossfit" else VAL, VAL)
    if fit_on == "val":
        return StageImages(VAL, VAL, (_RECAL_NOTE_VAL,), val_seen=True)
    notes = (_RECAL_NOTE_AUTO,) if fit_on == "auto" else ()
    return StageImages("test_crossfit", TEST_HALF, notes, val_seen=True)


def test_halves(labels: Any, seed: int) -> tuple[Any, Any]:
    """Two stratified halves of the positions ``0..n-1`` of ``labels`` (sorted int64 tensors),
    seeded: ``(SEARCH half, REPORT half)``; the first has ``n // 2`` positions."""
    import numpy as np
    import torch

    from quantcal.training import data

    y = labels.cpu().numpy() if hasattr(labels, "cpu") else np.asarray(labels)
    n = len(y)
    if n < 4:
        raise ValueError(f"cross-fitting needs at least 4 test images, got {n}")
    a, b = data.stratified_split(y, np.arange(n), n // 2, np.random.default_rng(seed))
    return torch.from_numpy(np.sort(a)), torch.from_numpy(np.sort(b))


def subset(split: Any, positions: Any) -> Any:
    """The ``data.Split`` of ``split``'s samples at ``positions`` (in that order)."""
    return replace(
        split,
        images=split.images[positions],
        labels=split.labels[positions],
        indices=split.indices[positions],
    )
