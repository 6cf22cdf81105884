"""Cache keys pinned (issue #24): existing run folders resume without recomputing.

Each value was computed by quantcal before the study became a pipeline of stages (commit 889a855,
``quantcal.study`` as one module). A change to a key function, a stage version, the result
columns or the canonical JSON of a config recomputes every run folder: if that is meant, bump
the stage's version in ``quantcal.study.keys`` and update these pins in the same commit.
The row keys changed once since, on purpose: rows v4 (issue #25, the selective-prediction,
threshold-transfer and shift columns); train, logits and attribution keys are as pinned then.
"""

from __future__ import annotations

from quantcal import study
from quantcal.study import keys
from quantcal.study.config import from_toml_dict

PINNED = {
    "train seed 0": "bc843780a23381df",
    "train-norm seed 0": "7a82661752ee5fe5",
    "logits seed 0 fp32": "3a8cccf4a1037333",
    "logits seed 0 W8A8 minmax sample 0": "a6716d7339a47068",
    "logits seed 0 W8A8 minmax sample 0 qat": "d99827192f67bc23",
    "logits seed 0 W8A8 minmax sample 1": "1653f18358062508",
    "logits seed 0 W8A8 minmax sample 1 qat": "2fa8bb92f5120473",
    "logits seed 0 W8A8 mse sample 0": "c9ea3cc5dca703c4",
    "logits seed 0 W8A8 mse sample 0 qat": "abc97ec370c6a095",
    "logits seed 0 W8A8 mse sample 1": "b9938776c5cdb2cc",
    "logits seed 0 W8A8 mse sample 1 qat": "e567285c769eb6ba",
    "logits seed 0 W4A4 minmax sample 0": "4e74cdb292681c1d",
    "logits seed 0 W4A4 minmax sample 0 qat": "c93595328a8005eb",
    "logits seed 0 W4A4 minmax sample 1": "658d80fc71048611",
    "logits seed 0 W4A4 minmax sample 1 qat": "851510a62c23d996",
    "logits seed 0 W4A4 mse sample 0": "112763c6c5456b11",
    "logits seed 0 W4A4 mse sample 0 qat": "594adc8e5b88333e",
    "logits seed 0 W4A4 mse sample 1": "77b573b0d34c12da",
    "logits seed 0 W4A4 mse sample 1 qat": "823d334d705ef904",
    "logits seed 0 plan:calib minmax sample 0": "39a206477ba4e51f",
    "logits seed 0 plan:accuracy minmax sample 0": "7107def72801151d",
    "row seed 0": "adfd51ebd55022f2",
    "row-crossfit seed 0": "689c8b3d1d1782b6",
    "attribution seed 0": "97252df4b9491606",
    "attribution-half seed 0": "456175ee1f57a0e2",
    "pending seed 0": "err-daad792d0b29a657",
    "train ls seed 0": "cc46f9c98014797d",
    "train-norm ls seed 0": "04f0a1d5181c9aac",
    "logits ls seed 0 fp32": "7b5877b7a6c87060",
    "logits ls seed 0 W8A8 minmax sample 0": "1f0862a3697f2ca7",
    "logits ls seed 0 W8A8 minmax sample 0 qat": "811e92bb68324cfa",
    "logits ls seed 0 W8A8 minmax sample 1": "f6f172b87dc1d87f",
    "logits ls seed 0 W8A8 minmax sample 1 qat": "18995a306ba639e9",
    "logits ls seed 0 W8A8 mse sample 0": "b3cd77ae61b5e760",
    "logits ls seed 0 W8A8 mse sample 0 qat": "4fb5727f6ce102b9",
    "logits ls seed 0 W8A8 mse sample 1": "aa0703899796bf99",
    "logits ls seed 0 W8A8 mse sample 1 qat": "ffddc9d1931960fb",
    "logits ls seed 0 W4A4 minmax sample 0": "3efcccdc99f3dc85",
    "logits ls seed 0 W4A4 minmax sample 0 qat": "4d85226c8d719a69",
    "logits ls seed 0 W4A4 minmax sample 1": "a2117e5546fd015d",
    "logits ls seed 0 W4A4 minmax sample 1 qat": "ed0dbfa23edcb2a0",
    "logits ls seed 0 W4A4 mse sample 0": "eb45d18a5a4986a6",
    "logits ls seed 0 W4A4 mse sample 0 qat": "dfc4241a628a48e7",
    "logits ls seed 0 W4A4 mse sample 1": "98a99e51c9229880",
    "logits ls seed 0 W4A4 mse sample 1 qat": "b5bf304f7923d41e",
    "logits ls seed 0 plan:calib minmax sample 0": "bc1f096031c9c032",
    "logits ls seed 0 plan:accuracy minmax sample 0": "878db60a969a7c76",
    "row ls seed 0": "862b2ea43fa76329",
    "row-crossfit ls seed 0": "6b7f7466b53e810a",
    "attribution ls seed 0": "4b9f67bfd1439d5a",
    "attribution-half ls seed 0": "2ca33b6d6bbc5f73",
    "pending ls seed 0": "err-cc9da5331707ddb8",
}


