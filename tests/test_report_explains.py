"""The report explains itself and tells the truth (issue 22): the plans table lists the layers
kept at the top level, a ``path/file.py:factory`` model gets a short label, a glossary names what
the report shows and cites the paper, near-empty reliability bins are drawn faint, and a run that
trained nothing lists no training recipe."""

from __future__ import annotations

import json
import re

import pytest

from _results import result_row, write_results
from quantcal.report import html as report
from quantcal.report import tables
from quantcal.report.glossary import glossary_section
from quantcal.report.plans import plans_section
from quantcal.report.plots import FULL_COUNT, MIN_ALPHA, bin_alpha, draw_reliability

_row = result_row
_write = write_results


def _section(text: str, title: str) -> str:
    """The HTML of the report section headed ``title`` (up to the next <h2>)."""
    start = re.search(rf"<h2[^>]*>{re.escape(title)}</h2>", text)
    assert start, f"no {title} section"
    end = text.find("<h2", start.end())
    return text[start.start() : end if end >= 0 else len(text)]


# ---------------------------------------------------------------------------------------------
# Plans: the layers kept at the top level, whatever the order of uniform_costs
# ---------------------------------------------------------------------------------------------
def _plan_run(tmp_path):
    rs = [
        _row("mine", "fp32", "none", 0.03, 0, 0, 0),
        _row("mine", "W8A8", "none", 0.04, 0.01, 0.0, 0.02),
        _row("mine", "W4A4", "none", 0.09, 0.06, 0.04, 0.08),
        _row("mine", "plan:calib", "none", 0.05, 0.02, 0.01, 0.03),
        _row("mine", "plan:calib", "temperature", 0.03, 0.0, -0.01, 0.01),
    ]
    rows = _write(tmp_path, rs)
    record = {
        "dataset": "digits",
        "arch": "mine",
        "width": 0.25,
        "objective": "ce",
        "precision": "plan:calib",
        "cost_kind": "bops",
        "cost": 500.0,
        "evaluations": 7,
        # as details.json stores it: keys sorted, so the top level (W8A8) comes last
        "uniform_costs": {"W4A4": 250.0, "W4A8": 500.0, "W8A8": 1000.0},
        "plan": {
            "stem": [8, 8],
            "block1": [4, 4],
            "block2": [4, 8],
            "head": [8, 8],
            "block3": [8, 8],
        },
        "sensitivity": {
            "stem": {"W4A8": 0.5, "W4A4": 0.9},
            "block1": {"W4A8": 0.001, "W4A4": 0.002},
            "block2": {"W4A8": 0.01, "W4A4": 0.3},
            "head": {"W4A8": 0.2, "W4A4": 0.7},
            "block3": {"W4A8": 0.05},
        },
    }
    details = {"reliability": {}, "inspect": [], "plans": [record]}
    (tmp_path / "details.json").write_text(json.dumps(details, indent=2, sort_keys=True))
    return rows, json.loads((tmp_path / "details.json").read_text())


def _kept_column(section: str) -> str:
    cells = re.findall(r"<td class='text why'>(.*?)</td>", section)
    assert len(cells) == 1
    return cells[0]


def test_plans_table_lists_the_layers_kept_at_the_top_level(tmp_path):
    rows, details = _plan_run(tmp_path)
    assert list(details["plans"][0]["uniform_costs"]) == ["W4A4", "W4A8", "W8A8"]
    html_text, _ = plans_section(rows, details)
    kept = _kept_column(html_text)
    # the W8A8 layers, most sensitive first; never a lowered one
    assert kept.startswith("stem (0.9), head (0.7), block3 (0.05)")
    assert "block1" not in kept and "block2" not in kept
    assert "kept at W8A8" in html_text


def test_plans_table_in_the_written_report(tmp_path):
    _plan_run(tmp_path)
    text = report.write_report(tmp_path).read_text()
    kept = _kept_column(_section(text, "Mixed precision"))
    assert "stem" in kept and "block1" not in kept


# ---------------------------------------------------------------------------------------------
# Model labels
# ---------------------------------------------------------------------------------------------
def test_short_models_keep_names_and_shorten_paths():
    short = tables.short_models(
        ["shufflenetv2", "mypkg.nets:build", "/home/me/proj/nets.py:build", "/x/other.py:make"]
    )
    assert short == {
        "shufflenetv2": "shufflenetv2",
        "mypkg.nets:build": "mypkg.nets:build",
        "/home/me/proj/nets.py:build": "nets.py:build",
        "/x/other.py:make": "other.py:make",
    }


