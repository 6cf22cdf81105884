"""quantcal eval on predictions that already exist: an int8 ONNX model made by onnxruntime's
quantize_static, and logits saved as arrays. Their ECE equals metrics.ece on the same logits."""

from __future__ import annotations

import csv
import io
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from quantcal import cli
from quantcal.calibration import metrics
from quantcal.training import data

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


def _rows(out):
    with open(out / "results.csv", newline="") as fh:
        return {r["recal"]: r for r in csv.DictReader(fh)}


@pytest.fixture(scope="module")
def int8_onnx(tmp_path_factory):
    """A small CNN trained on quantcal's digits splits, exported to ONNX (fp32) and quantized
    by onnxruntime.quantization.quantize_static (QDQ, int8) on training images."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    folder = tmp_path_factory.mktemp("onnx")
    splits = data.load_dataset("digits")
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(32, 10),
    )  # fmt: skip
    x = torch.cat([b for b, _ in splits.train.batches(2000)])
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    for _ in range(120):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), splits.train.labels).backward()
        opt.step()
    net.eval()
    fp32 = folder / "fp32.onnx"
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                net, (x[:2],), buf, dynamo=False, input_names=["input"],
                output_names=["logits"], dynamic_axes={"input": {0: "n"}, "logits": {0: "n"}},
            )  # fmt: skip
            fp32.write_bytes(buf.getvalue())
        except Exception:  # a torch without the TorchScript exporter
            program = torch.onnx.export(
                net, (x[:2],), dynamo=True, input_names=["input"],
                dynamic_shapes=({0: torch.export.Dim("n", min=1)},),
            )  # fmt: skip
            fp32.write_bytes(program.model_proto.SerializeToString())

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"input": x[i : i + 100].numpy()} for i in range(0, 300, 100)])

        def get_next(self):
            return next(self.batches, None)

    int8 = folder / "int8.onnx"
    quantize_static(str(fp32), str(int8), Reader(), quant_format=QuantFormat.QDQ)
    return int8, splits


def test_eval_onnx_int8_model(int8_onnx, tmp_path, capsys):
    path, splits = int8_onnx
    out = tmp_path / "run"
    args = ["eval", "--onnx", str(path), "--dataset", "digits", "--recal", "none,temperature"]
    assert cli.main([*args, "--recal-fit", "val", "--out", str(out), "--quiet"]) == 0
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    xs = torch.cat([b for b, _ in splits.test.batches(512)]).numpy()
    logits = torch.from_numpy(session.run(None, {"input": xs})[0])
    rows = _rows(out)
    assert float(rows["none"]["ece"]) == pytest.approx(
        metrics.ece(logits, splits.test.labels), abs=1e-9
    )
    assert float(rows["none"]["accuracy"]) > 0.85
    assert (out / "report.html").is_file()
    # auto: a model trained elsewhere with val held out of train is cross-fitted, and says so
    assert cli.main([*args, "--out", str(tmp_path / "auto"), "--quiet"]) == 0
    auto = _rows(tmp_path / "auto")
    assert auto["temperature"]["recal_fit"] == "test_crossfit"
    assert "cross-fitted" in auto["temperature"]["notes"]


def test_eval_saved_logits(tmp_path):
    rng = np.random.default_rng(0)
    files = []
    for name, n in (("val", 400), ("test", 800)):
        y = rng.integers(0, 7, n)
        z = (rng.normal(size=(n, 7)) * 2 + 3 * np.eye(7)[y]).astype(np.float32)
        np.savez(tmp_path / f"{name}.npz", logits=z, labels=y)
        files.append((z, y))
    out = tmp_path / "run"
    code = cli.main(
        ["eval", "--logits", str(tmp_path / "val.npz"), str(tmp_path / "test.npz"), "--out",
         str(out), "--recal", "none,temperature,histogram", "--quiet"]
    )  # fmt: skip
    assert code == 0
    rows = _rows(out)
    z, y = files[1]
    assert float(rows["none"]["ece"]) == pytest.approx(metrics.ece(z, y), abs=1e-9)
    from quantcal.calibration import recal

    ts = recal.TemperatureScaling().fit(files[0][0], files[0][1])
    assert float(rows["temperature"]["ece"]) == pytest.approx(
        metrics.ece(ts(torch.from_numpy(z)), y), abs=1e-9
    )
    assert set(rows) == {"none", "temperature", "histogram"}
    assert (out / "report.html").is_file()


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ({"scores": np.zeros((3, 2))}, "needs arrays 'logits'"),
        ({"logits": np.zeros(3), "labels": np.zeros(3, int)}, r"shape \(N, C\)"),
        ({"logits": np.zeros((3, 2)), "labels": np.zeros(4, int)}, "labels must be integers"),
    ],
)
def test_bad_logits_files_exit_2(tmp_path, capsys, content, match):
    np.savez(tmp_path / "bad.npz", **content)
    code = cli.main(
        ["eval", "--logits", str(tmp_path / "bad.npz"), str(tmp_path / "bad.npz"), "--out",
         str(tmp_path / "r")]
    )  # fmt: skip
    assert code == 2
    assert match.replace("\\", "") in capsys.readouterr().err.replace("\\", "")
