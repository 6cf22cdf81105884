"""Summary tables for a paper or a wiki: the records, Markdown, LaTeX and JSON, each read back and
compared with results.csv; ``quantcal report --format``."""

from __future__ import annotations

import csv
import json
import math
import re

import pytest

from _results import result_row, write_results
from quantcal import cli
from quantcal.report import html as report
from quantcal.report import tables

# ---------------------------------------------------------------------------------------------
# Hand-made rows written to a results.csv (the pattern of test_report.py)
# ---------------------------------------------------------------------------------------------
_row = result_row
_write = write_results


def _cells(arch, **kw):
    """fp32, W8A8 and W4A4 without recalibration and with temperature scaling, numbers with
    many digits (the JSON must keep them all), one negative difference and one missing NLL."""
    out = []
    for k, prec in enumerate(("fp32", "W8A8", "W4A4")):
        rise = (0.0, -0.0123456789012345, 0.087654321098765)[k]
        base = 0.0312345678901234 + rise
        diff = (lambda d: (d, d - 0.011, d + 0.013)) if prec != "fp32" else (lambda d: (0, 0, 0))
        out.append(_row(arch, prec, "none", base, *diff(rise), acc=0.93 - 0.1 * k, **kw))
        out.append(
            _row(
                arch,
                prec,
                "temperature",
                0.021 + rise / 3,
                *diff(rise / 3),
                acc=0.93 - 0.1 * k,
                temperature=1.0 + 0.4 * k + 1e-9,
                **kw,
            )
        )
    return out


@pytest.fixture
def run(tmp_path):
    rs = _cells("ghostnet_vgg16") + _cells("mobileone_s0")
    rs[3]["nll"] = ""  # a number that does not exist prints as a dash, is null in JSON
    rs[4]["notes"] = "temperature hit the bound 100 | another note"
    # Not in the main table: a second range estimator, a second range-calibration sample and a
    # failed cell.
    rs.append(_row("ghostnet_vgg16", "W4A4", "none", 0.5, 0.4, 0.3, 0.5, observer="percentile"))
    rs.append(_row("ghostnet_vgg16", "W4A4", "none", 0.5, 0.4, 0.3, 0.5, ptq_sample=1))
    rs.append(
        _row("mobileone_s0", "W4A8", "none", 0.5, 0.4, 0.3, 0.5, status="error", error="boom")
    )
    _write(tmp_path, rs)
    return tmp_path


