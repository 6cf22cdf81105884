"""What a study evaluates: training groups and their quantized cells, in the study's order.

A :class:`Group` is one trained network (dataset, architecture at a width, training objective,
seed); a :class:`QuantCell` is that network at one precision, range estimator, range-calibration
sample and quantization method. :func:`expand_cells` lists them from a study's configuration;
every stage takes a group or a cell.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from quantcal.study.config import ModelSpec, StudyConfig
from quantcal.training import images as _images

__all__ = [
    "PLAN_KINDS",
    "Group",
    "QuantCell",
    "attribution_cells",
    "expand_cells",
    "group_identity",
    "objective_spec",
    "parse_shard",
    "stage_images",
]


PLAN_KINDS = ("calib", "accuracy")


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


def group_identity(g: Group) -> dict[str, Any]:
    """A group's identity columns, as results.csv and the details.json sections name them."""
    return {
        "dataset": g.dataset,
        "arch": g.model.arch,
        "width": g.model.width,
        "objective": g.objective,
        "seed": g.seed,
    }


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


def objective_spec(config: StudyConfig, g: Group) -> dict[str, Any]:
    """The canonical objective of a group (looked up by its label)."""
    from quantcal.training import objectives

    for spec in config.objectives or ():
        if objectives.label(spec) == g.objective:
            return dict(spec)
    return objectives.canonical(g.objective)


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


def stage_images(config: StudyConfig, g: Group) -> _images.StageImages:
    """Which images group ``g``'s stages may read (``quantcal.training.images``): the one policy
    behind where recalibrators are fitted, and what the plan search and the attribution read."""
    from quantcal.training import data

    return _images.stage_images(
        outside_checkpoint=g.model.checkpoint is not None,
        val_from_train=lambda: data.val_held_out_of_train(g.dataset),
        fit_on=config.recal_fit,
    )
