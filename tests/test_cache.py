"""The study cache (``quantcal.store.cache``) and file digests (``quantcal.store.digest``), unit
by unit, from their contracts.

README "Runs you can trust": every cached entry is verified when read, a damaged one is removed
with a message naming the file and computed again, and the report lists what was rebuilt; every
cache key that depends on a file holds the file's SHA-256, memoised by size and modification
time. The references below are independent of the code: checksums are computed here with
hashlib over the canonical JSON the ``_cache`` docstring names (sorted keys, no spaces, UTF-8),
the run marker is the documented ``.quantcal-run``, and a damaged entry is damaged by hand.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import hashlib
import json
import locale
import os
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from quantcal.store import digest as _digest
from quantcal.store.cache import Cache, heal_work_file, healed_entries, run_cache_of
from quantcal.store.digest import FileDigests, sha256_file

RUN_MARKER = ".quantcal-run"  # README: "a `.quantcal-run` marker" makes a folder quantcal's


def _canonical_sha(obj: dict) -> str:
    """SHA-256 of ``obj`` as canonical JSON: keys sorted, no whitespace, UTF-8 (not escaped)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _run(tmp_path: Path) -> tuple[Path, Cache, list[str]]:
    """A run folder (with its marker) and a Cache of its ``cache/`` that logs into a list."""
    run = tmp_path / "run"
    (run / "cache" / "rows").mkdir(parents=True)
    (run / RUN_MARKER).write_text("{}\n")
    logged: list[str] = []
    return run, Cache(str(run / "cache"), logged.append), logged


def _records(cache_root: Path) -> list[dict]:
    return json.loads((cache_root / "healed.json").read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------
# write_json / read_json: a checksummed entry round-trips; any damage is healed and named
# ---------------------------------------------------------------------------------------------
def test_written_entry_carries_the_sha256_of_its_canonical_json(tmp_path):
    """write_json records under ``_sha256`` the SHA-256 of the entry's content as canonical JSON
    (so an entry written by one release verifies in the next). Keys inserted out of order and a
    non-ASCII string pin "sorted" and "UTF-8, not escaped"."""
    _, cache, _ = _run(tmp_path)
    path = tmp_path / "run" / "cache" / "rows" / "a.json"
    obj = {"model": "café", "acc": 0.5, "bins": [1, 2], "b": {"y": 1, "x": None}}
    cache.write_json(path, obj)
    on_disk = json.loads(path.read_text(encoding="utf-8"))
    assert on_disk == {**obj, "_sha256": _canonical_sha(obj)}
    assert obj == {"model": "café", "acc": 0.5, "bins": [1, 2], "b": {"y": 1, "x": None}}
    assert not [p.name for p in path.parent.iterdir() if p != path]  # no temporary left behind


def test_entry_round_trips_without_its_checksum_and_says_nothing(tmp_path):
    """read_json returns the object written, without the checksum key, and heals nothing."""
    run, cache, logged = _run(tmp_path)
    path = run / "cache" / "rows" / "a.json"
    obj = {"model": "ü-net", "ece": 0.031, "n": 3}
    cache.write_json(path, obj)
    assert cache.read_json(path, required=["model", "ece"]) == obj
    assert path.exists() and logged == [] and not (run / "cache" / "healed.json").exists()


def test_entry_checksummed_by_hand_is_accepted(tmp_path):
    """An entry whose ``_sha256`` is the canonical SHA-256 of the rest verifies, whatever the
    file's own layout (indentation, key order, escaped non-ASCII)."""
    run, cache, logged = _run(tmp_path)
    path = run / "cache" / "rows" / "a.json"
    obj = {"z": "naïve", "a": [1.5, {"k": "v"}]}
    path.write_text(json.dumps({**obj, "_sha256": _canonical_sha(obj)}, ensure_ascii=True))
    assert cache.read_json(path) == obj and logged == []


def test_absent_entry_is_none_and_heals_nothing(tmp_path):
    """A missing entry is simply not cached: None, no message, no heal record."""
    run, cache, logged = _run(tmp_path)
    assert cache.read_json(run / "cache" / "rows" / "nope.json") is None
    assert cache.read_torch(run / "cache" / "rows" / "nope.pt", "0" * 64) is None
    assert logged == [] and healed_entries(run / "cache") == []


def test_entry_without_checksum_is_read_as_is(tmp_path):
    """An entry written without a checksum (an earlier release) is read as is."""
    run, cache, logged = _run(tmp_path)
    path = run / "cache" / "rows" / "old.json"
    path.write_text('{"acc": 0.9, "model": "m"}\n')
    assert cache.read_json(path, required=["acc"]) == {"acc": 0.9, "model": "m"}
    assert path.exists() and logged == []


def _heal_checked(run: Path, cache: Cache, logged: list[str], path: Path, why: str) -> None:
    """The entry is gone, one message names it (relative to the run folder) and why, and
    ``healed.json`` records it for the report."""
    assert not path.exists()
    rel = str(path.relative_to(run))
    assert len(logged) == 1, logged
    assert rel in logged[0] and "damaged" in logged[0] and "computed again" in logged[0]
    assert why in logged[0]
    records = healed_entries(run / "cache")
    assert [r["file"] for r in records] == [rel]
    assert why in records[0]["reason"]
    assert records[0]["reason"] in logged[0]


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"", "unreadable JSON"),  # empty
        (b'{"acc": 0.9, "mod', "unreadable JSON"),  # truncated
        (b'{"acc": 0.9}\xff\xfe', "unreadable JSON"),  # not UTF-8
        (b"[1, 2, 3]", "list"),  # wrong type
        (b'"text"', "str"),
        (b"3.5", "float"),
        (b"null", "NoneType"),
    ],
)
def test_unparseable_or_non_object_entry_is_healed_and_named(tmp_path, content, why):
    """A cached JSON that does not parse, or parses to something other than an object, is
    removed with a message naming the file (and the type it held)."""
    run, cache, logged = _run(tmp_path)
    path = run / "cache" / "rows" / "bad.json"
    path.write_bytes(content)
    assert cache.read_json(path) is None
    _heal_checked(run, cache, logged, path, why)
    if why not in ("unreadable JSON",):
        assert "not an object" in logged[0]