def _csv_main(path):
    """results.csv's main-table rows as the strings it holds, by hand: ok, the first range
    estimator (minmax here), the first range-calibration sample."""
    with open(path / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return [
        r
        for r in rows
        if r["status"] == "ok"
        and r["observer"] in ("-", "minmax")
        and r["ptq_sample"] in ("-1", "0")
    ]


def _key(dataset, model, objective, seed, precision, recal):
    return (dataset, model, objective or "ce", str(int(float(seed))), precision, recal)


def _csv_key(r):
    label = r["dataset"]
    if label.startswith("npz:"):
        label = "npz:" + label.rsplit("/", 1)[-1]
    model = f"{r['arch']}@{float(r['width']):g}"
    return _key(label, model, r["objective"], r["seed"], r["precision"], r["recal"])


# ---------------------------------------------------------------------------------------------
# Reading printed numbers back
# ---------------------------------------------------------------------------------------------
_INTERVAL = re.compile(r"^(\S+) \[(\S+), (\S+)\]$")


def _near(printed: str, csv_value: str, scale: float) -> None:
    """``printed`` is ``scale`` × the CSV's value to the precision it is printed with."""
    if csv_value == "":
        assert printed in ("–", "--"), printed
        return
    decimals = len(printed.split(".")[1]) if "." in printed else 0
    assert abs(float(printed) - scale * float(csv_value)) <= 0.5 * 10**-decimals + 1e-12, (
        printed,
        csv_value,
    )


def _near_interval(printed: str, csv_row: dict, key: str) -> None:
    m = _INTERVAL.match(printed)
    assert m, printed
    for text, col in zip(m.groups(), (key, f"{key}_lo", f"{key}_hi")):
        _near(text, csv_row[col], 100)


# Each printed heading's record key (by its first word: the headings are for people).
_HEADINGS = {
    "dataset": "dataset",
    "model": "model",
    "objective": "objective",
    "seed": "seed",
    "precision": "precision",
    "recal": "recal",
    "fit": "recal_fit",
    "accuracy": "accuracy",
    "ECE": "ece",
    "debiased": "debiased_ece",
    "NLL": "nll",
    "T": "temperature",
    "$T$": "temperature",
    "ΔECE": "ece_diff_vs_fp32",
    "$\\Delta$ECE": "ece_diff_vs_fp32",
    "n": "n_test",
    "$n_\\mathrm{test}$": "n_test",
    "notes": "notes",
}


def _check_table(headers: list[str], body: list[list[str]], csv_rows: list[dict]) -> None:
    """Every printed row is one main-table row of results.csv, every such row is printed, and
    each printed number equals the CSV's to the printed precision."""
    keys = [_HEADINGS[h.split()[0]] for h in headers]
    assert all(len(cells) == len(headers) for cells in body)
    by_key = {_csv_key(r): r for r in csv_rows}
    seen = []
    for cells in body:
        c = dict(zip(keys, cells))
        k = _key(
            c["dataset"],
            c["model"],
            c.get("objective"),
            c.get("seed", "0"),
            c["precision"],
            c["recal"],
        )
        r = by_key[k]
        seen.append(k)
        _near_interval(c["accuracy"], r, "accuracy")
        _near_interval(c["ece"], r, "ece")
        _near_interval(c["ece_diff_vs_fp32"], r, "ece_diff_vs_fp32")
        _near(c["debiased_ece"], r["debiased_ece"], 100)
        _near(c["nll"], r["nll"], 1)
        _near(c["temperature"], r["temperature"], 1)
        assert int(c["n_test"]) == int(float(r["n_test"]))
        assert c["recal_fit"] in (("–", "--") if r["recal"] == "none" else (r["recal_fit"],))
        assert (c["notes"] == "yes") == bool(r["notes"])
    assert sorted(seen) == sorted(by_key) and len(seen) == len(set(seen))


def _split_md(line: str) -> list[str]:
    assert line.startswith("| ") and line.endswith(" |"), line
    cells = re.split(r"(?<!\\) \| ", line[2:-2])
    return [c.replace("\\|", "|").replace("\\\\", "\\") for c in cells]


def _parse_md(text: str) -> tuple[list[str], list[list[str]]]:
    lines = text.rstrip("\n").split("\n")
    headers = _split_md(lines[0])
    assert re.fullmatch(r"\|(?:-{3}:?\|)+", lines[1]), lines[1]
    assert lines[1].count("|") == len(headers) + 1
    return headers, [_split_md(ln) for ln in lines[2:]]


_TEX_BACK = [
    (r"\textbackslash{}", "\\"),
    (r"\textasciitilde{}", "~"),
    (r"\textasciicircum{}", "^"),
    ("$-$", "-"),
    (r"\&", "&"),
    (r"\%", "%"),
    (r"\$", "$"),
    (r"\#", "#"),
    (r"\_", "_"),
    (r"\{", "{"),
    (r"\}", "}"),
]


def _tex_unescape(s: str) -> str:
    for a, b in _TEX_BACK:
        s = s.replace(a, b)
    return s


def _balanced(s: str) -> bool:
    depth = 0
    for m in re.finditer(r"\\.|[{}]", s):
        tok = m.group()
        depth += tok == "{"
        depth -= tok == "}"
        if depth < 0:
            return False
    return depth == 0


def _parse_latex(text: str) -> tuple[list[str], list[list[str]]]:
    lines = [ln for ln in text.rstrip("\n").split("\n") if not ln.startswith("%")]
    assert _balanced("\n".join(lines))
    assert lines[0].startswith(r"\begin{tabular}{") and lines[-1] == r"\end{tabular}"
    ncols = len(re.match(r"\\begin\{tabular\}\{([lr]+)\}", lines[0]).group(1))
    assert lines[1] == r"\toprule" and lines[3] == r"\midrule" and lines[-2] == r"\bottomrule"
    rows = [lines[2], *lines[4:-2]]
    assert text.count(r"\\") == len(rows)  # one row end per row, none elsewhere
    parsed = []
    for ln in rows:
        assert ln.endswith(r" \\") and ln.count(r"\\") == 1, ln
        cells = re.split(r"(?<!\\)&", ln[: -len(r" \\")])
        assert len(cells) == ncols, ln
        parsed.append([c.strip() for c in cells])
    for cells in parsed[1:]:
        for cell in cells:
            # Specials only escaped; `$` only as the math minus.
            bare = cell.replace("$-$", "")
            assert not re.search(r"(?<!\\)[_%&#$]", bare), cell
            assert not re.search(r"(?<!\\)[{}]", re.sub(r"\\text\w+\{\}", "", bare)), cell
            assert "~" not in bare and "^" not in bare and "–" not in bare, cell
    return parsed[0], [[_tex_unescape(c) for c in cells] for cells in parsed[1:]]


# ---------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------
def test_records_are_the_main_table_cells_in_order(run):
    rows = report.load_rows(run)
    recs = tables.summary_records(rows)
    assert len(recs) == 12 == len(_csv_main(run))
    assert all(tuple(r) == tables.COLUMNS for r in recs)
    # grouped by model, then fp32 → W8A8 → W4A4, then the study's recal order
    assert [(r["model"], r["precision"], r["recal"]) for r in recs[:6]] == [
        ("ghostnet_vgg16@0.25", p, m)
        for p in ("fp32", "W8A8", "W4A4")
        for m in ("none", "temperature")
    ]
    assert {r["model"] for r in recs[6:]} == {"mobileone_s0@0.25"}
    # the second range estimator, the second sample and the failed cell are not in it
    assert all(r["ece"] < 0.4 for r in recs) and "W4A8" not in {r["precision"] for r in recs}
    assert recs[3]["nll"] is None and recs[4]["notes"] is True and recs[5]["notes"] is False
    assert isinstance(recs[0]["seed"], int) and recs[0]["n_test"] == 360


def test_records_keep_full_precision(run):
    recs = tables.summary_records(report.load_rows(run))
    by_key = {_csv_key(r): r for r in _csv_main(run)}
    for rec in recs:
        r = by_key[_key("digits", rec["model"], "ce", rec["seed"], rec["precision"], rec["recal"])]
        for col in ("ece", "ece_lo", "accuracy_hi", "ece_diff_vs_fp32", "temperature"):
            assert rec[col] == (float(r[col]) if r[col] else None)  # exactly, not approx
    assert recs[2]["ece"] == 0.0312345678901234 - 0.0123456789012345


def test_empty_rows_give_no_records():
    assert tables.summary_records([]) == []


# ---------------------------------------------------------------------------------------------
# Formats read back
# ---------------------------------------------------------------------------------------------
def test_json_round_trip_is_exact(run):
    recs = tables.summary_records(report.load_rows(run))
    doc = json.loads(tables.to_json(recs, run="r1", study="demo", level=0.95))
    from quantcal import __version__

    assert doc["quantcal"] == __version__ and doc["run"] == "r1" and doc["study"] == "demo"
    assert doc["columns"] == list(tables.COLUMNS) and doc["level"] == 0.95
    assert len(doc["records"]) == len(_csv_main(run))
    by_key = {_csv_key(r): r for r in _csv_main(run)}
    for rec in doc["records"]:
        assert list(rec) == doc["columns"]
        r = by_key[
            _key(
                rec["dataset"],
                rec["model"],
                rec["objective"],
                rec["seed"],
                rec["precision"],
                rec["recal"],
            )
        ]
        for col in tables.COLUMNS:
            if col in ("model", "objective", "notes"):
                continue
            if col in ("dataset", "precision", "recal", "recal_fit"):
                assert rec[col] == r[col]
            elif r[col] == "":
                assert rec[col] is None
            else:
                assert rec[col] == float(r[col]), col  # bit for bit
        assert rec["notes"] == bool(r["notes"])


def test_json_writes_nan_as_null():
    rec = dict.fromkeys(tables.COLUMNS)
    rec.update(ece=float("nan"), nll=float("inf"), dataset="d")
    text = tables.to_json([rec])
    doc = json.loads(text)  # strict JSON: no NaN literal
    assert "NaN" not in text and doc["records"][0]["ece"] is None
    assert doc["records"][0]["nll"] is None


def test_markdown_parses_back_with_the_csv_numbers(run):
    recs = tables.summary_records(report.load_rows(run))
    text = tables.to_markdown(recs, level=0.95)
    headers, body = _parse_md(text)
    assert len(body) == len(recs) == 12
    assert len(headers) == len(tables.display_columns(recs))
    assert "accuracy % [95% CI]" in headers
    # one seed and only cross-entropy: those columns are left out
    assert "seed" not in headers and "objective" not in headers
    _check_table(headers, body, _csv_main(run))
    assert "| 1.4 |" in text  # W8A8 T = 1.4 + 1e-9, printed as 3 significant digits
    assert "-1.23 [-2.33, 0.07]" in text  # a negative difference, in points, two decimals


def test_latex_is_a_wellformed_booktabs_table_with_the_csv_numbers(run):
    recs = tables.summary_records(report.load_rows(run))
    text = tables.to_latex(recs, level=0.95)
    headers, body = _parse_latex(text)
    assert len(body) == len(recs)
    assert headers[headers.index("precision") + 2].startswith("fit")
    assert r"accuracy (\%) [95\% CI]" in headers
    _check_table(headers, body, _csv_main(run))
    assert r"$-$1.23 [$-$2.33, 0.07]" in text  # a math minus, not a hyphen
    assert "ghostnet\\_vgg16@0.25" in text


def test_special_characters_are_escaped(tmp_path):
    nasty = "npz:/data/my set_100%&#$~^{x}|y\\z.npz"
    rows = _cells("my_net", dataset=nasty, objective="focal_γ=3", notes="n")
    rows += _cells("my_net", dataset=nasty, objective="ce", seed=1)
    _write(tmp_path, rows)
    recs = tables.summary_records(report.load_rows(tmp_path))
    assert {r["dataset"] for r in recs} == {nasty}  # the record keeps the whole name
    md_headers, md_body = _parse_md(tables.to_markdown(recs))
    tex_headers, tex_body = _parse_latex(tables.to_latex(recs))
    label = "npz:my set_100%&#$~^{x}|y\\z.npz"  # as report.html shows it: the file name
    for headers, body in ((md_headers, md_body), (tex_headers, tex_body)):
        assert "seed" in headers and "objective" in headers  # two seeds, two objectives
        assert {cells[0] for cells in body} == {label}
        _check_table(headers, body, _csv_main_all_observers(tmp_path))
    assert {c[headers.index("objective")] for c in tex_body} == {"focal_γ=3", "ce"}


def _csv_main_all_observers(path):
    with open(path / "results.csv", newline="") as fh:
        return [
            r for r in csv.DictReader(fh) if r["status"] == "ok" and r["ptq_sample"] in ("-1", "0")
        ]


def test_intervals_and_missing_numbers():
    rec = dict.fromkeys(tables.COLUMNS)
    rec.update(
        dataset="d",
        model="m@1",
        objective="ce",
        seed=0,
        precision="fp32",
        recal="none",
        recal_fit="val",
        accuracy=0.123456,
        accuracy_lo=0.11,
        accuracy_hi=0.136,
        ece=0.05,
        notes=False,
    )
    _, body = _parse_md(tables.to_markdown([rec]))
    cells = body[0]
    assert "12.3 [11.0, 13.6]" in cells and "5.0" in cells  # no interval: the estimate alone
    assert cells.count("–") >= 5  # fit (recal none), debiased ECE, NLL, T, ΔECE, n
    _, tex = _parse_latex(tables.to_latex([rec]))
    assert "12.3 [11.0, 13.6]" in tex[0] and "--" in tex[0]


def test_render_refuses_an_unknown_format():
    with pytest.raises(ValueError, match="md, json, latex"):
        tables.render([], "csv")


def test_empty_records_still_make_valid_tables():
    assert _parse_md(tables.to_markdown([]))[1] == []
    assert _parse_latex(tables.to_latex([]))[1] == []
    assert json.loads(tables.to_json([]))["records"] == []


def test_run_info_reads_the_config(tmp_path):
    (tmp_path / "config.toml").write_text('name = "demo"\n\n[metrics]\nlevel = 0.9\n')
    assert tables.run_info(tmp_path) == {"run": tmp_path.name, "study": "demo", "level": 0.9}
    (tmp_path / "config.toml").write_text("name = [")  # broken: no header, no error
    assert tables.run_info(tmp_path)["study"] is None


# ---------------------------------------------------------------------------------------------
# quantcal report --format
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["md", "latex", "json"])
def test_cli_prints_the_table_and_writes_nothing(run, fmt, capsys):
    (run / "config.toml").write_text('name = "demo"\n\n[metrics]\nlevel = 0.95\n')
    before = sorted(p.name for p in run.iterdir())
    code = cli.main(["report", str(run), "--format", fmt])
    out, err = capsys.readouterr()
    assert code == 1  # the failed cell: grouped on stderr as always
    assert "1 of 15 result rows failed" in err and "boom" in err
    assert sorted(p.name for p in run.iterdir()) == before  # no report.html, no figures/
    if fmt == "json":
        doc = json.loads(out)
        assert doc["run"] == run.name and doc["study"] == "demo" and len(doc["records"]) == 12
    elif fmt == "md":
        headers, body = _parse_md(out)
        _check_table(headers, body, _csv_main(run))
    else:
        headers, body = _parse_latex(out)
        _check_table(headers, body, _csv_main(run))


