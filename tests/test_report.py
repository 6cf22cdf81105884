"""Report: findings verdicts from intervals, self-contained HTML, the terminal table."""

from __future__ import annotations

import re

import pytest

from _results import result_row, write_results
from quantcal.report import html as report

_row = result_row
_write = write_results


@pytest.fixture
def rows(tmp_path):
    rs = []
    for arch, rise, lo, hi, acc_low in (
        ("ghostnet_vgg16", 0.01, 0.002, 0.02, 0.88),
        ("mobileone_s0", 0.12, 0.08, 0.16, 0.40),
    ):
        rs.append(_row(arch, "fp32", "none", 0.03, 0.0, 0.0, 0.0))
        rs.append(_row(arch, "W4A4", "none", 0.03 + rise, rise, lo, hi, acc=acc_low))
        rs.append(
            _row(
                arch,
                "fp32",
                "temperature",
                0.02,
                0.0,
                0.0,
                0.0,
                temperature=1.1,
                ece_diff_vs_none=-0.01,
                ece_diff_vs_none_lo=-0.02,
                ece_diff_vs_none_hi=0.0,
            )
        )
        rs.append(
            _row(
                arch,
                "W4A4",
                "temperature",
                0.03,
                0.01,
                -0.01,
                0.03,
                acc=acc_low,
                temperature=1.8,
                ece_diff_vs_none=-rise,
                ece_diff_vs_none_lo=-rise - 0.02,
                ece_diff_vs_none_hi=-rise + 0.005,
            )
        )
    return _write(tmp_path, rs)


def test_findings_follow_the_intervals(rows):
    f = {x["claim"][:2]: x for x in report.findings(rows)}
    assert f["1."]["verdict"].startswith("supported (2 of 2)")
    # GhostNet has the smallest rise and its interval lies below MobileOne's.
    assert f["2."]["verdict"].startswith("supported")
    assert f["3."]["verdict"].startswith("supported")
    assert any("mobileone" in e for e in f["3."]["evidence"])


def test_findings_say_undecided_when_interval_contains_zero(tmp_path):
    rs = [
        _row("shufflenetv2", "fp32", "none", 0.03, 0, 0, 0),
        _row("shufflenetv2", "W4A4", "none", 0.035, 0.005, -0.01, 0.02),
    ]
    f = report.findings(_write(tmp_path, rs))
    assert f[0]["verdict"].startswith("undecided")
    assert any(x["claim"] == "Caveat" for x in f)  # 360 test images: said to be small


def test_contradicted_when_ece_falls(tmp_path):
    rs = [
        _row("shufflenetv2", "fp32", "none", 0.10, 0, 0, 0),
        _row("shufflenetv2", "W4A4", "none", 0.03, -0.07, -0.09, -0.05),
    ]
    assert report.findings(_write(tmp_path, rs))[0]["verdict"].startswith("contradicted")


def test_html_is_self_contained(rows, tmp_path):
    path = report.write_report(tmp_path)
    text = path.read_text()
    assert text.startswith("<!doctype html>") and "Findings" in text
    # No external resources: every image is inline.
    assert not re.search(r"src=['\"](?!data:)", text)
    assert text.count("data:image/png;base64,") >= 3
    assert (tmp_path / "figures" / "precision.png").exists()


def test_summary_table_has_a_line_per_cell(rows):
    text = report.summary_table(rows)
    lines = [ln.split() for ln in text.splitlines() if ln.startswith("digits")]
    assert sorted(ln[2] for ln in lines) == ["W4A4", "W4A4", "fp32", "fp32"]


def test_missing_results_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="quantcal run"):
        report.load_rows(tmp_path)


def test_report_shows_quantization_coverage(tmp_path):
    rs = [
        _row("mine", "fp32", "none", 0.03, 0, 0, 0),
        _row("mine", "W8A8", "none", 0.04, 0.01, 0.0, 0.02, quantized_layers="5/7"),
        _row("mine", "W4A4", "none", 0.05, 0.02, 0.01, 0.03, quantized_layers="5/7"),
    ]
    _write(tmp_path, rs)
    text = report.write_report(tmp_path).read_text()
    assert "Quantization coverage" in text and "W8A8 5/7, W4A4 5/7" in text
