"""`quantcal eval --onnx / --logits` hold against bad input like `run` does: a model that is not
ONNX, one that takes other images or gives other classes, a transform that misbehaves, and
predictions that look wrong are named before (or beside) any score; a fixed batch size works."""

from __future__ import annotations

import csv
import io
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from quantcal import models
from quantcal.calibration import diagnose
from quantcal.study import evaluate
from quantcal.training import data

ort = pytest.importorskip("onnxruntime")


def _export(net: nn.Module, path, example: torch.Tensor, *, dynamic: bool = True):
    """``net`` as ONNX at ``path``; ``dynamic=False`` fixes the batch size to ``example``'s."""
    net.eval()
    buf = io.BytesIO()
    axes = {"input": {0: "n"}, "logits": {0: "n"}} if dynamic else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net, (example,), buf, dynamo=False, input_names=["input"],
            output_names=["logits"], dynamic_axes=axes,
        )  # fmt: skip
    path.write_bytes(buf.getvalue())
    return path


def _rows(out):
    with open(out / "results.csv", newline="") as fh:
        return {r["recal"]: r for r in csv.DictReader(fh)}


@pytest.fixture(scope="module")
def digits():
    return data.load_dataset("digits")


@pytest.fixture(scope="module")
def trained(digits, tmp_path_factory):
    """A small CNN trained on digits with the dataset's mean/std, exported with a dynamic
    batch; its test accuracy is well above chance."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(32, 10),
    )  # fmt: skip
    x = torch.cat([b for b, _ in digits.train.batches(2000)])
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    for _ in range(120):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), digits.train.labels).backward()
        opt.step()
    path = _export(net, tmp_path_factory.mktemp("trained") / "net.onnx", x[:2])
    return net.eval(), path


def _shufflenet(**kw):
    torch.manual_seed(0)
    args = {"num_classes": 10, "image_size": 8, "in_chans": 1, "width": 0.25, **kw}
    return models.create_model("shufflenetv2", **args).eval()


# --------------------------------------------------------------------------------------------
# 1. the file: not ONNX, not a file
# --------------------------------------------------------------------------------------------
def test_files_that_are_not_onnx_models_are_named(digits, trained, tmp_path):
    text = tmp_path / "notes.onnx"
    text.write_text("this is a text file\n")
    truncated = tmp_path / "half.onnx"
    whole = trained[1].read_bytes()
    truncated.write_bytes(whole[: len(whole) // 2])
    pt = tmp_path / "model.onnx"  # a torch checkpoint under an .onnx name
    torch.save(trained[0].state_dict(), pt)
    cases = [
        (text, "text file"),
        (truncated, "truncated"),
        (pt, "torch.save"),
        (tmp_path, "is a folder"),
        ("/dev/null", "not a regular file"),
    ]
    for path, what in cases:
        with pytest.raises(ValueError) as err:
            evaluate.load_onnx_checked(path, digits)
        msg = str(err.value)
        assert msg.startswith("--onnx: ") and str(path) in msg and what in msg, msg
        assert "Traceback" not in msg
    with pytest.raises(FileNotFoundError, match="does not exist"):
        evaluate.load_onnx_checked(tmp_path / "missing.onnx", digits)


# --------------------------------------------------------------------------------------------
# 2. the model's input and output against the dataset
# --------------------------------------------------------------------------------------------
def test_a_model_for_other_images_is_refused_with_both_shapes(digits, tmp_path):
    net = _shufflenet(image_size=32, in_chans=3)
    path = _export(net, tmp_path / "rgb32.onnx", torch.randn(1, 3, 32, 32), dynamic=False)
    with pytest.raises(ValueError) as err:
        evaluate.load_onnx_checked(path, digits)
    msg = str(err.value)
    assert "takes inputs of shape (1, 3, 32, 32) but dataset digits gives (B, 1, 8, 8)" in msg
    assert "--transform" in msg


def test_a_model_for_other_classes_is_refused_with_both_numbers(digits, tmp_path):
    path = _export(_shufflenet(num_classes=7), tmp_path / "seven.onnx", torch.randn(2, 1, 8, 8))
    with pytest.raises(ValueError, match="outputs 7 classes but dataset digits has 10 classes"):
        evaluate.load_onnx_checked(path, digits)


def test_a_model_that_does_not_take_images_is_refused(digits, tmp_path):
    path = _export(nn.Linear(64, 10), tmp_path / "flat.onnx", torch.randn(2, 64))
    with pytest.raises(ValueError, match=r"takes inputs of shape \(n, 64\)"):
        evaluate.load_onnx_checked(path, digits)


def test_a_symbolic_image_size_is_accepted(digits, tmp_path):
    net = _shufflenet()
    path = tmp_path / "anysize.onnx"
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net, (torch.randn(2, 1, 8, 8),), buf, dynamo=False, input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "n", 2: "h", 3: "w"}, "logits": {0: "n"}},
        )  # fmt: skip
    path.write_bytes(buf.getvalue())
    model = evaluate.load_onnx_checked(path, digits)
    assert model.fixed_batch is None and model.num_classes == 10


@pytest.mark.parametrize("fixed", [1, 7])
def test_a_fixed_batch_export_runs_in_chunks_and_matches_dynamic(digits, tmp_path, fixed):
    net = _shufflenet()
    dynamic = _export(net, tmp_path / "dynamic.onnx", torch.randn(2, 1, 8, 8))
    pinned = _export(net, tmp_path / "fixed.onnx", torch.randn(fixed, 1, 8, 8), dynamic=False)
    model = evaluate.load_onnx_checked(pinned, digits)
    assert model.fixed_batch == fixed and model.input_shape == (fixed, 1, 8, 8)
    got = evaluate.onnx_logits(model, digits.test)  # 360 images: 360 % 7 != 0 pads the last
    want = evaluate.onnx_logits(evaluate.load_onnx_checked(dynamic, digits), digits.test)
    assert got.shape == (len(digits.test), 10) and got.dtype == torch.float32
    assert (got - want).abs().max() <= 1e-5
    with torch.no_grad():
        ref = net(torch.cat([x for x, _ in digits.test.batches(512)]))
    assert (got - ref).abs().max() <= 1e-4


def test_a_float16_input_is_fed_float16(digits, trained, tmp_path):
    class Half(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x.float())

    path = _export(Half(trained[0]), tmp_path / "half.onnx", torch.randn(2, 1, 8, 8).half())
    model = evaluate.load_onnx_checked(path, digits)
    assert model.input_type == "tensor(float16)"
    got = evaluate.onnx_logits(model, digits.test)
    want = evaluate.onnx_logits(evaluate.load_onnx_checked(trained[1], digits), digits.test)
    assert (got - want).abs().max() <= 0.05 * want.abs().max()  # float16 inputs


# --------------------------------------------------------------------------------------------
# 3. --transform: checked on two images before anything else
# --------------------------------------------------------------------------------------------
def _bad(x):
    raise RuntimeError("no GPU here")


@pytest.mark.parametrize(
    ("fn", "said"),
    [
        (_bad, "raised RuntimeError: no GPU here"),
        (lambda x: [x.float()], "returned a list"),
        (lambda x: x.float()[:1], "returned torch.float32 (1, 1, 8, 8) for 2 images"),
        (lambda x: x.float().flatten(1), "returned torch.float32 (2, 64) for 2 images"),
        (lambda x: x.int(), "got torch.int32 (2, 1, 8, 8)"),
        (lambda x: x.numpy(), "got numpy uint8 (2, 1, 8, 8)"),
    ],
)
def test_a_transform_that_misbehaves_is_named_with_what_it_did(digits, fn, said):
    with pytest.raises(ValueError) as err:
        data.with_transform(digits, fn, "mine:prep")
    msg = str(err.value)
    assert "the transform mine:prep" in msg and said in msg, msg
    assert "(B, C, H, W)" in msg  # what is expected


def test_a_float64_or_numpy_transform_is_cast_to_float32_once(digits, capsys):
    t = data.with_transform(digits, lambda x: x.double() / 255, "mine:f64")
    err = capsys.readouterr().err
    assert err.count("casts it to float32") == 1 and "float64" in err
    x, _ = next(t.test.batches(5))
    assert x.dtype == torch.float32
    assert torch.equal(x, (digits.test.images[:5].double() / 255).float())
    t = data.with_transform(digits, lambda x: x.numpy().astype(np.float32) / 255, "mine:np")
    assert capsys.readouterr().err == ""  # float32 numpy: no cast to say
    x, _ = next(t.val.batches(3))
    assert isinstance(x, torch.Tensor) and x.dtype == torch.float32


def test_a_transform_to_the_wrong_size_is_refused_by_the_onnx_check(digits, trained):
    import torch.nn.functional as F

    def up(x):
        return F.interpolate(x.float() / 255, size=16)

    t = data.with_transform(digits, up, "mine:up")
    with pytest.raises(ValueError) as err:
        evaluate.load_onnx_checked(trained[1], t)
    msg = str(err.value)
    assert "takes inputs of shape (n, 1, 8, 8) but dataset digits gives (B, 1, 16, 16)" in msg
    assert "after --transform mine:up: check that --transform mine:up returns" in msg, msg


# --------------------------------------------------------------------------------------------
# 4. notes on the predictions
# --------------------------------------------------------------------------------------------
def _score(digits_like, path, out, **kw):
    model = evaluate.load_onnx_checked(path, digits_like)
    val = (evaluate.onnx_logits(model, digits_like.val), digits_like.val.labels)
    test = (evaluate.onnx_logits(model, digits_like.test), digits_like.test.labels)
    return evaluate.evaluate_logits(
        val, test, out, dataset="digits", model="onnx", bootstrap=0, report=False, **kw
    )


def test_wrong_preprocessing_is_noted_and_right_preprocessing_is_not(digits, trained, tmp_path):
    good = _rows(_score(digits, trained[1], tmp_path / "good"))
    assert float(good["none"]["accuracy"]) > 0.85
    assert not any("preprocessing" in r["notes"] for r in good.values())  # no false alarm
    wrong = data.with_normalization(digits, [78.0], [96.0])
    rows = _rows(_score(wrong, trained[1], tmp_path / "wrong"))
    assert all("check the preprocessing (--mean/--std or --transform)" in r["notes"] for r in
               rows.values())  # fmt: skip


def test_the_same_logits_as_val_and_test_are_noted(tmp_path):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 300)
    z = torch.from_numpy((rng.normal(size=(300, 5)) + 3 * np.eye(5)[y]).astype(np.float32))
    pair = (z, torch.from_numpy(y))
    rows = _rows(
        evaluate.evaluate_logits(
            pair, pair, tmp_path / "same", dataset="d", model="m", bootstrap=0, report=False
        )
    )
    assert all("val and test logits are identical" in r["notes"] for r in rows.values())
    other = (z[:150].clone(), pair[1][:150])
    rows = _rows(
        evaluate.evaluate_logits(
            other, pair, tmp_path / "held", dataset="d", model="m", bootstrap=0, report=False
        )
    )
    assert not any("identical" in r["notes"] for r in rows.values())


def test_prediction_notes_cover_few_images_per_class_and_extreme_temperatures():
    rng = np.random.default_rng(1)
    y = torch.from_numpy(rng.integers(0, 10, 100))
    z = torch.from_numpy(2 * rng.normal(size=(100, 10)) + 4 * np.eye(10)[y.numpy()])
    assert diagnose.prediction_notes(z, y, methods=("none", "temperature")) == []
    notes = diagnose.prediction_notes(z, y, methods=("temperature", "vector"))
    assert len(notes) == 1 and "vector fit parameters per class" in notes[0]
    assert f"fewer than {diagnose.MIN_PER_CLASS} images in val" in notes[0]
    notes = diagnose.prediction_notes(z * 50, y, temperature=40.0)
    assert any("T = 40 is extreme" in n for n in notes)


def test_broken_logits_are_refused_before_anything_is_written(tmp_path):
    z = torch.randn(50, 4)
    y = torch.randint(0, 4, (50,))
    nan = z.clone()
    nan[3, 1] = float("nan")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"VAL\.npz hold NaN or infinite values in 1 of 50 rows"):
        evaluate.evaluate_logits(
            (nan, y), (z, y), out, dataset="d", model="m", sources=("VAL.npz", "TEST.npz")
        )
    with pytest.raises(
        ValueError, match=r"labels of TEST\.npz run from 0 to 6 but the logits have 4"
    ):
        evaluate.evaluate_logits(
            (z, y), (z, y.clone().index_fill_(0, torch.tensor([0]), 6)), out, dataset="d",
            model="m", sources=("VAL.npz", "TEST.npz"),
        )  # fmt: skip
    with pytest.raises(ValueError, match=r"TEST\.npz: these look like probabilities"):
        evaluate.evaluate_logits(
            (z, y), (torch.softmax(z, 1), y), out, dataset="d", model="m",
            sources=("VAL.npz", "TEST.npz"),
        )  # fmt: skip
    assert not out.exists()


# --------------------------------------------------------------------------------------------
# 5. through the command line, where `quantcal eval` already routes it
# --------------------------------------------------------------------------------------------
_PREP = """
import torch