def test_short_models_tell_colliding_paths_apart():
    short = tables.short_models(["/a/one/nets.py:build", "/b/two/nets.py:build", "/c/x.py:f"])
    assert short["/a/one/nets.py:build"] == "one/nets.py:build"
    assert short["/b/two/nets.py:build"] == "two/nets.py:build"
    assert short["/c/x.py:f"] == "x.py:f"  # no collision: as short as it gets
    same_dir = tables.short_models(["/a/m/nets.py:build", "/b/m/nets.py:build"])
    assert same_dir == {
        "/a/m/nets.py:build": "a/m/nets.py:build",
        "/b/m/nets.py:build": "b/m/nets.py:build",
    }


def test_a_file_factory_model_gets_a_short_label_in_the_report(tmp_path):
    arch = "/long/absolute/path/to/nets.py:build"
    rs = [
        _row(arch, "fp32", "none", 0.03, 0, 0, 0),
        _row(arch, "W4A4", "none", 0.08, 0.05, 0.03, 0.07),
        _row(arch, "fp32", "temperature", 0.02, 0, 0, 0, temperature=1.1),
        _row(arch, "W4A4", "temperature", 0.03, 0.01, 0.0, 0.02, temperature=1.5),
    ]
    rows = _write(tmp_path, rs)
    (tmp_path / "config.toml").write_text(f'name = "eval"\n[[model]]\narch = "{arch}"\n')
    text = report.write_report(tmp_path).read_text()
    body = text[: text.index("<h2>Configuration</h2>")]
    assert "nets.py:build@0.25" in body
    assert "/long/absolute" not in body
    assert arch in _section(text, "Configuration")  # the full path stays in the config
    assert "/long/absolute" not in report.summary_table(rows)
    assert {r["model"] for r in tables.summary_records(rows)} == {"nets.py:build@0.25"}


# ---------------------------------------------------------------------------------------------
# Glossary
# ---------------------------------------------------------------------------------------------
_RECALS = ("none", "temperature", "temperature_fp32", "vector", "histogram", "isotonic")


def test_glossary_names_each_recalibrator_and_cites_the_paper(tmp_path):
    rs = []
    for prec, rise in (("fp32", 0.0), ("W8A8", 0.01), ("W4A4", 0.05)):
        for m in _RECALS:
            rs.append(_row("ghostnet_vgg16", prec, m, 0.03 + rise, rise, rise - 0.01, rise + 0.01))
    _write(tmp_path, rs)
    text = report.write_report(tmp_path).read_text()
    glossary = _section(text, "Glossary")
    terms = re.findall(r"<dt>(.*?)</dt>", glossary)
    for m in _RECALS:
        assert f"{m} (recalibrator)" in terms
    assert "2309.13866" in glossary and "Guo et al. 2017" in glossary
    assert "Zadrozny &amp; Elkan 2001" in glossary and "Zadrozny &amp; Elkan 2002" in glossary
    assert any(t.startswith("WxAy (W8A8, W4A4)") for t in terms)
    assert "symmetric, one scale per output channel" in glossary
    assert "asymmetric (a scale and a zero-point) per tensor" in glossary
    assert "15 equal-width bins" in glossary
    shown = text[: text.index("<h2 id='glossary'>")]
    # an estimator is explained exactly when the report shows it
    assert ("debiased ECE" in terms) == bool(re.search(r"\bdebiased\b", shown))
    assert ("Brier score" in terms) == bool(re.search(r"\bBrier\b", shown))
    # the paper is cited where its claims appear
    findings = _section(text, "Findings")
    assert "2309.13866" in findings


def test_glossary_explains_only_the_estimators_shown():
    rows = [{"precision": "W4A8", "recal": "temperature"}]
    config = {"metrics": {"n_bins": 10}}
    some = glossary_section(rows, config, "ECE % and smooth ECE, MCE, and the output SQNR")
    for term in ("ECE (binned)", "smooth ECE", "MCE", "SQNR", "WxAy (W4A8)"):
        assert f"<dt>{term}</dt>" in some
    assert "10 equal-width bins" in some and "Błasiok" in some
    for term in ("debiased ECE", "adaptive ECE", "class-wise ECE", "NLL", "Brier score"):
        assert f"<dt>{term}</dt>" not in some
    everything = glossary_section(
        rows, config, "ECE, adaptive ECE, class-wise ECE, debiased ECE, NLL, Brier"
    )
    for term in ("adaptive ECE", "class-wise ECE", "debiased ECE", "NLL", "Brier score"):
        assert f"<dt>{term}</dt>" in everything
    assert "Kumar, Liang &amp; Ma 2019" in everything


