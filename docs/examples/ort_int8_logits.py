"""Logits from another runtime: the README's "bring your own logits" example.

    python docs/examples/digits_cnn.py                  # the fp32 model (digits_cnn.pt)
    python docs/examples/ort_int8_logits.py             # fp32 and ONNX Runtime int8 logits
    quantcal eval --logits fp32_val.npz fp32_test.npz \\
        --quantized ort_int8 int8_val.npz int8_test.npz --out runs/ort

The model is exported to ONNX and quantized by ONNX Runtime's own ``quantize_static`` (QDQ,
per-channel int8 weights, uint8 activations calibrated on 100 training images), then both models
are run by ONNX Runtime on quantcal's digits val and test images. quantcal sees only the logits.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch


def main(checkpoint: str = "digits_cnn.pt") -> None:
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantType, quantize_static

    from quantcal.training import data

    sys.path.insert(0, str(Path(__file__).parent))
    from digits_cnn import build

    splits = data.with_normalization(data.load_dataset("digits"), [0.0], [1.0])  # x / 255
    net = build(10, 1)
    net.load_state_dict(torch.load(checkpoint, weights_only=True))
    net.eval()
    x = {
        name: torch.cat([b for b, _ in getattr(splits, name).batches(512)]).numpy()
        for name in ("train", "val", "test")
    }
    torch.onnx.export(
        net,
        torch.from_numpy(x["val"][:1]),
        "digits_cnn.onnx",
        input_names=["x"],
        output_names=["logits"],
        dynamic_axes={"x": {0: "n"}},
        dynamo=False,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{"x": x["train"][i : i + 1]} for i in range(100)])

        def get_next(self):
            return next(self.items, None)

    quantize_static(
        "digits_cnn.onnx",
        "digits_cnn_int8.onnx",
        Reader(),
        per_channel=True,
        weight_type=QuantType.QInt8,
        activation_type=QuantType.QUInt8,
    )
    for tag, model in (("fp32", "digits_cnn.onnx"), ("int8", "digits_cnn_int8.onnx")):
        session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
        for split in ("val", "test"):
            logits = session.run(None, {"x": x[split]})[0]
            labels = getattr(splits, split).labels.numpy()
            np.savez(f"{tag}_{split}.npz", logits=logits, labels=labels)
            print(
                f"{tag}_{split}.npz: {logits.shape[0]} images, accuracy "
                f"{100 * float((logits.argmax(1) == labels).mean()):.1f} %"
            )


if __name__ == "__main__":
    main(*sys.argv[1:])