def boom(x):
    raise RuntimeError("expects CUDA tensors")

"""


def _eval(*args):
    from quantcal import cli

    return cli.main(["eval", *map(str, args), "--quiet"])


def test_cli_a_raising_transform_exits_2_before_anything(trained, tmp_path, capsys):
    (tmp_path / "prep.py").write_text(_PREP)
    out = tmp_path / "out"
    code = _eval("--onnx", trained[1], "--dataset", "digits", "--transform",
                 f"{tmp_path / 'prep.py'}:boom", "--out", out)  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "prep.py:boom raised RuntimeError: expects CUDA tensors" in err
    assert not out.exists()


def test_cli_a_fixed_batch_onnx_model_is_scored(digits, trained, tmp_path, capsys):
    pinned = _export(trained[0], tmp_path / "one.onnx", torch.randn(1, 1, 8, 8), dynamic=False)
    for name, path in (("fixed", pinned), ("dynamic", trained[1])):
        assert _eval("--onnx", path, "--dataset", "digits", "--recal-fit", "val", "--out",
                     tmp_path / name) == 0  # fmt: skip
    fixed, dynamic = _rows(tmp_path / "fixed"), _rows(tmp_path / "dynamic")
    for m in ("none", "temperature"):
        assert float(fixed[m]["ece"]) == pytest.approx(float(dynamic[m]["ece"]), abs=1e-6)
    assert "check the preprocessing" not in capsys.readouterr().err


def test_cli_wrong_preprocessing_and_identical_logits_are_noted(trained, tmp_path, capsys):
    out = tmp_path / "wrong"
    assert _eval("--onnx", trained[1], "--dataset", "digits", "--mean", "78", "--std", "96",
                 "--out", out) == 0  # fmt: skip
    assert "check the preprocessing (--mean/--std or --transform)" in capsys.readouterr().err
    assert all("check the preprocessing" in r["notes"] for r in _rows(out).values())
    assert "check the preprocessing" in (out / "report.html").read_text()
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 300)
    np.savez(tmp_path / "val.npz", logits=rng.normal(size=(300, 5)) + 3 * np.eye(5)[y], labels=y)
    out = tmp_path / "same"
    assert _eval("--logits", tmp_path / "val.npz", tmp_path / "val.npz", "--out", out) == 0
    assert "val and test logits are identical" in capsys.readouterr().err
    assert all("identical" in r["notes"] for r in _rows(out).values())


def test_cli_files_that_are_not_onnx_and_models_for_other_images_exit_2(
    digits, trained, tmp_path, capsys
):
    """The issue's examples through `quantcal eval --onnx`: exit 2, one line naming the file and
    what it is, no traceback, no output folder."""
    text = tmp_path / "notes.onnx"
    text.write_text("this is a text file\n")
    pt = tmp_path / "model.onnx"
    torch.save(trained[0].state_dict(), pt)
    rgb = _export(_shufflenet(image_size=32, in_chans=3), tmp_path / "rgb32.onnx",
                  torch.randn(1, 3, 32, 32), dynamic=False)  # fmt: skip
    cases = [
        (text, "text file"),
        (pt, "torch.save"),
        (rgb, "takes inputs of shape (1, 3, 32, 32) but dataset digits gives (B, 1, 8, 8)"),
    ]
    for i, (path, what) in enumerate(cases):
        out = tmp_path / f"out{i}"
        assert _eval("--onnx", path, "--dataset", "digits", "--out", out) == 2
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if "error" in line]
        assert len(errors) == 1 and errors[0].startswith("quantcal eval: error: --onnx"), err
        assert what in errors[0] and "Traceback" not in err
        assert not out.exists()
