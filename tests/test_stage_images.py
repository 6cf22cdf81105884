"""One policy for which images a study stage may read (``quantcal.training.images``): a checkpoint
quantcal did not train, on a dataset whose val is carved from train (digits), has its plans
searched and its layers attributed on one stratified half of test, never on train or val, and
its plans scored on the other half only; a model quantcal trained keeps using val. A plan keeps
its budget with its upper confidence bound, not its point estimate."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from quantcal import models, quant, study
from quantcal.calibration.recal_splits import crossfit_folds
from quantcal.quant import plan as plan_mod
from quantcal.training import data
from quantcal.training import images as _images
from test_plan import Net, _batches, _data

ARCH = {"arch": "ghostnet_vgg16", "width": 0.1}
STUDY = {
    "name": "images",
    "seeds": [0],
    "data": {"datasets": ["digits"]},
    "train": {"epochs": 1, "batch_size": 128, "lr": 0.05, "schedule": "cosine"},
    "quant": {
        "precisions": ["fp32", "W8A8"],
        "observers": ["minmax"],
        "plans": {"max_accuracy_drop": 0.05, "max_ece_rise": 0.05, "levels": ["W8A8", "W4A4"]},
        "attribution": {"samples": 1000},
    },
    "recal": {"methods": ["none", "temperature"]},
    "metrics": {"bootstrap": 20},
}


def _rows(out: Path) -> list[dict]:
    with open(out / "results.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _spy(monkeypatch) -> dict[str, list]:
    """Record the (x, y) batches the plan search and the attribution receive."""
    seen: dict[str, list] = {"plan": [], "attribution": []}
    real_plan, real_attr = quant.plan_mixed_precision, quant.attribute_layers

    def plan(model, calib, val_batches, **kw):
        batches = [(x.cpu(), y.cpu()) for x, y in val_batches]
        seen["plan"].append(batches)
        return real_plan(model, calib, batches, **kw)

    def attribute(model, batches, **kw):
        batches = [(x.cpu(), y.cpu()) for x, y in batches]
        seen["attribution"].append(batches)
        return real_attr(model, batches, **kw)

    monkeypatch.setattr(quant, "plan_mixed_precision", plan)
    monkeypatch.setattr(quant, "attribute_layers", attribute)
    return seen


def _images_of(split) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*split.batches(10_000), strict=True)
    return torch.cat(xs), torch.cat(ys)


def _cat(batches) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])


def _rows_of(x: torch.Tensor) -> set[bytes]:
    return {r.numpy().tobytes() for r in x}


@pytest.fixture(scope="module")
def splits():
    return data.load_dataset("digits", seed=0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, splits) -> Path:
    """A model quantcal did not train: built, lightly perturbed and saved as a state dict."""
    net = models.create_model(
        ARCH["arch"],
        num_classes=splits.num_classes,
        image_size=splits.image_size,
        in_chans=splits.channels,
        width=ARCH["width"],
    )
    path = tmp_path_factory.mktemp("ckpt") / "outside.pt"
    torch.save(net.state_dict(), path)
    return path


def test_the_policy_for_each_kind_of_group():
    p = _images.stage_images(outside_checkpoint=False, val_from_train=True, fit_on="auto")
    assert (p.recal, p.search, p.notes, p.plan_note) == ("val", "val", (), None)
    p = _images.stage_images(outside_checkpoint=True, val_from_train=False, fit_on="auto")
    assert (p.recal, p.search) == ("val", "val")  # a dataset with its own val split
    p = _images.stage_images(outside_checkpoint=True, val_from_train=True, fit_on="auto")
    assert (p.recal, p.search) == ("test_crossfit", "test_half")
    assert "cross-fitted on the test split" in p.notes[0]
    assert "searched on one stratified half of test" in p.plan_note
    p = _images.stage_images(outside_checkpoint=True, val_from_train=True, fit_on="val")
    assert (p.recal, p.search) == ("val", "val") and "probably seen" in p.plan_note
    d = p.describe(90, stage="the plan search")
    assert d["split"] == "val" and d["n_images"] == 90 and "probably seen" in d["why"]
    # the halves are the recalibration cross-fit's, disjoint and complete, classes kept
    y = torch.arange(40) % 4
    a, b = _images.test_halves(y, 3)
    (fa, fb), (ga, gb) = crossfit_folds(y, 3)
    assert torch.equal(fa, a) and torch.equal(fb, b) and torch.equal(ga, b) and torch.equal(gb, a)
    assert not set(a.tolist()) & set(b.tolist()) and len(a) + len(b) == 40
    assert torch.bincount(y[a]).tolist() == [5, 5, 5, 5]


def test_an_outside_checkpoint_is_planned_and_attributed_on_one_test_half(
    tmp_path, monkeypatch, splits, checkpoint
):
    seen = _spy(monkeypatch)
    cfg = {**STUDY, "model": [{**ARCH, "checkpoint": str(checkpoint)}]}
    out = study.run_study(cfg, tmp_path / "run", quiet=True)

    search, report = crossfit_folds(splits.test.labels, 0)[0]
    test_x, test_y = _images_of(splits.test)
    val_x, _ = _images_of(splits.val)
    train_x, _ = _images_of(splits.train)
    forbidden = _rows_of(val_x) | _rows_of(train_x)
    assert len(seen["plan"]) == 2 and len(seen["attribution"]) == 1  # plan:calib, :accuracy; W8A8
    for batches in (*seen["plan"], *seen["attribution"]):
        x, y = _cat(batches)
        assert torch.equal(x, test_x[search]) and torch.equal(y, test_y[search])
        assert not _rows_of(x) & forbidden  # never a train or val image

    rows = [r for r in _rows(out) if r["status"] == "ok"]
    assert len(rows) == 4 * 2
    for r in rows:
        planned = r["precision"].startswith("plan:")
        assert int(r["n_test"]) == (len(report) if planned else len(test_y)), r["precision"]
        assert r["recal_fit"] == "test_crossfit"
        assert ("searched on one stratified half of test" in r["notes"]) == planned
    # the plan's scored logits are those of the report half, disjoint from the search half
    scored = study.recalibrated_test_logits(out)
    for key, (_, labels) in scored.items():
        if key[5].startswith("plan:"):
            assert torch.equal(labels, test_y[report])
    assert not set(search.tolist()) & set(report.tolist())

    details = json.loads((out / "details.json").read_text())
    for p in details["plans"]:
        assert p["images"]["split"] == "test_half" and p["images"]["n_images"] == len(search)
        assert p["images"]["scored_on"] == "test_other_half"
        assert p["images"]["n_scored"] == len(report)
        assert p["bound"]["level"] == 0.9 and p["bound"]["rule"] == "upper_bound"
    (attr,) = details["attribution"]
    assert attr["images"]["split"] == "test_half" and attr["images"]["n_images"] == len(search)
    (policy,) = details["stage_images"]
    assert (policy["recal_fit"], policy["search"], policy["plans_scored_on"]) == (
        "test_crossfit",
        "test_half",
        "test_other_half",
    )


def test_a_model_quantcal_trained_still_uses_val(tmp_path, monkeypatch, splits):
    seen = _spy(monkeypatch)
    out = study.run_study({**STUDY, "model": [ARCH]}, tmp_path / "run", quiet=True)
    val_x, val_y = _images_of(splits.val)
    for batches in (*seen["plan"], *seen["attribution"]):
        x, y = _cat(batches)
        assert torch.equal(x, val_x) and torch.equal(y, val_y)
    rows = [r for r in _rows(out) if r["status"] == "ok"]
    assert {int(r["n_test"]) for r in rows} == {len(splits.test)}
    assert not any("stratified half of test" in r["notes"] for r in rows)
    details = json.loads((out / "details.json").read_text())
    assert {p["images"]["split"] for p in details["plans"]} == {"val"}
    assert {p["images"]["scored_on"] for p in details["plans"]} == {"test"}
    assert details["attribution"][0]["images"]["split"] == "val"
    assert details["stage_images"][0]["search"] == "val"


def test_the_upper_bound_refuses_what_the_point_estimate_accepts():
    budget = quant.PlanBudget(max_accuracy_drop=0.01, max_ece_rise=0.01)
    ref = {"accuracy": 0.99, "ece": 0.02}
    m = {"accuracy": 0.985, "ece": 0.025, "accuracy_drop_hi": 0.013, "ece_rise_hi": 0.008}
    point = quant.PlanBudget(0.01, 0.01, confidence=None)
    assert plan_mod._within(m, ref, point)  # 0.5 point lost, 0.5 point of ECE: within
    assert not plan_mod._within(m, ref, budget)  # but up to 1.3 points at 90 %: refused
    assert plan_mod._within({**m, "accuracy_drop_hi": 0.009}, ref, budget)
    assert not plan_mod._within({**m, "accuracy_drop_hi": 0.009, "ece_rise_hi": 0.011}, ref, budget)
    with pytest.raises(ValueError, match="confidence"):
        quant.PlanBudget(confidence=1.5)


def test_a_search_refuses_the_plan_whose_bound_breaks_the_budget(monkeypatch):
    """With bounds 2 points above each point ECE rise, the plan a point-estimate search finds
    (within 5 points, but not 3) is refused for a dearer one whose bound keeps the budget."""
    from quantcal.calibration import metrics

    net = Net().eval()
    x, y = _data(net)
    calib, val = [x[:200]], _batches(x[200:], y[200:])
    levels = ("W8A8", "W4A8", "W4A4")
    point = quant.plan_mixed_precision(
        net, calib, val, budget=quant.PlanBudget(1.0, 0.05, confidence=None), levels=levels
    )
    assert point.bound["rule"] == "point" and 0.03 < point.bound["ece_rise"] <= 0.05

    def padded(plan, fp32, labels, confidence, seed, n_resamples=1000):
        rise = metrics.ece(plan[1], labels) - metrics.ece(fp32[1], labels)
        drop = metrics.accuracy(fp32[0], labels) - metrics.accuracy(plan[0], labels)
        return {"accuracy_drop_hi": drop, "ece_rise_hi": rise + 0.02}

    monkeypatch.setattr(plan_mod, "paired_upper_bounds", padded)
    bounded = quant.plan_mixed_precision(
        net, calib, val, budget=quant.PlanBudget(1.0, 0.05), levels=levels
    )
    assert bounded.within_budget and bounded.cost > point.cost
    b = bounded.as_dict()["bound"]
    assert b["rule"] == "upper_bound" and b["level"] == 0.9 and b["n_check"] == 500
    assert b["ece_rise_hi"] == pytest.approx(b["ece_rise"] + 0.02) and b["ece_rise_hi"] <= 0.05
