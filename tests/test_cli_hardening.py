"""Every command as hardened as ``run``: ownership of what it writes, documented exit statuses,
clear refusals of foreign files, and nothing computed or lost on bad input."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from _studies import TINY
from quantcal import cli, study
from quantcal.store.runfolder import MARKER


def _study_file(tmp_path: Path, name: str, **quant) -> Path:
    cfg = {**TINY, "name": name, "quant": {**TINY["quant"], **quant}}
    path = tmp_path / f"{name}.toml"
    path.write_text(study.load_study(cfg).to_toml())
    return path


def _logits(path: Path, seed: int, n: int = 200, classes: int = 5) -> str:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    logits = rng.normal(size=(n, classes)).astype(np.float32)
    logits[np.arange(n), labels] += 2.0
    np.savez(path, logits=logits, labels=labels)
    return str(path)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished tiny study, run through the CLI (so its folder records the study)."""
    tmp = tmp_path_factory.mktemp("owned")
    out = tmp / "run"
    assert cli.main(["run", str(_study_file(tmp, "tiny")), "--out", str(out), "--quiet"]) == 0
    return tmp, out


def test_another_study_into_the_same_out_is_refused_unless_forced(tiny_run, capsys):
    tmp, out = tiny_run
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    other = _study_file(tmp, "other")
    assert cli.main(["run", str(other), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "study 'tiny'" in err and "study 'other'" in err and "--force" in err
    assert "results.csv" in err and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    # The same study again (a resume) needs nothing.
    assert cli.main(["run", str(_study_file(tmp, "tiny")), "--out", str(out), "--quiet"]) == 0


def test_force_replaces_another_studys_results(tiny_run, tmp_path):
    _, out = tiny_run
    copy = tmp_path / "copy"
    import shutil

    shutil.copytree(out, copy)
    other = _study_file(tmp_path, "other", precisions=["fp32", "W4A8"])
    assert cli.main(["run", str(other), "--out", str(copy), "--quiet", "--force"]) == 0
    with open(copy / "results.csv", newline="") as fh:
        assert {r["precision"] for r in csv.DictReader(fh)} == {"fp32", "W4A8"}
    # ... and the folder now records the other study: the first one is refused in turn.
    assert cli.main(["run", str(_study_file(tmp_path, "tiny")), "--out", str(copy)]) == 2


def test_a_second_eval_of_other_logits_does_not_overwrite_the_first(tmp_path, capsys):
    a = [_logits(tmp_path / "va.npz", 0), _logits(tmp_path / "ta.npz", 1)]
    b = [_logits(tmp_path / "vb.npz", 2), _logits(tmp_path / "tb.npz", 3)]
    out = tmp_path / "eval"
    assert cli.main(["eval", "--logits", *a, "--out", str(out), "--quiet"]) == 0
    first = (out / "results.csv").read_bytes()
    assert cli.main(["eval", "--logits", *b, "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "ta.npz" in err and "tb.npz" in err and "--force" in err
    assert (out / "results.csv").read_bytes() == first
    assert cli.main(["eval", "--logits", *a, "--out", str(out), "--quiet"]) == 0  # same: fine
    assert cli.main(["eval", "--logits", *b, "--out", str(out), "--quiet", "--force"]) == 0
    assert (out / "results.csv").read_bytes() != first


def test_report_refuses_a_folder_it_does_not_own(tiny_run, tmp_path, capsys):
    _, out = tiny_run
    user = tmp_path / "mine"
    user.mkdir()
    for name in ("results.csv", "config.toml"):
        (user / name).write_bytes((out / name).read_bytes())
    (user / "report.html").write_text("<p>my hand-edited notes</p>")
    assert cli.main(["report", str(user)]) == 2
    err = capsys.readouterr().err
    assert "not made by quantcal" in err and "--force" in err and "Traceback" not in err
    assert (user / "report.html").read_text() == "<p>my hand-edited notes</p>"
    assert not (user / "figures").exists()
    # Printing the table writes nothing, so it needs no ownership.
    assert cli.main(["report", str(user), "--format", "md"]) == 0
    assert "W8A8" in capsys.readouterr().out
    assert cli.main(["report", str(user), "--force"]) == 0
    assert "my hand-edited notes" not in (user / "report.html").read_text()


def test_report_of_a_foreign_results_csv_names_the_missing_columns(tmp_path, capsys):
    folder = tmp_path / "foreign"
    folder.mkdir()
    (folder / MARKER).write_text("{}")
    (folder / "results.csv").write_text("model,acc\nresnet,0.9\n")
    for argv in (["report", str(folder)], ["report", str(folder), "--format", "json"]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert "lacks the columns dataset, arch" in err and "Traceback" not in err


def test_compare_of_runs_that_share_no_cell_exits_2(tiny_run, tmp_path, capsys):
    _, out = tiny_run
    other = tmp_path / "other"
    cfg = _study_file(tmp_path, "other", precisions=["fp32", "W4A8"])
    assert (
        cli.main(
            [
                "run",
                str(cfg),
                "--out",
                str(other),
                "--quiet",
                "--set",
                "model=[{arch='shufflenetv2', width=0.15}]",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert cli.main(["compare", str(out), str(other)]) == 2
    assert "share no cell" in capsys.readouterr().err


def test_compare_names_a_folder_without_logits(tmp_path, capsys):
    """A folder with a config.toml but no cache/ and no kept predictions: refused, named."""
    a = [_logits(tmp_path / "va.npz", 0), _logits(tmp_path / "ta.npz", 1)]
    out = tmp_path / "eval"
    assert cli.main(["eval", "--logits", *a, "--out", str(out), "--quiet"]) == 0
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.toml").write_text((out / "config.toml").read_text())
    assert cli.main(["compare", str(out), str(bare)]) == 2
    err = capsys.readouterr().err
    assert "neither cache/ nor" in err and str(bare) in err and "Traceback" not in err


def test_a_run_refused_for_bad_input_leaves_no_folder(tmp_path, capsys):
    out = tmp_path / "new"
    bad = {**TINY, "data": {"datasets": ["npz:" + str(tmp_path / "missing.npz")]}}
    path = tmp_path / "bad.toml"
    path.write_text(study.load_study(bad).to_toml())
    assert cli.main(["run", str(path), "--out", str(out)]) == 2
    assert "missing.npz" in capsys.readouterr().err
    assert not out.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["run", str(path), "--out", str(empty)]) == 2
    assert empty.is_dir() and not any(empty.iterdir())  # the user's empty folder stays


@pytest.mark.parametrize(
    "command", ["run", "train", "eval", "report", "plan", "compare", "data", "list"]
)
def test_every_command_documents_its_exit_statuses(command, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([command, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "exit status" in text and " 2 " in text.replace("\n", " ")
