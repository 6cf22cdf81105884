"""The study's pipeline of stages (``quantcal.study.stages``): the memo through which stages read
each other, the declared order, and a new stage plugged in with one line (issue #24)."""

from __future__ import annotations

from typing import ClassVar

import pytest

from quantcal import study
from quantcal.study import runner
from quantcal.study.cells import Group, QuantCell
from quantcal.study.config import ModelSpec
from quantcal.study.stages import STAGES, Outputs, Stage

G = Group("digits", ModelSpec("resnet20", 0.25), 0)
FP32, W4 = QuantCell(G, "fp32", None, None), QuantCell(G, "W4A4", "minmax", 0)


class Counting(Stage):
    """Returns (its name, the item, the outputs it read); counts its runs."""

    def __init__(self, name: str, scope: str = "cell", reads: tuple[str, ...] = (), fail=False):
        self.name, self.scope, self.reads, self.fail = name, scope, reads, fail  # type: ignore[misc]
        self.runs: list = []

    def run(self, ctx, item, need):
        self.runs.append(item)
        if self.fail:
            raise ValueError(f"{self.name} failed on {item}")
        return self.name, item, [need(r) for r in self.reads]


def _outputs(*stages: Stage) -> Outputs:
    return Outputs(None, {s.name: s for s in stages})  # type: ignore[arg-type]


def test_a_stage_runs_once_per_item_and_a_group_stage_once_per_group():
    g, c = Counting("g", scope="group"), Counting("c", reads=("g",))
    out = _outputs(g, c)
    assert out.get("c", FP32) == ("c", FP32, [("g", G, [])])
    out.get("c", FP32)
    out.get("c", W4)
    assert c.runs == [FP32, W4] and g.runs == [G]  # the group stage: once, for the cell's group


def test_a_stage_may_read_only_what_it_declares():
    a, b = Counting("a"), Counting("b")
    b.reads = ("a",)  # type: ignore[misc]
    out = _outputs(a, b, Counting("sneaky"))
    sneaky = out.stages["sneaky"]
    sneaky.reads = ()  # type: ignore[misc]

    def run(ctx, item, need):
        return need("a")

    sneaky.run = run  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match=r"'sneaky' reads 'a' but does not declare it"):
        out.get("sneaky", FP32)


def test_a_failure_is_remembered_and_raised_to_every_reader():
    bad = Counting("bad", fail=True)
    reader = Counting("reader", reads=("bad",))
    out = _outputs(bad, reader)
    for _ in range(2):
        with pytest.raises(ValueError, match="bad failed"):
            out.get("reader", W4)
    assert bad.runs == [W4]  # not retried


def test_put_gives_an_output_and_forget_drops_a_cells_outputs():
    s = Counting("s")
    out = _outputs(s)
    out.put("s", W4, "made by every rank")
    assert out.get("s", W4) == "made by every rank" and s.runs == []
    out.put("s", FP32, ValueError("rank 0 will say it"))
    with pytest.raises(ValueError, match="rank 0"):
        out.get("s", FP32)
    out.forget(W4)
    assert out.get("s", W4)[0] == "s" and s.runs == [W4]


def test_the_listed_stages_read_only_stages_listed_before_them():
    names = [s.name for s in STAGES]
    assert len(set(names)) == len(names)
    for i, stage in enumerate(STAGES):
        assert set(stage.reads) <= set(names[:i]), f"{stage.name} reads a later stage"
        assert stage.scope in ("group", "cell")
        if stage.scope == "group":  # a group stage cannot read a cell's output
            assert all(s.scope == "group" for s in STAGES if s.name in stage.reads)
    assert [s.name for s in STAGES if s.eager] == ["train", "logits", "rows", "attribution", "ood"]


class Probe(Stage):
    """A new cell stage: the top-1 agreement of each quantized cell with its fp32 reference."""

    name: ClassVar[str] = "probe"
    reads: ClassVar[tuple[str, ...]] = ("logits",)
    eager: ClassVar[bool] = True
    seen: ClassVar[dict] = {}

    def applies(self, ctx, item) -> bool:
        return not item.is_fp32

    def run(self, ctx, item, need):
        z = need("logits")[0]["test_logits"]
        ref = need("logits", QuantCell(item.group, "fp32", None, None))[0]["test_logits"]
        agree = float((z.argmax(1) == ref.argmax(1)).float().mean())
        Probe.seen[item.precision] = agree
        return agree


def test_a_new_stage_plugs_in_with_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "STAGES", (*STAGES, Probe()))
    cfg = {
        "name": "probe",
        "seeds": [0],
        "data": {"datasets": ["digits"]},
        "model": [{"arch": "resnet20", "width": 0.25}],
        "train": {"epochs": 1, "batch_size": 64, "lr": 0.1, "augment": False},
        "quant": {"precisions": ["fp32", "W8A8", "W4A4"], "observers": ["minmax"]},
        "recal": {"methods": ["none"]},
        "metrics": {"bootstrap": 0},
    }
    study.run_study(cfg, tmp_path / "run", quiet=True, report=False)
    assert set(Probe.seen) == {"W8A8", "W4A4"}
    assert 0.5 < Probe.seen["W8A8"] <= 1.0  # W8A8 agrees with fp32 on most images
    rows = list(study.iter_rows(tmp_path / "run"))
    assert len(rows) == 3 and all(r["status"] == "ok" for r in rows)  # the rows are untouched
    _each_declared_record_is_on_disk(tmp_path / "run")


def _each_declared_record_is_on_disk(run) -> None:
    """Every cached stage wrote, for every item it applies to, the entries its keys name."""
    ctx, plan = study.open_run(run)
    seen = 0
    for g, cells in plan:
        for stage in STAGES:
            if stage.cache is None:
                assert stage.keys(ctx, g if stage.scope == "group" else cells[0]) == []
                continue
            for item in [g] if stage.scope == "group" else cells:
                if not stage.applies(ctx, item):
                    continue
                for key in stage.keys(ctx, item):
                    assert list((run / "cache" / stage.cache).glob(f"{key}*")), (stage.name, key)
                    seen += 1
    assert seen == 1 + 3 + 3  # a train folder, logits of three cells, one row each


def test_the_study_package_gives_every_public_name_of_the_runner():
    import quantcal.study as package

    assert sorted(package.__all__) == sorted(runner.__all__)
    assert all(getattr(package, name) is getattr(runner, name) for name in runner.__all__)
