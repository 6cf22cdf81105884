"""Fault injection: a run a user can trust when files change, break or belong to someone else.

Each test reproduces a hostile scenario (a data file replaced between runs, damaged cache
entries, a foreign output folder, stray labels, failing cells, long and odd paths) through the
public entry points (``quantcal.cli.main`` and ``study.run_study``) and checks what the user
sees: exit status, messages, files and results.
"""

from __future__ import annotations

import csv
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from _studies import TINY, tiny
from quantcal import cli, study
from quantcal.store.runfolder import MARKER
from quantcal.training import data

N_ROWS = 2 * 2
_tiny = tiny


def _rows(out: Path) -> list[dict]:
    with open(out / "results.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _digits_npz(path: Path, *, n_test: int = 300, test_label: int | None = None) -> Path:
    """The scikit-learn digits as a MedMNIST-layout file (train + test)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.clip(np.rint(d.images * 255 / 16), 0, 255).astype(np.uint8)
    labels = d.target.astype(np.int64)
    test_y = labels[-n_test:].copy()
    if test_label is not None:
        test_y[0] = test_label
    np.savez(
        path,
        train_images=images[:-n_test],
        train_labels=labels[:-n_test],
        test_images=images[-n_test:],
        test_labels=test_y,
    )
    return path


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clean") / "run"
    study.run_study(TINY, out, quiet=True)
    return out


# ---------------------------------------------------------------------------------------------
# Data identity
# ---------------------------------------------------------------------------------------------
def test_replaced_data_file_recomputes_what_depends_on_it(tmp_path):
    path = _digits_npz(tmp_path / "d.npz", n_test=300)
    cfg = _tiny(**{"data.datasets": [f"npz:{path}"]})
    out = tmp_path / "run"
    study.run_study(cfg, out, quiet=True)
    assert {r["n_test"] for r in _rows(out)} == {"300"}
    time.sleep(0.01)
    _digits_npz(path, n_test=100)  # same path, new content
    study.run_study(cfg, out, quiet=True)
    assert {r["n_test"] for r in _rows(out)} == {"100"}
    # Two trained models in the cache: the old file's and the new one's.
    assert len(list((out / "cache" / "train").iterdir())) == 2


def test_replaced_checkpoint_is_evaluated_again(tmp_path):
    from quantcal import models

    ckpt = tmp_path / "net.pt"
    args = ["eval", "--checkpoint", str(ckpt), "--model", "shufflenetv2", "--width", "0.1"]
    args += ["--dataset", "digits", "--precisions", "fp32", "--recal", "none"]
    args += ["--out", str(tmp_path / "e"), "--quiet"]
    accs = []
    for seed in (1, 2):
        net = models.create_model(
            "shufflenetv2", num_classes=10, image_size=8, in_chans=1, width=0.1, seed=seed
        )
        torch.save(net.state_dict(), ckpt)
        assert cli.main(args) == 0
        accs.append(_rows(tmp_path / "e")[0]["nll"])
    assert accs[0] != accs[1]


@pytest.mark.parametrize("garbage", [b"", b"{not json", b"[1, 2]", b'{"x": {"size": 1}}'])
def test_damaged_digest_memo_is_ignored(tmp_path, garbage):
    from quantcal.store.digest import FileDigests, sha256_file

    path = _digits_npz(tmp_path / "d.npz")
    store = tmp_path / "memo.json"
    store.write_bytes(garbage)
    assert FileDigests(store)(path) == sha256_file(path)
    assert FileDigests(store)(path) == sha256_file(path)  # rewritten, now readable


def test_digest_is_memoised_by_size_and_mtime(tmp_path, monkeypatch):
    from quantcal.store import digest as _digest

    path = _digits_npz(tmp_path / "d.npz")
    calls = []
    real = _digest.sha256_file
    monkeypatch.setattr(_digest, "sha256_file", lambda p: calls.append(p) or real(p))
    memo = _digest.FileDigests(tmp_path / "memo.json")
    first = memo(path)
    assert memo(path) == first and len(calls) == 1
    again = _digest.FileDigests(tmp_path / "memo.json")  # persisted across runs
    assert again(path) == first and len(calls) == 1
    _digits_npz(path, n_test=100)
    assert again(path) != first and len(calls) == 2


# ---------------------------------------------------------------------------------------------
# Self-healing cache
# ---------------------------------------------------------------------------------------------
def _damage(path: Path, how: str) -> None:
    raw = path.read_bytes()
    if how == "empty":
        path.write_bytes(b"")
    elif how == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif how == "garbled":
        mid = len(raw) // 2
        path.write_bytes(raw[:mid] + bytes(b ^ 0x5A for b in raw[mid : mid + 64]) + raw[mid + 64 :])
    elif how == "wrong_type":
        path.write_text("[1, 2, 3]\n")
    else:  # pragma: no cover
        raise AssertionError(how)


def _entries(out: Path) -> dict[str, list[Path]]:
    cache = out / "cache"
    return {
        "row": sorted((cache / "rows").glob("*.json")),
        "logits_json": sorted((cache / "logits").glob("*.json")),
        "logits_pt": sorted((cache / "logits").glob("*.pt")),
        "train_meta": sorted((cache / "train").glob("*/meta.json")),
        "model_pt": sorted((cache / "train").glob("*/model.pt")),
        "last_pt": sorted((cache / "train").glob("*/last.pt")),
    }


@pytest.mark.parametrize(
    ("what", "how"),
    [
        ("row", "empty"),
        ("row", "truncated"),
        ("row", "garbled"),
        ("row", "wrong_type"),
        ("logits_json", "truncated"),
        ("logits_json", "wrong_type"),
        ("logits_pt", "empty"),
        ("logits_pt", "truncated"),
        ("logits_pt", "garbled"),
        ("train_meta", "garbled"),
        ("train_meta", "wrong_type"),
        ("model_pt", "truncated"),
        ("model_pt", "garbled"),
        ("last_pt", "truncated"),
    ],
)
def test_damaged_cache_entry_heals_to_identical_results(clean_run, tmp_path, what, how, capsys):
    out = tmp_path / "run"
    shutil.copytree(clean_run, out)
    victims = _entries(out)[what]
    assert victims, what
    for path in victims:
        _damage(path, how)
    study.run_study(TINY, out, quiet=False, report=False)
    assert (out / "results.csv").read_bytes() == (clean_run / "results.csv").read_bytes()
    err = capsys.readouterr().err
    if what != "last_pt":  # the resume checkpoint of a finished model is not read
        assert "was damaged" in err and victims[0].name in err
    # Healed for good: the next run reads everything from the cache and says nothing.
    study.run_study(TINY, out, quiet=False, report=False)
    assert "was damaged" not in capsys.readouterr().err


def test_train_entry_entirely_damaged_retrains_identically(clean_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(clean_run, out)
    for key in ("train_meta", "model_pt", "last_pt"):
        for path in _entries(out)[key]:
            _damage(path, "truncated")
    study.run_study(TINY, out, quiet=True)
    assert (out / "results.csv").read_bytes() == (clean_run / "results.csv").read_bytes()


def test_report_names_the_damaged_file(clean_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(clean_run, out)
    row = _entries(out)["row"][0]
    row.write_text("")
    assert cli.main(["report", str(out)]) == 2
    err = capsys.readouterr().err
    assert row.name in err and "re-run" in err.lower()
    assert "Expecting value" not in err.splitlines()[-1]
    study.run_study(TINY, out, quiet=True)  # a rerun rebuilds it
    assert (out / "results.csv").read_bytes() == (clean_run / "results.csv").read_bytes()
    assert "Cache entries rebuilt" in (out / "report.html").read_text()


def test_orphan_temporaries_are_removed(clean_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(clean_run, out)
    old = out / "cache" / "rows" / ".abc.json.x1y2.tmp"
    young = out / "cache" / "rows" / ".def.json.z3w4.tmp"
    old.write_text("{")
    young.write_text("{")
    hour_ago = time.time() - 3600
    os.utime(old, (hour_ago, hour_ago))
    study.run_study(TINY, out, quiet=True)
    assert not old.exists()
    assert young.exists()  # may belong to a shard writing right now


def test_new_result_column_recomputes_rows_without_retraining(clean_run, tmp_path, monkeypatch):
    from quantcal import quant
    from quantcal.training import train

    out = tmp_path / "run"
    shutil.copytree(clean_run, out)

    def boom(*a, **k):
        raise AssertionError("a new row schema must not retrain or re-quantize")

    monkeypatch.setattr(train, "train", boom)
    monkeypatch.setattr(train, "predict_logits", boom)
    monkeypatch.setattr(quant, "quantize", boom)
    from quantcal.study import keys, results, score

    more = (*study.RESULT_COLUMNS, "new_column")
    for module in (keys, results, score):  # the row key's schema, the CSV, the row itself
        monkeypatch.setattr(module, "RESULT_COLUMNS", more)
    rows_before = len(list((out / "cache" / "rows").glob("*.json")))
    study.run_study(TINY, out, quiet=True, report=False)
    assert len(list((out / "cache" / "rows").glob("*.json"))) == 2 * rows_before
    with open(out / "results.csv", newline="") as fh:
        header = next(csv.reader(fh))
    assert header[-1] == "new_column"


# ---------------------------------------------------------------------------------------------
# The output folder
# ---------------------------------------------------------------------------------------------
def _snapshot(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_foreign_out_folder_is_refused_and_untouched(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "results.csv").write_text("my own results\n")
    (out / "notes.txt").write_text("keep me\n")
    before = _snapshot(out)
    code = cli.main(["run", "demo", "--out", str(out), "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert "did not make" in err and "--force" in err and "Nothing was written" in err
    assert _snapshot(out) == before
    assert cli.main(["train", "--model", "shufflenetv2", "--out", str(out)]) == 2
    assert _snapshot(out) == before


def test_force_adopts_a_foreign_folder(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me\n")
    with pytest.raises(ValueError, match="did not make"):
        study.run_study(TINY, out, quiet=True)
    study.run_study(TINY, out, quiet=True, force=True)
    assert (out / MARKER).is_file() and (out / "notes.txt").read_text() == "keep me\n"
    assert len(_rows(out)) == N_ROWS
    study.run_study(TINY, out, quiet=True)  # marked now: no --force needed


def test_run_folder_of_an_earlier_release_is_recognised(tmp_path):
    out = tmp_path / "old_run"
    out.mkdir()
    (out / "env.json").write_text('{"quantcal": "0.1.0", "torch": "2.13.0"}\n')
    (out / "config.toml").write_text('name = "tiny"\n')
    (out / "results.csv").write_text("dataset\n")
    study.run_study(TINY, out, quiet=True, report=False)
    assert (out / MARKER).is_file() and len(_rows(out)) == N_ROWS
    # an env.json that is not quantcal's does not make a folder quantcal's
    other = tmp_path / "other"
    other.mkdir()
    (other / "env.json").write_text('{"conda": "base"}\n')
    (other / "config.toml").write_text("x = 1\n")
    with pytest.raises(ValueError, match="did not make"):
        study.run_study(TINY, other, quiet=True)


def test_fresh_removes_only_what_quantcal_wrote(clean_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(clean_run, out)
    mine = {
        out / "cache" / "my_notes.txt": "user file in cache\n",
        out / "cache" / "rows" / "keep.json": '{"user": true}\n',
        out / "cache" / "train" / "my_model": None,
    }
    for path, text in mine.items():
        if text is None:
            path.mkdir()
            (path / "weights.pt").write_text("user weights")
        else:
            path.write_text(text)
    old_rows = sorted(p.name for p in (out / "cache" / "rows").glob("*.json"))
    study.run_study(TINY, out, quiet=True, resume=False)
    for path, text in mine.items():
        assert path.exists(), path
        if text is not None:
            assert path.read_text() == text
    assert (out / "cache" / "train" / "my_model" / "weights.pt").read_text() == "user weights"
    assert sorted(p.name for p in (out / "cache" / "rows").glob("*.json")) == old_rows
    assert (out / "results.csv").read_bytes() == (clean_run / "results.csv").read_bytes()


def test_out_that_is_a_file_and_study_that_is_a_folder(tmp_path, capsys):
    f = tmp_path / "a_file"
    f.write_text("x")
    assert cli.main(["run", "demo", "--out", str(f)]) == 2
    assert "is a file" in capsys.readouterr().err
    assert f.read_text() == "x"
    assert cli.main(["run", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert cli.main(["report", str(f)]) == 2
    assert "is a file" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Labels
# ---------------------------------------------------------------------------------------------
def test_stray_test_label_is_refused_naming_the_values(tmp_path, capsys):
    path = _digits_npz(tmp_path / "d.npz", test_label=99)
    with pytest.raises(ValueError, match=r"test_labels .*99 \(1 images\)"):
        data.load_dataset(f"npz:{path}")
    out = tmp_path / "run"
    code = cli.main(["run", "demo", "--dataset", f"npz:{path}", "--out", str(out), "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert "test_labels" in err and "99" in err and str(path) in err
    assert not (out / "cache" / "train").exists()


def test_class_absent_from_a_split_is_noted(tmp_path, capsys):
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.clip(np.rint(d.images * 255 / 16), 0, 255).astype(np.uint8)
    y = d.target.astype(np.int64)
    test = (np.arange(len(y)) >= 1400) & (y != 3)  # no 3 in test
    path = tmp_path / "no3.npz"
    np.savez(
        path,
        train_images=images[:1400],
        train_labels=y[:1400],
        test_images=images[test],
        test_labels=y[test],
    )
    splits = data.load_dataset(f"npz:{path}")
    assert splits.num_classes == 10
    assert any("no test images (class 3)" in n for n in splits.notes)
    out = tmp_path / "run"
    study.run_study(_tiny(**{"data.datasets": [f"npz:{path}"]}), out, quiet=False)
    assert "no test images (class 3)" in capsys.readouterr().err
    assert all("no test images (class 3)" in r["notes"] for r in _rows(out))
    assert "no test images (class 3)" in (out / "report.html").read_text()


def test_class_count_comes_from_train_labels_only(tmp_path):
    path = _digits_npz(tmp_path / "d.npz")
    assert data.load_dataset(f"npz:{path}").num_classes == 10


# ---------------------------------------------------------------------------------------------
# Exit status and messages
# ---------------------------------------------------------------------------------------------
def test_failing_cells_exit_1_with_one_grouped_message(tmp_path, monkeypatch, capsys):
    from quantcal import quant

    def fail(*a, **k):
        raise RuntimeError("simulated backend failure")

    monkeypatch.setattr(quant, "quantize", fail)
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(study.load_study(TINY).to_toml())
    out = tmp_path / "run"
    code = cli.main(["run", str(cfg), "--out", str(out), "--quiet"])
    assert code == 1
    captured = capsys.readouterr()
    assert captured.err.count("simulated backend failure") == 1, captured.err
    assert "1 cells: RuntimeError: simulated backend failure" in captured.err
    assert "2 of 4 result rows failed" in captured.err
    assert "simulated" not in captured.out  # tables on stdout, errors on stderr
    rows = _rows(out)
    assert (out / "report.html").exists()
    assert sorted(r["status"] for r in rows) == ["error", "error", "ok", "ok"]


def test_diverged_training_is_one_named_cause(tmp_path, capsys):
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(study.load_study(_tiny(**{"train.lr": 1e6})).to_toml())
    assert cli.main(["run", str(cfg), "--out", str(tmp_path / "run"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "2 cells: FloatingPointError: training diverged: the mean loss of epoch 1 is nan" in err
    assert all(r["status"] == "error" for r in _rows(tmp_path / "run"))
    assert not list((tmp_path / "run" / "cache" / "train").glob("*/last.pt"))  # nothing NaN kept


def test_full_disk_while_caching_fails_the_cells_not_the_run(tmp_path, monkeypatch, capsys):
    import errno

    from quantcal.study.stages import logits as logits_stage

    real = logits_stage.atomic_write_bytes

    def full(path, data):
        if Path(path).suffix == ".pt" and "logits" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, data)

    monkeypatch.setattr(logits_stage, "atomic_write_bytes", full)
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(study.load_study(TINY).to_toml())
    assert cli.main(["run", str(cfg), "--out", str(tmp_path / "run"), "--quiet"]) == 1
    assert "No space left on device" in capsys.readouterr().err
    monkeypatch.setattr(logits_stage, "atomic_write_bytes", real)
    assert cli.main(["run", str(cfg), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    assert all(r["status"] == "ok" for r in _rows(tmp_path / "run"))


@pytest.mark.parametrize(
    ("dataset", "match"),
    [
        ("digitz", "did you mean 'digits'"),
        ("npz:/no/such/file.npz", "does not exist"),
    ],
)
def test_bad_dataset_exits_2_before_computing(tmp_path, capsys, dataset, match):
    out = tmp_path / "run"
    assert cli.main(["run", "demo", "--dataset", dataset, "--out", str(out), "--quiet"]) == 2
    assert match in capsys.readouterr().err
    assert not (out / "cache" / "train").exists()


def _hostile_npz(path: Path, kind: str) -> None:
    """Write one kind of broken dataset file at ``path``."""
    img = np.zeros((40, 8, 8), np.uint8)
    lab = np.arange(40) % 4
    good = {"train_images": img, "train_labels": lab}
    if kind == "empty_file":
        path.write_bytes(b"")
    elif kind == "not_a_zip":
        path.write_bytes(b"not a zip file at all")
    elif kind == "truncated_zip":
        np.savez(path, **good)
        path.write_bytes(path.read_bytes()[:300])
    elif kind == "single_npy":
        with open(path, "wb") as fh:
            np.save(fh, img)
    elif kind == "folder":
        path.mkdir()
    elif kind == "no_train":
        np.savez(path, test_images=img, test_labels=lab)
    elif kind == "float_images":
        np.savez(path, train_images=img.astype(np.float32), train_labels=lab)
    elif kind == "5d_images":
        np.savez(path, train_images=img[:, None, None], train_labels=lab)
    elif kind == "non_square":
        np.savez(path, train_images=np.zeros((40, 8, 6), np.uint8), train_labels=lab)
    elif kind == "float_labels":
        np.savez(path, train_images=img, train_labels=lab.astype(np.float32))
    elif kind == "labels_2_columns":
        np.savez(path, train_images=img, train_labels=np.stack([lab, lab], 1))
    elif kind == "length_mismatch":
        np.savez(path, train_images=img, train_labels=lab[:30])
    elif kind == "negative_label":
        np.savez(path, train_images=img, train_labels=lab - 1)
    elif kind == "images_without_labels":
        np.savez(path, **good, test_images=img)
    elif kind == "labels_without_images":
        np.savez(path, **good, val_labels=lab)
    elif kind == "shape_differs":
        np.savez(path, **good, test_images=np.zeros((10, 9, 9), np.uint8), test_labels=lab[:10])
    elif kind == "object_array":
        np.savez(path, train_images=np.array([img, None], dtype=object), train_labels=lab)
    elif kind == "empty_train":
        np.savez(path, train_images=img[:0], train_labels=lab[:0])
    elif kind == "stray_val_label":
        np.savez(path, **good, val_images=img[:8], val_labels=np.full(8, 7))
    else:  # pragma: no cover
        raise AssertionError(kind)


HOSTILE_NPZ = [
    "empty_file",
    "not_a_zip",
    "truncated_zip",
    "single_npy",
    "folder",
    "no_train",
    "float_images",
    "5d_images",
    "non_square",
    "float_labels",
    "labels_2_columns",
    "length_mismatch",
    "negative_label",
    "images_without_labels",
    "labels_without_images",
    "shape_differs",
    "object_array",
    "empty_train",
    "stray_val_label",
]


@pytest.mark.parametrize("kind", HOSTILE_NPZ)
def test_hostile_npz_exits_2_naming_the_file(tmp_path, capsys, kind):
    path = tmp_path / f"{kind}.npz"
    _hostile_npz(path, kind)
    out = tmp_path / "run"
    code = cli.main(["run", "demo", "--dataset", f"npz:{path}", "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert str(path) in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert not (out / "cache" / "train").exists()


def test_malformed_npz_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.npz"
    np.savez(bad, images=np.zeros((4, 8, 8), np.uint8))
    assert cli.main(["run", "demo", "--dataset", f"npz:{bad}", "--out", str(tmp_path / "r")]) == 2
    assert "MedMNIST npz layout" in capsys.readouterr().err
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file at all")
    assert (
        cli.main(["run", "demo", "--dataset", f"npz:{garbage}", "--out", str(tmp_path / "r2")]) == 2
    )
    assert str(garbage) in capsys.readouterr().err


def test_progress_lines_without_a_terminal(tmp_path, capsys):
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(study.load_study(_tiny(**{"train.epochs": 2})).to_toml())
    assert cli.main(["run", str(cfg), "--out", str(tmp_path / "run")]) == 0
    captured = capsys.readouterr()
    err = captured.err
    assert "epoch 1/2" in err and "epoch 2/2" in err
    assert "eval " in err and "W8A8" in err and "score " in err and "report.html" in err
    assert all(line.startswith("[") for line in err.splitlines() if "epoch" in line)
    assert "report:" in captured.out and "epoch" not in captured.out


# ---------------------------------------------------------------------------------------------
# Smaller items
# ---------------------------------------------------------------------------------------------
def test_long_dataset_path_gives_short_figure_names(tmp_path):
    deep = tmp_path
    while len(str(deep)) < 230:
        deep = deep / "a_rather_long_folder_name"
    deep.mkdir(parents=True)
    path = _digits_npz(deep / "d.npz")
    out = tmp_path / "run"
    study.run_study(_tiny(**{"data.datasets": [f"npz:{path}"]}), out, quiet=True)
    names = [p.name for p in (out / "figures").glob("*.png")]
    assert names and max(len(n) for n in names) < 100
    assert any("d.npz" in n for n in names)


def test_duplicate_precisions_in_any_case_are_refused():
    with pytest.raises(ValueError, match="twice"):
        study.load_study(_tiny(**{"quant.precisions": ["fp32", "W4A4", "w4a4"]}))
    cfg = study.load_study(_tiny(**{"quant.precisions": ["FP32", "w8a8"]}))
    assert cfg.precisions == ("fp32", "W8A8")


def test_output_files_follow_the_umask(clean_run):
    mask = os.umask(0o022)
    os.umask(mask)
    for name in ("results.csv", "report.html", "config.toml", MARKER):
        assert (clean_run / name).stat().st_mode & 0o777 == 0o666 & ~mask, name


# ---------------------------------------------------------------------------------------------
# Reproducible: the study pins its threads
# ---------------------------------------------------------------------------------------------
def test_demo_pins_one_thread_and_the_run_applies_it(tmp_path, monkeypatch):
    from quantcal.training import train

    assert study.load_study("demo").threads == 1
    seen = []
    real = train.train

    def spy(*a, **k):
        seen.append(torch.get_num_threads())
        return real(*a, **k)

    monkeypatch.setattr(train, "train", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        study.run_study(_tiny(threads=1), tmp_path / "one", quiet=True, report=False)
        assert seen == [1] and torch.get_num_threads() == 2  # pinned, then restored
        study.run_study(_tiny(threads=2), tmp_path / "two", quiet=True, report=False)
        assert seen == [1, 2]
    finally:
        torch.set_num_threads(before)
    keys = [p.name for d in ("one", "two") for p in (tmp_path / d / "cache" / "train").iterdir()]
    assert len(set(keys)) == 2  # a different thread count is a different experiment


def test_quantizer_warnings_become_notes_on_rows_report_and_stderr(tmp_path, monkeypatch, capsys):
    """A user model whose classifier input range is tiny: its int32 biases would overflow. The
    quantizer keeps them in float and says so, and the study carries that to every place a
    number is read."""
    (tmp_path / "tinyhead_mod.py").write_text(
        "import torch\n"
        "from torch import nn\n\n\n"
        "class Net(nn.Module):\n"
        "    def __init__(self, num_classes, in_chans):\n"
        "        super().__init__()\n"
        "        self.conv = nn.Conv2d(in_chans, 8, 3, padding=1)\n"
        "        self.fc = nn.Linear(8, num_classes)\n\n"
        "    def forward(self, x):\n"
        "        return self.fc(torch.relu(self.conv(x)).mean((2, 3)) * 1e-10)\n\n\n"
        "def build(num_classes, in_chans):\n"
        "    return Net(num_classes, in_chans)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = _tiny(model=[{"arch": "tinyhead_mod:build", "width": 1.0}])
    out = tmp_path / "run"
    study.run_study(cfg, out, quiet=False)
    err = capsys.readouterr().err
    assert "biases beyond the int32" in err and "fc (" in err
    rows = _rows(out)
    w8 = [r for r in rows if r["precision"] == "W8A8"]
    assert w8 and all("biases beyond the int32" in r["notes"] for r in w8)
    assert not any("biases beyond" in r["notes"] for r in rows if r["precision"] == "fp32")
    assert "biases beyond the int32" in (out / "report.html").read_text()