def test_flipped_byte_inside_a_string_is_caught_by_the_checksum(tmp_path):
    """A damaged byte inside a string still parses; the SHA-256 recorded in the entry does not
    match it, so the entry is healed."""
    run, cache, logged = _run(tmp_path)
    path = run / "cache" / "rows" / "a.json"
    cache.write_json(path, {"model": "resnet", "acc": 0.75})
    path.write_text(path.read_text().replace("resnet", "resnef"))
    assert json.loads(path.read_text())["model"] == "resnef"  # still valid JSON
    assert cache.read_json(path) is None
    _heal_checked(run, cache, logged, path, "differs from the SHA-256")
    assert "(its content differs from the SHA-256 recorded in it)" in logged[0]


@pytest.mark.parametrize(
    "damage",
    [
        lambda o: {**o, "acc": 0.76},  # a changed value
        lambda o: {**o, "extra": 1},  # an added key
        lambda o: {k: v for k, v in o.items() if k != "acc"},  # a dropped key
        lambda o: {**o, "_sha256": o["_sha256"][:-1] + ("0" if o["_sha256"][-1] != "0" else "1")},
        lambda o: {**o, "_sha256": ""},  # an emptied checksum is not "no checksum"
    ],
)
def test_content_that_differs_from_its_checksum_is_healed(tmp_path, damage):
    """Any difference between the content and the recorded SHA-256 heals the entry."""
    run, cache, logged = _run(tmp_path)
    path = run / "cache" / "rows" / "a.json"
    cache.write_json(path, {"model": "m", "acc": 0.75})
    path.write_text(json.dumps(damage(json.loads(path.read_text()))))
    assert cache.read_json(path) is None
    _heal_checked(run, cache, logged, path, "SHA-256")


def test_entry_lacking_required_keys_is_healed_naming_them(tmp_path):
    """An object without its required keys is healed; the message names every missing key."""
    run, cache, logged = _run(tmp_path)
    path = run / "cache" / "rows" / "a.json"
    cache.write_json(path, {"model": "m"})
    assert cache.read_json(path, required=("model", "acc", "ece")) is None
    _heal_checked(run, cache, logged, path, "lacks acc, ece")
    assert "model" not in logged[0].split("lacks")[1]


def test_required_keys_may_be_a_generator(tmp_path):
    """``required`` is any iterable of key names."""
    run, cache, _ = _run(tmp_path)
    path = run / "cache" / "rows" / "a.json"
    cache.write_json(path, {"model": "m", "acc": 1})
    assert cache.read_json(path, required=(k for k in ["model", "acc"])) == {"model": "m", "acc": 1}


