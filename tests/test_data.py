"""quantcal.data: loaders, split disjointness, checksums, errors and batched augmentation.

Everything runs on tiny fabricated data (a CIFAR-100 archive in the official format is built
here); nothing needs the network or ../shared/data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import pickle
import tarfile

import numpy as np
import pytest
import torch

from quantcal.training import data
from quantcal.training.augment import crop_flip
from quantcal.training.data import (
    ChecksumError,
    DatasetNotFoundError,
    Source,
    Split,
    load_dataset,
    stratified_split,
)

CLASSES = 100
TRAIN_PER_CLASS = 5
TEST_PER_CLASS = 2


# ------------------------------------------------------------------------------------------
# A fabricated CIFAR-100 archive in the official layout
# ------------------------------------------------------------------------------------------
def _pickle_member(tar: tarfile.TarFile, name: str, obj: object) -> None:
    raw = pickle.dumps(obj, protocol=2)
    info = tarfile.TarInfo(f"cifar-100-python/{name}")
    info.size = len(raw)
    tar.addfile(info, io.BytesIO(raw))


@pytest.fixture(scope="module")
def cifar_archive(tmp_path_factory):
    """(path, md5, train data (N,3072), train labels, test data, test labels, names)."""
    rng = np.random.default_rng(1)
    folder = tmp_path_factory.mktemp("cifar_src")
    train_y = np.repeat(np.arange(CLASSES), TRAIN_PER_CLASS)  # sorted by class, like the npz copy
    test_y = np.repeat(np.arange(CLASSES), TEST_PER_CLASS)
    train_x = rng.integers(0, 256, (len(train_y), 3072), dtype=np.uint8)
    test_x = rng.integers(0, 256, (len(test_y), 3072), dtype=np.uint8)
    names = [f"class_{i}".encode() for i in range(CLASSES)]
    path = folder / "cifar-100-python.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        _pickle_member(
            tar,
            "train",
            {b"data": train_x, b"fine_labels": train_y.tolist(), b"coarse_labels": [0] * 500},
        )
        _pickle_member(tar, "test", {b"data": test_x, b"fine_labels": test_y.tolist()})
        _pickle_member(tar, "meta", {b"fine_label_names": names, b"coarse_label_names": []})
    md5 = hashlib.md5(path.read_bytes()).hexdigest()
    return path, md5, train_x, train_y, test_x, test_y, names


@pytest.fixture
def cifar_root(tmp_path, cifar_archive):
    """A data root holding the fabricated archive, plus the Source that describes it."""
    path, md5, *_ = cifar_archive
    root = tmp_path / "root"
    root.mkdir()
    (root / path.name).write_bytes(path.read_bytes())
    return root, Source(filename=path.name, url=path.as_uri(), md5=md5)


def _load_cifar(root, src, **kw):
    kw.setdefault("val_size", 100)
    kw.setdefault("ptq_calib_size", 100)
    return load_dataset("cifar100", root=root, source=src, download=False, **kw)


def _assert_disjoint(splits):
    """ptq_calib, val, test pairwise disjoint; neither ptq_calib nor val overlaps train."""
    positions = {name: {(s.source, int(i)) for i in s.indices} for name, s in splits.items()}
    for name, split in splits.items():
        assert len(positions[name]) == len(split), f"{name} repeats a sample"
    for a, b in [
        ("ptq_calib", "val"),
        ("ptq_calib", "test"),
        ("val", "test"),
        ("ptq_calib", "train"),
        ("val", "train"),
        ("test", "train"),
    ]:
        assert not positions[a] & positions[b], f"{a} overlaps {b}"


def test_cifar100_archive_parses_into_disjoint_stratified_splits(cifar_root, cifar_archive):
    root, src = cifar_root
    _, _, train_x, train_y, test_x, test_y, names = cifar_archive
    s = _load_cifar(root, src)
    assert (len(s.train), len(s.ptq_calib), len(s.val), len(s.test)) == (300, 100, 100, 200)
    assert (s.num_classes, s.image_size, s.channels) == (100, 32, 3)
    assert s.class_names == tuple(n.decode() for n in names)
    assert s.mean == data.CIFAR100_MEAN and s.std == data.CIFAR100_STD
    _assert_disjoint(dict(s.items()))
    # train + val + ptq_calib partition the official train set; test is the official test set
    carved = torch.cat([s.train.indices, s.val.indices, s.ptq_calib.indices])
    assert sorted(carved.tolist()) == list(range(len(train_y)))
    assert s.test.source == "test" and s.test.indices.tolist() == list(range(len(test_y)))
    # images and labels are the archive's rows, CHW-reshaped, at the recorded positions
    for split, (xs, ys) in [(s.train, (train_x, train_y)), (s.test, (test_x, test_y))]:
        idx = split.indices.numpy()
        np.testing.assert_array_equal(split.images.numpy(), xs[idx].reshape(-1, 3, 32, 32))
        np.testing.assert_array_equal(split.labels.numpy(), ys[idx])
        assert split.images.dtype == torch.uint8 and split.images.is_contiguous()
        assert split.labels.dtype == torch.int64
    # stratified: 100 of 500 over 100 equal classes = exactly one per class
    assert np.bincount(s.val.labels.numpy(), minlength=100).tolist() == [1] * 100
    assert np.bincount(s.ptq_calib.labels.numpy(), minlength=100).tolist() == [1] * 100
    # shuffled although the source is sorted by class
    assert not np.all(np.diff(s.val.labels.numpy()) >= 0)


def test_cifar100_split_is_seeded(cifar_root):
    root, src = cifar_root
    a, b, c = (_load_cifar(root, src, seed=k) for k in (0, 0, 1))
    assert torch.equal(a.val.indices, b.val.indices)
    assert torch.equal(a.ptq_calib.indices, b.ptq_calib.indices)
    assert not torch.equal(a.val.indices, c.val.indices)


def test_cifar100_sizes_too_large_are_rejected(cifar_root):
    root, src = cifar_root
    with pytest.raises(ValueError, match=r"cannot carve 5000 samples out of a pool of 500"):
        load_dataset("cifar100", root=root, source=src, download=False)  # default val 5,000


def test_wrong_checksum_leaves_the_file_and_says_so(cifar_root):
    root, src = cifar_root
    path = root / src.filename
    before = path.read_bytes()
    bad = dataclasses.replace(src, md5="0" * 32)
    with pytest.raises(ChecksumError) as err:
        _load_cifar(root, bad)
    msg = str(err.value)
    assert str(path) in msg and "0" * 32 in msg and src.md5 in msg
    assert "left in place" in msg and "quantcal data download cifar100" in msg
    assert path.read_bytes() == before  # not deleted, not modified
    with pytest.raises(ChecksumError):
        data.download("cifar100", root, source=bad, progress=False)
    assert path.read_bytes() == before


def test_wrong_checksum_is_checked_before_unpickling(cifar_root, monkeypatch):
    root, src = cifar_root

    def boom(*args, **kwargs):
        raise AssertionError("pickle.load was reached before the md5 check")

    monkeypatch.setattr(pickle, "load", boom)
    with pytest.raises(ChecksumError):
        _load_cifar(root, dataclasses.replace(src, md5="f" * 32))


def test_offline_missing_file_names_everything_needed(tmp_path):
    empty = tmp_path / "nothing_here"
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset("cifar100", root=empty, download=False)
    msg = str(err.value)
    official = data.SOURCES["cifar100"]
    for needle in (
        official.filename,
        str(empty),
        official.url,
        official.md5,
        "quantcal data download cifar100",
    ):
        assert needle in msg
    assert isinstance(err.value, FileNotFoundError)


def test_failed_download_raises_not_found_and_leaves_no_partial_file(tmp_path):
    src = Source("pathmnist.npz", (tmp_path / "absent.npz").as_uri(), "a" * 32)
    root = tmp_path / "root"
    with pytest.raises(DatasetNotFoundError, match="downloading it failed") as err:
        load_dataset("pathmnist", root=root, source=src)
    assert src.url in str(err.value)
    assert not root.exists() or list(root.iterdir()) == []


def test_download_streams_verifies_and_renames(tmp_path, cifar_archive):
    path, md5, *_ = cifar_archive
    root = tmp_path / "dl"
    src = Source(path.name, path.as_uri(), md5)
    got = data.download("cifar100", root, source=src, progress=False)
    assert got == root / path.name and got.read_bytes() == path.read_bytes()
    assert sorted(p.name for p in root.iterdir()) == [path.name]  # no temp file left
    assert _load_cifar(root, src).num_classes == 100
    # a download whose bytes do not match is discarded, nothing lands at the final name
    root2 = tmp_path / "dl2"
    with pytest.raises(ChecksumError, match="discarded"):
        data.download("cifar100", root2, source=dataclasses.replace(src, md5="1" * 32))
    assert list(root2.iterdir()) == []


def test_download_rejects_datasets_without_a_file(tmp_path):
    with pytest.raises(ValueError, match="scikit-learn"):
        data.download("digits", tmp_path)


def test_data_root_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("QUANTCAL_DATA", raising=False)
    assert data.data_root() == tmp_path / "xdg" / "quantcal"
    monkeypatch.setenv("QUANTCAL_DATA", str(tmp_path / "env"))
    assert data.data_root() == tmp_path / "env"
    assert data.data_root(tmp_path / "arg") == tmp_path / "arg"


# ------------------------------------------------------------------------------------------
# npz and digits
# ------------------------------------------------------------------------------------------
def _write_npz(path, *, n=120, classes=4, size=8, channels=3, label_2d=True, parts=("train",)):
    rng = np.random.default_rng(2)
    arrays = {}
    for part in parts:
        labels = np.sort(rng.integers(0, classes, n)).astype(np.uint8)  # sorted by class
        shape = (n, size, size, channels) if channels else (n, size, size)
        arrays[f"{part}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        arrays[f"{part}_labels"] = labels[:, None] if label_2d else labels
    np.savez(path, **arrays)
    return arrays


@pytest.mark.parametrize("label_2d", [True, False])
def test_npz_with_official_splits(tmp_path, label_2d):
    path = tmp_path / "med.npz"
    arrays = _write_npz(path, label_2d=label_2d, parts=("train", "val", "test"))
    s = load_dataset(f"npz:{path}", ptq_calib_size=10)
    assert (len(s.train), len(s.ptq_calib), len(s.val), len(s.test)) == (110, 10, 120, 120)
    assert s.notes == () and (s.channels, s.image_size, s.num_classes) == (3, 8, 4)
    assert s.val.source == "val" and s.test.source == "test"
    np.testing.assert_array_equal(
        s.test.images.numpy(), arrays["test_images"].transpose(0, 3, 1, 2)
    )
    np.testing.assert_array_equal(s.test.labels.numpy(), arrays["test_labels"].reshape(-1))
    _assert_disjoint(dict(s.items()))
    # mean/std are computed from the final train split (numpy reference, float64)
    train_pixels = arrays["train_images"][s.train.indices.numpy()].astype(np.float64) / 255
    np.testing.assert_allclose(s.mean, train_pixels.mean(axis=(0, 1, 2)), rtol=1e-12)
    np.testing.assert_allclose(s.std, train_pixels.std(axis=(0, 1, 2)), rtol=1e-9)


def test_npz_without_val_and_test_holds_them_out_and_says_so(tmp_path):
    path = tmp_path / "train_only.npz"
    _write_npz(path, n=200, channels=0)  # grey (N, H, W)
    s = load_dataset(f"npz:{path}")
    assert (len(s.test), len(s.val), len(s.ptq_calib), len(s.train)) == (40, 20, 4, 136)
    assert s.channels == 1 and s.train.images.shape[1:] == (1, 8, 8)
    assert any("no test split" in n for n in s.notes) and any("no val split" in n for n in s.notes)
    assert {sp.source for _, sp in s.items()} == {"train"}
    _assert_disjoint(dict(s.items()))
    assert sorted(torch.cat([sp.indices for _, sp in s.items()]).tolist()) == list(range(200))


def test_npz_errors_are_clear(tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, images=np.zeros((3, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="MedMNIST npz layout"):
        load_dataset(f"npz:{bad}")
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        load_dataset(f"npz:{tmp_path / 'missing.npz'}")
    wrong = tmp_path / "float.npz"
    np.savez(wrong, train_images=np.zeros((3, 4, 4), np.float32), train_labels=np.zeros(3))
    with pytest.raises(ValueError, match="uint8"):
        load_dataset(f"npz:{wrong}")
    with pytest.raises(ValueError, match="needs a file path"):
        load_dataset("npz:")


@pytest.mark.skipif(
    not os.path.exists("/work/shared/data/pathmnist_train_first1000.npz"),
    reason="shared data copy not present",
)
def test_shared_pathmnist_excerpt_loads_as_npz():
    s = load_dataset("npz:/work/shared/data/pathmnist_train_first1000.npz")
    assert (s.channels, s.image_size) == (3, 28) and len(s.test) == 200
    _assert_disjoint(dict(s.items()))


def test_digits_splits():
    s = load_dataset("digits")
    assert (len(s.train), len(s.ptq_calib), len(s.val), len(s.test)) == (1157, 100, 180, 360)
    assert (s.num_classes, s.image_size, s.channels) == (10, 8, 1)
    assert s.train.images.max() == 255 and s.train.images.min() == 0
    _assert_disjoint(dict(s.items()))
    # stratified: each class's share of the test set is within one image of proportional
    from sklearn.datasets import load_digits

    full = np.bincount(load_digits().target, minlength=10)
    test = np.bincount(s.test.labels.numpy(), minlength=10)
    assert np.all(np.abs(test - full * 360 / 1797) < 1)


def test_registry_and_unknown_names():
    assert {"cifar100", "pathmnist", "digits"} <= set(data.list_datasets())
    with pytest.raises(ValueError, match="Did you mean 'cifar100'"):
        load_dataset("cifar10")


# ------------------------------------------------------------------------------------------
# Stratified carving
# ------------------------------------------------------------------------------------------
def test_stratified_split_sizes_and_proportions():
    labels = np.array([0] * 50 + [1] * 30 + [2] * 20)
    rng = np.random.default_rng(0)
    taken, rest = stratified_split(labels, np.arange(100), 10, rng)
    assert len(taken) == 10 and len(rest) == 90
    assert np.bincount(labels[taken], minlength=3).tolist() == [5, 3, 2]
    assert sorted(np.concatenate([taken, rest]).tolist()) == list(range(100))
    # largest remainder: 7 of (50, 30, 20) -> quotas 3.5, 2.1, 1.4 -> 3 or 4, 2, 1 or 2
    taken7, _ = stratified_split(labels, np.arange(100), 7, rng)
    counts = np.bincount(labels[taken7], minlength=3)
    assert counts.sum() == 7 and np.all(np.abs(counts - np.array([3.5, 2.1, 1.4])) < 1)
    for bad in (0, 100, 101):
        with pytest.raises(ValueError, match="cannot carve"):
            stratified_split(labels, np.arange(100), bad, rng)


# ------------------------------------------------------------------------------------------
# Split and batches
# ------------------------------------------------------------------------------------------
def _tiny_split(n=10, c=3, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, c, size, size), dtype=torch.uint8, generator=g)
    return Split(
        images=images,
        labels=torch.arange(n, dtype=torch.int64) % 3,
        mean=(0.4, 0.5, 0.6)[:c],
        std=(0.2, 0.25, 0.3)[:c],
        indices=torch.arange(n, dtype=torch.int64),
    )


def _np_normalize(img_u8, mean, std):
    m = np.asarray(mean).reshape(-1, 1, 1)
    s = np.asarray(std).reshape(-1, 1, 1)
    return (img_u8.astype(np.float64) / 255.0 - m) / s


def test_eval_batches_are_ordered_normalised_and_complete():
    split = _tiny_split(n=10)
    got = list(split.batches(4))
    assert [len(y) for _, y in got] == [4, 4, 2]
    x = torch.cat([b for b, _ in got])
    y = torch.cat([b for _, b in got])
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(y, split.labels)
    ref = np.stack([_np_normalize(im, split.mean, split.std) for im in split.images.numpy()])
    np.testing.assert_allclose(x.numpy(), ref, rtol=1e-5, atol=1e-5)
    assert [len(y) for _, y in split.batches(4, drop_last=True)] == [4, 4]
    again = torch.cat([b for b, _ in split.batches(3)])
    assert torch.equal(x, again)
    np.testing.assert_allclose(split.normalize(split.images).numpy(), ref, rtol=1e-5, atol=1e-5)


def test_batches_cache_the_split_per_device():
    split = _tiny_split()
    list(split.batches(5))
    first = split._cache[torch.device("cpu")][0]
    list(split.batches(5, shuffle=True, epoch=3))
    assert split._cache[torch.device("cpu")][0] is first and len(split._cache) == 1


def _np_crop_flip(img, dy, dx, flip, pad):
    c, h, w = img.shape
    padded = np.zeros((c, h + 2 * pad, w + 2 * pad), img.dtype)
    padded[:, pad : pad + h, pad : pad + w] = img
    out = padded[:, dy : dy + h, dx : dx + w]
    return out[:, :, ::-1] if flip else out


@pytest.mark.parametrize("size,pad", [(32, 4), (28, 4), (8, 1), (5, 3), (6, 0)])
def test_crop_flip_matches_per_sample_numpy(size, pad):
    g = torch.Generator().manual_seed(size)
    x = torch.randint(0, 256, (9, 3, size, size), dtype=torch.uint8, generator=g)
    dy = torch.randint(0, 2 * pad + 1, (9,), generator=g)
    dx = torch.randint(0, 2 * pad + 1, (9,), generator=g)
    flip = torch.randint(0, 2, (9,), generator=g).bool()
    got = crop_flip(x, dy, dx, flip, pad)
    assert got.dtype == torch.uint8 and got.shape == x.shape
    for i in range(9):
        ref = _np_crop_flip(x[i].numpy(), int(dy[i]), int(dx[i]), bool(flip[i]), pad)
        np.testing.assert_array_equal(got[i].numpy(), ref)


def test_augmented_batches_are_crops_and_flips_of_the_right_images():
    split = _tiny_split(n=24, size=6)
    pad = 2
    x, y = next(split.batches(24, shuffle=True, augment=True, seed=5, pad=pad))
    assert x.shape == (24, 3, 6, 6) and x.dtype == torch.float32
    # every (source, dy, dx, flip) candidate, built per sample in numpy and normalised in float64
    keys, cands = [], []
    for j, img in enumerate(split.images.numpy()):
        for dy in range(2 * pad + 1):
            for dx in range(2 * pad + 1):
                for f in (False, True):
                    keys.append((j, dy, dx, f))
                    cands.append(
                        _np_normalize(_np_crop_flip(img, dy, dx, f, pad), split.mean, split.std)
                    )
    cands = np.stack(cands)
    black = np.array([-m / s for m, s in zip(split.mean, split.std)]).reshape(3, 1, 1)
    flips = set()
    for i in range(24):
        err = np.abs(cands - x[i].numpy()[None]).reshape(len(keys), -1).max(axis=1)
        matches = [keys[k] for k in np.flatnonzero(err < 1e-5)]
        assert matches, f"augmented image {i} is no crop/flip of any source image"
        assert all(split.labels[j] == y[i] for j, *_ in matches)
        flips.update(f for *_, f in matches)
        _, dy, _, _ = matches[0]
        if dy == 0:  # the top rows came from padding: the normalised value of black
            np.testing.assert_allclose(
                x[i, :, :pad].numpy(), np.broadcast_to(black, (3, pad, 6)), atol=1e-5
            )
    assert flips == {False, True}


def test_augmentation_is_deterministic_per_seed_and_epoch():
    split = _tiny_split(n=16)

    def run(**kw):
        return torch.cat([b for b, _ in split.batches(5, shuffle=True, augment=True, **kw)])

    a, b = run(seed=1, epoch=2), run(seed=1, epoch=2)
    assert torch.equal(a, b)
    assert not torch.equal(a, run(seed=1, epoch=3))
    no_flip = torch.cat([b for b, _ in split.batches(16, augment=True, pad=0, flip=False, seed=1)])
    assert torch.equal(no_flip, torch.cat([b for b, _ in split.batches(16)]))


@pytest.mark.parametrize("world_size", [2, 3])
def test_rank_shards_are_disjoint_equal_and_world_size_independent(world_size):
    split = _tiny_split(n=20)
    split = dataclasses.replace(split, labels=torch.arange(20, dtype=torch.int64))  # label = id
    kw = dict(shuffle=True, augment=True, seed=3, epoch=1)
    shards, images = [], []
    for rank in range(world_size):
        got = list(split.batches(4, rank=rank, world_size=world_size, **kw))
        shards.append(torch.cat([y for _, y in got]))
        images.append(torch.cat([x for x, _ in got]))
    per = 20 // world_size
    assert all(len(s) == per for s in shards)
    ids = torch.cat(shards).tolist()
    assert len(set(ids)) == len(ids) == per * world_size
    # the shards interleave one shared permutation; augmentation follows the sample's position
    full = list(split.batches(20, **kw))
    x_all, order = full[0]
    for rank in range(world_size):
        positions = list(range(rank, per * world_size, world_size))
        assert shards[rank].tolist() == order[positions].tolist()
        assert torch.equal(images[rank], x_all[positions])


def test_batches_validate_arguments():
    split = _tiny_split()
    with pytest.raises(ValueError, match="batch_size"):
        split.batches(0)
    with pytest.raises(ValueError, match="rank"):
        split.batches(2, rank=2, world_size=2)
    with pytest.raises(TypeError, match="pad"):
        split.batches(2, pad=1.5)


def test_split_validates_its_fields():
    good = _tiny_split()
    with pytest.raises(ValueError, match="uint8"):
        dataclasses.replace(good, images=good.images.float())
    with pytest.raises(ValueError, match="labels"):
        dataclasses.replace(good, labels=good.labels[:3])
    with pytest.raises(ValueError, match="one per channel"):
        dataclasses.replace(good, mean=(0.5,))
    strided = dataclasses.replace(good, images=good.images.permute(0, 1, 3, 2))
    assert strided.images.is_contiguous()


def test_normalize_validates_inputs():
    with pytest.raises(ValueError, match="uint8"):
        data.normalize(torch.zeros(1, 3, 2, 2), (0.5,) * 3, (0.5,) * 3)
    with pytest.raises(ValueError, match="one per channel"):
        data.normalize(torch.zeros(1, 3, 2, 2, dtype=torch.uint8), (0.5,), (0.5,))


def test_with_transform_feeds_the_models_own_preprocessing():
    import torch.nn.functional as F

    splits = data.load_dataset("digits")

    def resize(x):
        return F.interpolate(x.float() / 255, size=16, mode="nearest")

    t = data.with_transform(splits, resize, "mine:resize")
    assert (t.image_size, t.channels, t.transform_name) == (16, 1, "mine:resize")
    x, y = next(t.test.batches(7))
    assert torch.equal(x, resize(splits.test.images[:7]))
    assert torch.equal(y, splits.test.labels[:7])
    assert torch.equal(t.val.normalize(splits.val.images[:3]), resize(splits.val.images[:3]))
    # augmentation happens on the uint8 images, before the transform
    xa, _ = next(t.train.batches(5, augment=True, seed=3))
    xr, _ = next(splits.train.batches(5, augment=True, seed=3))
    raw = xr * torch.tensor(splits.std).view(1, -1, 1, 1) + torch.tensor(splits.mean).view(
        1, -1, 1, 1
    )
    assert torch.allclose(xa, F.interpolate(raw, size=16, mode="nearest"), atol=1e-5)
    with pytest.raises(TypeError, match=r"must return a float tensor.*got torch.uint8"):
        data.with_transform(splits, lambda x: x, "bad:identity")
    with pytest.raises(TypeError, match="not callable"):
        data.with_transform(splits, "nope", "bad:str")


def test_export_npz_writes_the_archive_in_the_medmnist_layout(cifar_root, cifar_archive, tmp_path):
    """``quantcal data export cifar100 FILE.npz``: the README's cifar100.npz, made from the
    verified archive; ``npz:FILE`` then reads the same images and labels."""
    root, src = cifar_root
    _, _, train_x, train_y, _, test_y, _ = cifar_archive
    out = data.export_npz("cifar100", tmp_path / "c100.npz", root=root, source=src)
    with np.load(out, allow_pickle=False) as z:
        assert sorted(z.files) == ["test_images", "test_labels", "train_images", "train_labels"]
        assert z["train_images"].shape == (len(train_y), 32, 32, 3)
        np.testing.assert_array_equal(
            z["train_images"], train_x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        )
        np.testing.assert_array_equal(z["test_labels"], test_y)
    splits = data.load_dataset(f"npz:{out}", val_size=100, ptq_calib_size=50)
    assert splits.num_classes == CLASSES and len(splits.test) == len(test_y)
    with pytest.raises(ValueError, match="only cifar100"):
        data.export_npz("digits", tmp_path / "d.npz")


def test_export_refuses_to_replace_a_file_and_needs_the_archive(tmp_path, capsys):
    from quantcal import cli

    existing = tmp_path / "mine.npz"
    existing.write_bytes(b"keep")
    assert cli.main(["data", "export", "cifar100", str(existing)]) == 2
    assert "--force" in capsys.readouterr().err and existing.read_bytes() == b"keep"
    empty = tmp_path / "empty_root"
    empty.mkdir()
    code = cli.main(["data", "export", "cifar100", str(tmp_path / "c.npz"), "--root", str(empty)])
    assert code == 2 and "not in" in capsys.readouterr().err
    assert not (tmp_path / "c.npz").exists()