def test_cli_exit_0_when_every_cell_is_ok(tmp_path, capsys):
    _write(tmp_path, _cells("ghostnet_vgg16"))
    assert cli.main(["report", str(tmp_path), "--format", "md"]) == 0
    out, err = capsys.readouterr()
    assert len(_parse_md(out)[1]) == 6 and err == ""


def test_cli_without_format_still_writes_the_report(tmp_path, capsys):
    from quantcal.store.runfolder import MARKER

    _write(tmp_path, _cells("ghostnet_vgg16"))
    (tmp_path / MARKER).write_text("{}")  # a folder quantcal made (else report refuses it)
    assert cli.main(["report", str(tmp_path)]) == 0
    assert (tmp_path / "report.html").exists()
    assert "report:" in capsys.readouterr().out


def test_cli_unknown_format_lists_the_choices(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["report", str(tmp_path), "--format", "csv"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'csv'" in err and all(f in err for f in ("md", "json", "latex"))


def test_cli_folder_without_results_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path), "--format", "md"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "results.csv" in err and "quantcal run" in err
    (tmp_path / "cache").mkdir()  # a sharded run not assembled yet: says how
    assert cli.main(["report", str(tmp_path), "--format", "md"]) == 2
    err = capsys.readouterr().err
    assert "results.csv" in err and "without --format" in err
    assert cli.main(["report", str(tmp_path / "nope"), "--format", "json"]) == 2


def test_cli_empty_results_is_a_clear_message(tmp_path, capsys):
    _write(tmp_path, [])
    assert cli.main(["report", str(tmp_path), "--format", "latex"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "no result rows" in err and "no table" in err
    failed = _cells("ghostnet_vgg16", status="error", error="RuntimeError: boom")
    _write(tmp_path, failed)
    assert cli.main(["report", str(tmp_path), "--format", "md"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and "no successful cells (6 of 6 rows failed)" in err and "boom" in err


def test_cli_help_describes_format_with_an_example(capsys):
    with pytest.raises(SystemExit):
        cli.main(["report", "--help"])
    text = capsys.readouterr().out
    assert "--format {md,json,latex}" in text
    assert set(tables.FORMATS) == {"md", "json", "latex"}
    assert "quantcal report runs/demo --format latex > table.tex" in " ".join(text.split())


def test_notes_flag_matches_the_csv(run):
    recs = tables.summary_records(report.load_rows(run))
    assert sum(r["notes"] for r in recs) == 1
    assert not any(math.isnan(r["ece"]) for r in recs)