@pytest.mark.parametrize("kind", ["json", "torch"])
def test_folder_in_place_of_an_entry_is_damage_not_a_crash(tmp_path, kind):
    """An entry that cannot be read is damaged: None, and the run goes on (documented: None
    "when absent or damaged (then healed)")."""
    run, cache, logged = _run(tmp_path)
    path = run / "cache" / "rows" / f"a.{kind}"
    path.mkdir()
    got = cache.read_json(path) if kind == "json" else cache.read_torch(path, "0" * 64)
    assert got is None and logged and not path.exists()  # removed: computed again next time


# ---------------------------------------------------------------------------------------------
# read_torch: tensor files verified against the SHA-256 recorded beside them
# ---------------------------------------------------------------------------------------------
def _saved(path: Path, obj) -> str:
    torch.save(obj, path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_verified_tensor_file_loads(tmp_path):
    """A file whose SHA-256 is the recorded one loads, unchanged and left in place."""
    run, cache, logged = _run(tmp_path)
    path = run / "cache" / "rows" / "l.pt"
    sha = _saved(path, {"logits": torch.arange(6.0).reshape(2, 3), "n": 2})
    got = cache.read_torch(path, sha)
    assert torch.equal(got["logits"], torch.arange(6.0).reshape(2, 3)) and got["n"] == 2
    assert path.exists() and logged == []


@pytest.mark.parametrize("how", ["empty", "truncated", "flipped"])
def test_tensor_file_that_differs_from_its_sha256_is_healed(tmp_path, how):
    """A tensor file whose bytes differ from the recorded SHA-256 is removed; the message names
    it and both digests (their first 12 hex digits)."""
    run, cache, logged = _run(tmp_path)
    path = run / "cache" / "rows" / "l.pt"
    sha = _saved(path, {"logits": torch.ones(4, 4)})
    raw = path.read_bytes()
    raw = {
        "empty": b"",
        "truncated": raw[: len(raw) // 2],
        "flipped": raw[:-40] + bytes([raw[-40] ^ 1]) + raw[-39:],
    }[how]
    path.write_bytes(raw)
    actual = hashlib.sha256(raw).hexdigest()
    assert cache.read_torch(path, sha) is None
    _heal_checked(run, cache, logged, path, "SHA-256")
    assert f"{actual[:12]}..." in logged[0] and f"{sha[:12]}..." in logged[0]
    assert actual[:13] not in logged[0] and sha[:13] not in logged[0]
    assert logged[0].index(actual[:12]) < logged[0].index(sha[:12])  # found, then recorded


def test_verified_bytes_that_do_not_load_are_healed(tmp_path):
    """Bytes that match their SHA-256 but are not a loadable torch file are healed too."""
    run, cache, logged = _run(tmp_path)
    path = run / "cache" / "rows" / "l.pt"
    path.write_bytes(b"not a torch file")
    assert cache.read_torch(path, hashlib.sha256(b"not a torch file").hexdigest()) is None
    _heal_checked(run, cache, logged, path, "cannot be loaded")


def test_tensor_entry_is_loaded_weights_only(tmp_path):
    """Cache files are loaded with ``weights_only=True``: a pickle of an arbitrary object (here a
    date) is refused and healed, never unpickled."""
    run, cache, logged = _run(tmp_path)
    path = run / "cache" / "rows" / "l.pt"
    sha = _saved(path, {"when": datetime.date(2020, 1, 1)})
    assert cache.read_torch(path, sha) is None
    _heal_checked(run, cache, logged, path, "cannot be loaded: UnpicklingError")


def test_tensor_entry_written_on_a_gpu_loads_onto_the_cpu(tmp_path, monkeypatch):
    """A cached tensor file is read onto the CPU whatever device wrote it (a cache made on a GPU
    machine is read on a CPU one): a file that records a CUDA location loads, on the CPU."""
    run, cache, logged = _run(tmp_path)
    path = run / "cache" / "rows" / "l.pt"
    with monkeypatch.context() as m:
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        sha = _saved(path, {"logits": torch.arange(3.0)})
    assert b"cuda:0" in path.read_bytes()
    got = cache.read_torch(path, sha)
    assert got is not None, logged
    assert got["logits"].device == torch.device("cpu")
    assert torch.equal(got["logits"], torch.arange(3.0)) and logged == []


def test_tensor_entry_is_weights_only_even_where_the_environment_relaxes_it(tmp_path, monkeypatch):
    """``weights_only=True`` is asked for, not left to torch's default: an environment that
    turns the default off (TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD) still gets no arbitrary unpickling."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    run, cache, logged = _run(tmp_path)
    path = run / "cache" / "rows" / "l.pt"
    sha = _saved(path, {"when": datetime.date(2020, 1, 1)})
    assert cache.read_torch(path, sha) is None
    _heal_checked(run, cache, logged, path, "cannot be loaded: UnpicklingError")


@pytest.mark.parametrize("kind", ["json", "torch"])
def test_entry_that_cannot_be_read_is_healed_naming_the_error(tmp_path, monkeypatch, kind):
    """An I/O error reading an entry (a bad sector) is damage: healed, the error named."""
    run, cache, logged = _run(tmp_path)
    path = run / "cache" / "rows" / f"a.{kind}"
    path.write_bytes(b"{}")

    method = "read_bytes" if kind == "torch" else "read_text"
    real = getattr(Path, method)

    def failing(self, *args, **kwargs):
        if self == path:
            raise OSError(errno.EIO, "Input/output error", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, method, failing)
    got = cache.read_json(path) if kind == "json" else cache.read_torch(path, "0" * 64)
    assert got is None
    _heal_checked(run, cache, logged, path, "unreadable")
    assert "Input/output error" in logged[0]


# ---------------------------------------------------------------------------------------------
# Files are UTF-8 whatever the locale (a cache written under one LANG is read under another)
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def ascii_locale():
    """The process's locale encoding made ASCII (LC_CTYPE=C), then restored."""
    old = locale.setlocale(locale.LC_CTYPE)
    locale.setlocale(locale.LC_CTYPE, "C")
    try:
        if locale.getpreferredencoding(False).lower().replace("-", "") == "utf8":
            pytest.skip("Python's UTF-8 mode: no non-UTF-8 locale encoding to test under")
        yield
    finally:
        locale.setlocale(locale.LC_CTYPE, old)


def _utf8_json(path: Path, obj) -> None:
    """``obj`` as JSON in raw UTF-8 (RFC 8259: JSON between systems is UTF-8), non-ASCII text
    unescaped, as another writer (an earlier release, a hand edit) may leave it."""
    path.write_bytes(json.dumps(obj, ensure_ascii=False).encode("utf-8"))
    assert "é".encode() in path.read_bytes()


def test_utf8_entry_reads_back_under_an_ascii_locale(tmp_path, ascii_locale):
    """A cache entry is read as UTF-8, not in the locale's encoding: an entry with raw UTF-8
    text verifies and is not healed."""
    run, cache, logged = _run(tmp_path)
    path = run / "cache" / "rows" / "a.json"
    obj = {"model": "café", "note": "µ ≤ 1"}
    _utf8_json(path, {**obj, "_sha256": _canonical_sha(obj)})
    assert cache.read_json(path) == obj and logged == []
    legacy = run / "cache" / "rows" / "old.json"
    _utf8_json(legacy, obj)  # no checksum
    assert cache.read_json(legacy) == obj and logged == []


def test_utf8_heal_records_survive_an_ascii_locale(tmp_path, ascii_locale):
    """healed.json is read as UTF-8 when appending to it and when listing it for the report:
    earlier records with raw UTF-8 text are kept."""
    run, cache, _ = _run(tmp_path)
    _utf8_json(run / "cache" / "healed.json", [{"file": "cache/rows/é.json", "reason": "première"}])
    cache.heal(run / "cache" / "rows" / "ü.json", "zweite")
    assert [(r["file"], r["reason"]) for r in healed_entries(run / "cache")] == [
        ("cache/rows/é.json", "première"),
        ("cache/rows/ü.json", "zweite"),
    ]
    _utf8_json(run / "cache" / "healed.json", [{"file": "cache/rows/é.json", "reason": "r"}])
    assert healed_entries(run / "cache") == [{"file": "cache/rows/é.json", "reason": "r"}]


def test_utf8_digest_store_survives_an_ascii_locale(tmp_path, ascii_locale):
    """The digest store is read as UTF-8: a memo of a non-ASCII path is kept."""
    path = tmp_path / "données.npz"
    path.write_bytes(b"abc")
    st = os.stat(path)
    store = tmp_path / "digests.json"
    entry = {"size": 3, "mtime_ns": st.st_mtime_ns, "sha256": "ab" * 32}
    _utf8_json(store, {str(path.resolve()): entry})
    assert FileDigests(store).last_known(path) == "ab" * 32


# ---------------------------------------------------------------------------------------------
# heal and healed.json
# ---------------------------------------------------------------------------------------------
def test_heal_records_accumulate_in_healed_json(tmp_path):
    """Every heal appends {file, reason, time} to ``cache/healed.json``; the file is named
    relative to the run folder; healed_entries returns the records for the report."""
    run, cache, logged = _run(tmp_path)
    a, b = run / "cache" / "rows" / "a.json", run / "cache" / "train" / "k" / "last.pt"
    b.parent.mkdir(parents=True)
    a.write_text("x")
    b.write_bytes(b"y")
    before = time.time()
    cache.heal(a, "first reason")
    cache.heal(b, "second reason")
    after = time.time()
    assert not a.exists() and not b.exists()
    records = _records(run / "cache")
    assert [(r["file"], r["reason"]) for r in records] == [
        ("cache/rows/a.json", "first reason"),
        ("cache/train/k/last.pt", "second reason"),
    ]
    assert all(before <= r["time"] <= after for r in records)
    assert healed_entries(run / "cache") == records
    assert logged == [
        "cache  cache/rows/a.json was damaged (first reason): removed, it will be computed again",
        "cache  cache/train/k/last.pt was damaged (second reason): removed, it will be computed "
        "again",
    ]


def test_heal_of_an_entry_already_gone_still_names_it(tmp_path):
    """Healing a file that no longer exists is not an error; it is still named and recorded."""
    run, cache, logged = _run(tmp_path)
    cache.heal(run / "cache" / "rows" / "gone.json", "why")
    assert "cache/rows/gone.json" in logged[0]
    assert [r["file"] for r in healed_entries(run / "cache")] == ["cache/rows/gone.json"]


def test_heal_outside_the_run_folder_names_the_full_path(tmp_path):
    """A healed file outside the cache's run folder is named by its own path."""
    run, cache, logged = _run(tmp_path)
    other = tmp_path / "elsewhere" / "x.json"
    other.parent.mkdir()
    other.write_text("x")
    cache.heal(other, "why")
    assert not other.exists()
    assert f"cache  {other} was damaged (why)" in logged[0]
    assert [r["file"] for r in healed_entries(run / "cache")] == [str(other)]


@pytest.mark.parametrize("record", [b"{not json", b'{"a": 1}', b"\xff\xfe", b"7"])
def test_damaged_heal_record_is_started_over(tmp_path, record):
    """A healed.json that is unreadable or not a list is replaced by a fresh list."""
    run, cache, _ = _run(tmp_path)
    (run / "cache" / "healed.json").write_bytes(record)
    cache.heal(run / "cache" / "rows" / "a.json", "why")
    assert [r["reason"] for r in _records(run / "cache")] == ["why"]


def test_heal_record_that_cannot_be_written_does_not_fail_the_run(tmp_path):
    """The record is a courtesy: when healed.json cannot be read or written (here a folder
    stands in its place) the entry is still removed and named, and nothing is raised."""
    run, cache, logged = _run(tmp_path)
    (run / "cache" / "healed.json").mkdir()
    entry = run / "cache" / "rows" / "a.json"
    entry.write_text("x")
    cache.heal(entry, "why")
    assert not entry.exists() and "cache/rows/a.json" in logged[0]
    assert healed_entries(run / "cache") == []


@pytest.mark.parametrize(
    ("content", "want"),
    [
        (None, []),
        (b"", []),
        (b"{broken", []),
        (b"\xff", []),
        (b'{"file": "x"}', []),
        (b"7", []),
        (b"null", []),
        (
            b'[{"file": "x", "reason": "r"}, 3, "s", null, {"file": "y"}]',
            [{"file": "x", "reason": "r"}, {"file": "y"}],
        ),
    ],
)
def test_healed_entries_tolerates_any_record(tmp_path, content, want):
    """healed_entries: the dict records of healed.json; empty when none or unreadable."""
    if content is not None:
        (tmp_path / "healed.json").write_bytes(content)
    assert healed_entries(str(tmp_path)) == want


# ---------------------------------------------------------------------------------------------
# run_cache_of / heal_work_file: work files of training stages
# ---------------------------------------------------------------------------------------------
def test_run_cache_of_finds_the_cache_of_a_marked_run(tmp_path, monkeypatch):
    """The ``cache/`` folder of the run folder (one holding the marker) a path lies in, found
    for absolute and relative paths, and for paths that do not exist yet."""
    run, _, _ = _run(tmp_path)
    work = run / "cache" / "train" / "KEY" / "last.pt"
    assert run_cache_of(work) == run / "cache"
    assert run_cache_of(str(run / "cache" / "healed.json")) == run / "cache"
    monkeypatch.chdir(run / "cache")
    assert run_cache_of(Path("train") / "KEY" / "last.pt") == run / "cache"


def test_run_cache_of_needs_the_run_marker_file(tmp_path):
    """No marker (or a folder of the marker's name) is no run folder: None. Only a folder named
    ``cache`` directly in the run folder counts."""
    bare = tmp_path / "bare" / "cache" / "train" / "last.pt"
    assert run_cache_of(bare) is None
    fake = tmp_path / "fake"
    (fake / RUN_MARKER).mkdir(parents=True)
    assert run_cache_of(fake / "cache" / "train" / "last.pt") is None
    run, _, _ = _run(tmp_path)
    assert run_cache_of(run / "notcache" / "x.pt") is None
    assert run_cache_of(run / "Cache" / "x.pt") is None


def test_run_cache_of_takes_the_innermost_run(tmp_path):
    """A run folder inside another run's cache: the innermost run's cache is the one."""
    outer, _, _ = _run(tmp_path)
    inner = outer / "cache" / "sub" / "run"
    (inner / "cache").mkdir(parents=True)
    (inner / RUN_MARKER).write_text("{}\n")
    assert run_cache_of(inner / "cache" / "x.pt") == inner / "cache"


def test_heal_work_file_inside_a_run_goes_through_the_cache(tmp_path, monkeypatch):
    """Inside a run's cache a damaged work file is removed, named in ``log`` relative to the run
    and recorded in healed.json; no warning."""
    run, _, _ = _run(tmp_path)
    last = run / "cache" / "train" / "KEY" / "last.pt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"half a checkpoint")
    logged: list[str] = []
    monkeypatch.chdir(run / "cache" / "train")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        heal_work_file(Path("KEY") / "last.pt", "truncated", logged.append)
    assert not last.exists()
    assert len(logged) == 1 and "cache/train/KEY/last.pt" in logged[0] and "truncated" in logged[0]
    assert healed_entries(run / "cache") == [
        {
            "file": "cache/train/KEY/last.pt",
            "reason": "truncated",
            "time": healed_entries(run / "cache")[0]["time"],
        }
    ]


def test_heal_work_file_elsewhere_warns_naming_it(tmp_path):
    """Outside a run's cache the file is removed and named, with the reason, in a UserWarning
    attributed to the caller; ``log`` is not used and no healed.json is written."""
    path = tmp_path / "work" / "last.pt"
    path.parent.mkdir()
    path.write_bytes(b"x")
    logged: list[str] = []
    with pytest.warns(UserWarning) as caught:
        heal_work_file(path, "bad zip", logged.append)
    assert not path.exists() and logged == []
    assert len(caught) == 1
    msg = str(caught[0].message)
    assert str(path) in msg and "bad zip" in msg and "damaged" in msg and "computed again" in msg
    # attributed to the caller, not to quantcal's own line (under mutmut a trampoline frame
    # stands between the two, so the caller's file itself cannot be asserted)
    assert Path(caught[0].filename).name != "_cache.py"
    assert not list(tmp_path.rglob("healed.json"))


def test_heal_work_file_warning_points_at_its_caller(tmp_path, monkeypatch):
    """The warning is attributed to the line that called heal_work_file (``stacklevel=2``), the
    stage whose work file was damaged, not to a line inside quantcal or further up the stack.
    The caller is read off the stack when heal_work_file removes the file (so a wrapper around
    the function, as mutmut's trampoline, counts as the caller)."""
    path = tmp_path / "last.pt"
    path.write_bytes(b"x")
    callers = []
    real_unlink = Path.unlink

    def spy(self, *args, **kwargs):
        frame = sys._getframe(1)  # up to heal_work_file (any helper in between), then one more
        while "heal_work_file" not in frame.f_code.co_name:
            frame = frame.f_back
        callers.append((frame.f_back.f_code.co_filename, frame.f_back.f_lineno))
        return real_unlink(self, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", spy)
    with pytest.warns(UserWarning) as caught:
        heal_work_file(path, "why", lambda s: None)
    assert not path.exists() and len(callers) == 1
    assert (caught[0].filename, caught[0].lineno) == callers[0]


def test_heal_work_file_of_a_missing_file_still_warns(tmp_path):
    """A work file already gone is no error."""
    with pytest.warns(UserWarning, match="gone.pt was damaged"):
        heal_work_file(tmp_path / "gone.pt", "why", lambda s: None)


# ---------------------------------------------------------------------------------------------
# _digest: SHA-256 of files, memoised by (resolved path, size, mtime_ns)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [0, 1, 1000, (1 << 20) + 7])
def test_sha256_file_is_the_sha256_of_the_bytes(tmp_path, size):
    """The hex SHA-256 of a file's bytes (empty and multi-chunk files included)."""
    data = bytes((i * 7 + 3) % 256 for i in range(size))
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
    assert sha256_file(str(path), chunk_size=3) == hashlib.sha256(data).hexdigest()


def test_sha256_file_reads_in_chunks(tmp_path, monkeypatch):
    """A file is read in chunks of at most ``chunk_size`` bytes, never whole (a 160 MB dataset
    is hashed in bounded memory)."""
    data = bytes(range(256)) * 5
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    asked = []

    class Spy:  # stands in for open(): the real file, its reads recorded
        def __init__(self, *args, **kwargs):
            self.opened = (args, kwargs)

        def __enter__(self):
            self.stack = contextlib.ExitStack()
            args, kwargs = self.opened
            self.fh = self.stack.enter_context(open(*args, **kwargs))
            return self

        def __exit__(self, *exc):
            self.stack.close()

        def read(self, n=-1):
            asked.append(n)
            return self.fh.read(n)

    monkeypatch.setattr(_digest, "open", Spy, raising=False)
    assert sha256_file(path, chunk_size=100) == hashlib.sha256(data).hexdigest()
    assert asked and all(isinstance(n, int) and 0 < n <= 100 for n in asked)
    assert len(asked) >= len(data) // 100


def _forge(path: Path, data: bytes) -> None:
    """Rewrite ``path`` with ``data`` and put its modification time back (the documented blind
    spot: same size and a forged time are not noticed)."""
    st = os.stat(path)
    path.write_bytes(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_digest_is_the_files_sha256_and_follows_its_content(tmp_path):
    """A digest is the file's SHA-256; new content of another size, or of the same size with a
    new modification time, gives the new content's digest."""
    path = tmp_path / "d.npz"
    path.write_bytes(b"one")
    digests = FileDigests()
    assert digests(path) == hashlib.sha256(b"one").hexdigest()
    st = os.stat(path)
    path.write_bytes(b"three")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # same time, another size
    assert digests(path) == hashlib.sha256(b"three").hexdigest()
    path.write_bytes(b"THREE")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # same size, another time
    assert digests(str(path)) == hashlib.sha256(b"THREE").hexdigest()


def test_digest_is_memoised_by_size_and_mtime(tmp_path):
    """An unchanged (size, mtime_ns) is not read again: a forged rewrite keeps the old digest,
    as the module documents; a touch alone re-reads and gives the same digest."""
    path = tmp_path / "d.npz"
    path.write_bytes(b"abc")
    digests = FileDigests()
    first = digests(path)
    _forge(path, b"xyz")
    assert digests(path) == first
    assert digests.last_known(path) == first
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000))
    assert digests(path) == hashlib.sha256(b"xyz").hexdigest()


def test_memo_is_keyed_by_the_resolved_path(tmp_path, monkeypatch):
    """The same file reached through a relative path, a symlink or ``~`` shares one memo."""
    path = tmp_path / "d.npz"
    path.write_bytes(b"abc")
    digests = FileDigests()
    first = digests(path)
    _forge(path, b"xyz")
    monkeypatch.chdir(tmp_path)
    assert digests("d.npz") == first
    (tmp_path / "link.npz").symlink_to(path)
    assert digests(tmp_path / "link.npz") == first
    monkeypatch.setenv("HOME", str(tmp_path))
    assert digests("~/d.npz") == first
    assert digests.last_known("~/link.npz") == first


def test_store_keeps_the_memo_across_runs(tmp_path):
    """With a store, the memo outlives the object: a new FileDigests on the same store knows
    the digest (a forged rewrite is not re-read), and the store is plain JSON per resolved path."""
    path = tmp_path / "d.npz"
    path.write_bytes(b"abc")
    store = tmp_path / "cache" / "digests.json"
    first = FileDigests(store)(path)
    assert first == hashlib.sha256(b"abc").hexdigest()
    st = os.stat(path)
    assert json.loads(store.read_text(encoding="utf-8")) == {
        str(path.resolve()): {"size": 3, "mtime_ns": st.st_mtime_ns, "sha256": first}
    }
    _forge(path, b"xyz")
    again = FileDigests(str(store))
    assert again.last_known(path) == first
    assert again(path) == first


def test_without_a_store_nothing_is_written(tmp_path):
    """FileDigests() keeps its memo in memory only."""
    path = tmp_path / "d.npz"
    path.write_bytes(b"abc")
    FileDigests()(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.npz"]


@pytest.mark.parametrize(
    "entry",
    [
        {"size": 3, "mtime_ns": None},  # no digest
        {"mtime_ns": None, "sha256": "f" * 64},  # no size
        {"size": 3, "sha256": "f" * 64},  # no time
        "f" * 64,  # not a dict
    ],
)
def test_incomplete_store_entries_are_ignored(tmp_path, entry):
    """A stored entry without size, mtime_ns and sha256 is not trusted: the file is hashed."""
    path = tmp_path / "d.npz"
    path.write_bytes(b"abc")
    st = os.stat(path)
    if isinstance(entry, dict) and "mtime_ns" in entry:
        entry = {**entry, "mtime_ns": st.st_mtime_ns}
    store = tmp_path / "digests.json"
    store.write_text(json.dumps({str(path.resolve()): entry}))
    digests = FileDigests(store)
    assert digests.last_known(path) is None
    assert digests(path) == hashlib.sha256(b"abc").hexdigest()


def test_complete_store_entry_is_trusted_and_others_kept(tmp_path):
    """A complete stored entry (extra keys allowed) is used as is for a matching size and time,
    and the other entries of the store survive the rewrite."""
    path = tmp_path / "d.npz"
    path.write_bytes(b"abc")
    st = os.stat(path)
    store = tmp_path / "digests.json"
    stored = {"size": 3, "mtime_ns": st.st_mtime_ns, "sha256": "ab" * 32, "note": 1}
    other = {"size": 1, "mtime_ns": 1, "sha256": "cd" * 32}
    store.write_text(json.dumps({str(path.resolve()): stored, "/elsewhere": other}))
    digests = FileDigests(store)
    assert digests(path) == "ab" * 32
    assert digests.last_known("/elsewhere") == "cd" * 32
    (tmp_path / "e.npz").write_bytes(b"e")
    digests(tmp_path / "e.npz")
    assert json.loads(store.read_text())["/elsewhere"] == other


@pytest.mark.parametrize("garbage", [b"[1, 2]", b'"s"', b"{not json", b"\xff\xfe"])
def test_unreadable_store_is_ignored_and_rewritten(tmp_path, garbage):
    """An unreadable store (or one that is not an object) is ignored and rewritten."""
    path = tmp_path / "d.npz"
    path.write_bytes(b"abc")
    store = tmp_path / "digests.json"
    store.write_bytes(garbage)
    digests = FileDigests(store)
    assert digests.last_known(path) is None
    assert digests(path) == hashlib.sha256(b"abc").hexdigest()
    assert str(path.resolve()) in json.loads(store.read_text())


def test_last_known_outlives_the_file(tmp_path):
    """last_known returns the digest recorded for a path whatever its size and time now, also
    after the file was moved away; None for a path never hashed."""
    path = tmp_path / "d.npz"
    path.write_bytes(b"abc")
    digests = FileDigests(tmp_path / "memo.json")
    first = digests(path)
    path.write_bytes(b"longer content")
    assert digests.last_known(path) == first
    path.unlink()
    assert digests.last_known(str(path)) == first
    assert FileDigests(tmp_path / "memo.json").last_known(path) == first
    assert digests.last_known(tmp_path / "never.npz") is None