# ---------------------------------------------------------------------------------------------
# Reliability diagrams: a bin's weight is visible
# ---------------------------------------------------------------------------------------------
def test_bin_alpha_grows_with_the_count():
    assert bin_alpha(0) == 0.0
    assert bin_alpha(1) == bin_alpha(2) == MIN_ALPHA
    assert bin_alpha(FULL_COUNT / 2) == pytest.approx(0.5)
    assert bin_alpha(FULL_COUNT) == bin_alpha(10_000) == 1.0


def test_reliability_bins_with_one_or_two_images_are_faint():
    from matplotlib.figure import Figure

    ax = Figure().subplots()
    edges = [i / 5 for i in range(6)]
    count = [1, 2, 0, 40, 900]
    conf = [0.1, 0.3, None, 0.7, 0.95]
    acc = [1.0, 0.0, None, 0.6, 0.96]
    draw_reliability(ax, edges, count, conf, acc)
    (bars,) = [c for c in ax.containers if c.get_label() == "accuracy"]
    alphas = [b.get_alpha() for b in bars]
    assert alphas[:2] == [MIN_ALPHA, MIN_ALPHA] and alphas[2:] == [1.0, 1.0]
    gaps = [b for c in ax.containers if c.get_label().endswith("gap") for b in c]
    faint = [b for b in gaps if b.get_x() < 0.4]  # the gaps of the 1- and 2-image bins
    assert len(faint) == 2 and all(b.get_alpha() <= 0.45 * MIN_ALPHA + 1e-12 for b in faint)
    counts = [t.get_text() for t in ax.texts if t.get_gid() == "bin-count"]
    assert counts == ["1", "2", "40", "900"]  # every non-empty bin's count is shown
    legend = {t.get_text(): h for h, t in zip(ax.legend_.legend_handles, ax.legend_.get_texts())}
    assert legend["accuracy"].get_alpha() == 1.0  # a faint first bin does not fade the key


# ---------------------------------------------------------------------------------------------
# Configuration: only what applies
# ---------------------------------------------------------------------------------------------
_CONFIG = """name = "{name}"
seeds = [0]

[data]
datasets = ["digits"]

[[model]]
arch = "mine"
width = 0.25
{checkpoint}
[train]
epochs = 10
lr = 0.05

[[train.objectives]]
name = "ce"

[quant]
precisions = ["fp32", "W4A4"]
{methods}
[recal]
methods = ["none", "temperature"]
"""


def _config_report(tmp_path, name, checkpoint, methods=""):
    rs = [
        _row("mine", "fp32", "none", 0.03, 0, 0, 0),
        _row("mine", "W4A4", "none", 0.08, 0.05, 0.03, 0.07),
    ]
    _write(tmp_path, rs)
    ckpt = 'checkpoint = "/abs/net.pt"\n' if checkpoint else ""
    (tmp_path / "config.toml").write_text(
        _CONFIG.format(name=name, checkpoint=ckpt, methods=methods)
    )
    return _section(report.write_report(tmp_path).read_text(), "Configuration")


def test_an_eval_of_a_checkpoint_lists_no_training_recipe(tmp_path):
    section = _config_report(tmp_path, "eval", checkpoint=True)
    assert "No network was trained" in section
    shown = section[section.index("<pre>") :]
    assert "[train]" not in shown and "epochs" not in shown
    assert "train.objectives" not in shown
    assert "[quant]" in shown and "[recal]" in shown and "checkpoint" in shown
    assert "epochs" in (tmp_path / "config.toml").read_text()  # the file keeps it


def test_a_study_that_trains_keeps_its_recipe(tmp_path):
    section = _config_report(tmp_path, "demo", checkpoint=False)
    assert "[train]" in section and "epochs = 10" in section


def test_qat_on_a_checkpoint_keeps_the_recipe_it_fine_tunes_with(tmp_path):
    section = _config_report(tmp_path, "eval", checkpoint=True, methods='methods = ["qat"]\n')
    assert "[train]" in section and "No network was trained" not in section


# ---------------------------------------------------------------------------------------------
# Key numbers: intervals under the numbers, not beside them
# ---------------------------------------------------------------------------------------------
def test_key_numbers_put_intervals_on_a_second_line(tmp_path):
    rs = [
        _row("ghostnet_vgg16", "fp32", "none", 0.03, 0, 0, 0),
        _row("ghostnet_vgg16", "W4A4", "none", 0.08, 0.05, 0.03, 0.07),
    ]
    _write(tmp_path, rs)
    key = _section(report.write_report(tmp_path).read_text(), "Key numbers")
    assert "[CI]" not in key
    assert "8.0</span><br><span class='ci'>[7.0, 9.0]</span>" in key
    assert "<th title='model'>model</th>" in key  # one dataset: no dataset column