def _keys() -> dict[str, str]:
    cfg = from_toml_dict(
        {
            "name": "pins",
            "seeds": [0],
            "data": {"datasets": ["digits"]},
            "model": [{"arch": "resnet20", "width": 0.25}],
            "train": {
                "epochs": 2,
                "batch_size": 64,
                "lr": 0.1,
                "schedule": "cosine",
                "objectives": ["ce", {"name": "label_smoothing", "epsilon": 0.1}],
            },
            "quant": {
                "precisions": ["fp32", "W8A8", "W4A4"],
                "observers": ["minmax", "mse"],
                "ptq_calib_samples": 2,
                "methods": ["ptq", "qat"],
                "method_options": {"qat": {"epochs": 1}},
                "plans": True,
                "attribution": {"granularity": "layer", "samples": 90},
            },
            "recal": {"methods": ["none", "temperature"]},
            "metrics": {"bootstrap": 50},
        }
    )
    out = {}
    for g, cells in study.expand_cells(cfg):
        label = "seed 0" if g.objective == "ce" else "ls seed 0"
        t = keys.train_key(cfg, g, "sha256:abc")
        out[f"train {label}"] = t
        out[f"train-norm {label}"] = keys.train_key(
            cfg, g, "sha256:abc", None, ((0.5,), (0.25,)), "tf sha256:1"
        )
        for c in cells:
            lk = keys.logits_key(cfg, c, t)
            out[f"logits {label} {c.precision}{c.where}"] = lk
        fk = keys.logits_key(cfg, cells[0], t)
        out[f"row {label}"] = keys.row_key(cfg, lk, fk, "temperature")
        out[f"row-crossfit {label}"] = keys.row_key(cfg, lk, fk, "none", "test_crossfit")
        out[f"attribution {label}"] = keys.attribution_key(cfg, lk)
        out[f"attribution-half {label}"] = keys.attribution_key(cfg, lk, "test_half")
        out[f"pending {label}"] = keys.pending_key(cells[-3], "temperature")
    return out


def test_cache_keys_are_those_of_before_the_pipeline():
    got = _keys()
    assert set(got) == set(PINNED)
    changed = {k: (PINNED[k], got[k]) for k in PINNED if got[k] != PINNED[k]}
    assert not changed, f"cache keys changed (pinned, now): {changed}"


def test_every_kind_of_cell_is_pinned():
    kinds = {k.split("seed 0 ")[-1].split(" ")[0] for k in PINNED if k.startswith("logits")}
    assert kinds == {"fp32", "W8A8", "W4A4", "plan:calib", "plan:accuracy"}
    assert any(k.endswith(" qat") for k in PINNED)  # a method with options in its key
