"""Claims on the decisions a deployer makes with confidence (issue #25): failure detection,
corrupted test images (``[data] shifts``) and unknown inputs (``[data] ood``).

- :func:`failure_detection_beyond_accuracy`: quantization hurts telling right from wrong by
  confidence beyond what its accuracy loss explains (the paired excess-AURC difference vs fp32;
  excess AURC subtracts the AURC of a perfect ranking at the same accuracy, Geifman et al.
  ICLR 2019);
- :func:`quantization_and_corruption_compound`: under a corruption, a quantized model's ECE and
  AURC rise by more than the sum of quantization alone and corruption alone (the paired
  interaction ``[m(q, shift) − m(q, clean)] − [m(fp32, shift) − m(fp32, clean)]`` on the same
  test images);
- :func:`temperature_holds_under_shift`: a temperature fitted on clean validation images still
  lowers ECE on corrupted test images at every precision (Ovadia et al., NeurIPS 2019, found it
  degrades under shift in fp32);
- :func:`ood_moves_with_calibration`: whether quantization moves unknown-input detection (MSP
  AUROC) the same way as calibration (ECE) or against it.

Each verdict is per (model, precision[, shift or set]) from paired bootstrap intervals and
summarised over them (:func:`~quantcal.findings.claims.evidence.summarise`).
"""

from __future__ import annotations

from typing import Any

from quantcal.findings.claims.evidence import interval_verdict, number, precisions, summarise
from quantcal.findings.claims.registry import Claim, register_claim
from quantcal.findings.rows import Estimate, aggregate, groups, main_rows, pick, prec_key

__all__ = [
    "failure_detection_beyond_accuracy",
    "ood_moves_with_calibration",
    "quantization_and_corruption_compound",
    "temperature_holds_under_shift",
]


def _quantized(rows: list[dict]) -> list[str]:
    return [p for p in precisions(rows) if p != "fp32" and not p.startswith("plan:")]


def _shifts(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["shift"] for r in rows))


def _count(verdicts: list[str]) -> str:
    counts = {v: verdicts.count(v) for v in dict.fromkeys(verdicts)}
    return ", ".join(f"{v.split(' (')[0]} {c}" for v, c in counts.items())


@register_claim
def failure_detection_beyond_accuracy(rows: list[dict]) -> Claim:
    """Quantization hurts failure detection beyond its accuracy loss: the excess AURC (AURC
    minus that of a perfect ranking at the same accuracy) rises vs fp32, paired interval above
    0, per model and quantized precision, without recalibration."""
    main = [r for r in main_rows(rows) if r.get("recal") == "none"]
    verdicts, evidence, numbers = [], [], []
    for ds, model in groups(main):
        mine = pick(main, dataset=ds, model=model)
        fp32 = pick(mine, precision="fp32")
        for p in _quantized(mine):
            q = pick(mine, precision=p)
            e = aggregate(q, "excess_aurc_diff_vs_fp32")
            if e.value is None:
                continue
            v = interval_verdict(e, "supported", "contradicted")
            verdicts.append(v)
            numbers.append(number(ds, model, p, "excess_aurc_diff_vs_fp32", e))
            auc = aggregate(q, "failure_auroc").value
            auc0 = aggregate(fp32, "failure_auroc").value if fp32 else None
            evidence.append(
                f"{ds} / {model} {p}: excess AURC {e.text(sign=True)} points vs fp32"
                + (
                    f"; failure AUROC {100 * auc0:.1f} % at fp32, {100 * auc:.1f} % here"
                    if auc is not None and auc0 is not None
                    else ""
                )
                + f" ({v})."
            )
    statement = (
        "Quantization hurts failure detection beyond what its accuracy loss explains "
        "(excess AURC rises vs fp32)"
    )
    if not verdicts:
        return Claim(
            "failure_detection_beyond_accuracy",
            statement,
            "not tested",
            ("needs an fp32 and a quantized precision",),
            tested=False,
        )
    return Claim(
        "failure_detection_beyond_accuracy",
        statement,
        summarise(verdicts),
        tuple(evidence),
        tuple(numbers),
    )


@register_claim
def quantization_and_corruption_compound(rows: list[dict], *, shifted: list[dict]) -> Claim:
    """Quantization and corruption compound: the paired interaction of ECE (and of AURC) above
    0, per model, quantized precision and shift, without recalibration."""
    statement = (
        "Quantization and corruption compound: under a corruption, ECE and AURC rise at low "
        "precision by more than the sum of each alone"
    )
    base = [r for r in main_rows(shifted) if r.get("recal") == "none"]
    verdicts, evidence, numbers = [], [], []
    for ds, model in groups(base):
        mine = pick(base, dataset=ds, model=model)
        for p in _quantized(mine):
            per_metric: dict[str, list[str]] = {"ece": [], "aurc": []}
            for shift in _shifts(mine):
                cell = pick(mine, precision=p, shift=shift)
                for metric in per_metric:
                    e = aggregate(cell, f"{metric}_shift_interaction")
                    if e.value is None:
                        continue
                    v = interval_verdict(e, "supported", "contradicted")
                    per_metric[metric].append(v)
                    if metric == "ece":
                        verdicts.append(v)
                    numbers.append(
                        {**number(ds, model, p, f"{metric}_shift_interaction", e), "shift": shift}
                    )
            if per_metric["ece"]:
                evidence.append(
                    f"{ds} / {model} {p} over {len(per_metric['ece'])} shifts: ECE interaction "
                    f"{_count(per_metric['ece'])}; AURC interaction {_count(per_metric['aurc'])} "
                    "(supported = above the sum of each alone, paired 95 % interval)."
                )
    if not verdicts:
        return Claim(
            "quantization_and_corruption_compound",
            statement,
            "not tested",
            ("needs [data] shifts and a quantized precision",),
            tested=False,
        )
    return Claim(
        "quantization_and_corruption_compound",
        statement,
        summarise(verdicts),
        tuple(evidence),
        tuple(numbers),
    )


@register_claim
def temperature_holds_under_shift(rows: list[dict], *, shifted: list[dict]) -> Claim:
    """A temperature fitted on clean validation images still lowers ECE under each shift, per
    model and precision (fp32 included): the paired ECE difference vs no recalibration on the
    shifted test images below 0."""
    statement = (
        "A temperature fitted on clean data holds under shift at every precision (it still "
        "lowers ECE on corrupted test images)"
    )
    ts = [r for r in main_rows(shifted) if r.get("recal") == "temperature"]
    verdicts, evidence, numbers = [], [], []
    for ds, model in groups(ts):
        mine = pick(ts, dataset=ds, model=model)
        for p in precisions(mine):
            here = []
            for shift in _shifts(mine):
                e = aggregate(pick(mine, precision=p, shift=shift), "ece_diff_vs_none")
                if e.value is None:
                    continue
                v = interval_verdict(e, "contradicted", "supported")
                here.append(v)
                numbers.append({**number(ds, model, p, "ece_diff_vs_none", e), "shift": shift})
            verdicts.extend(here)
            if here:
                evidence.append(
                    f"{ds} / {model} {p} over {len(here)} shifts: {_count(here)} (supported = "
                    "temperature scaling lowers the shifted ECE, paired 95 % interval)."
                )
    if not verdicts:
        return Claim(
            "temperature_holds_under_shift",
            statement,
            "not tested",
            ("needs [data] shifts and the temperature recalibrator",),
            tested=False,
        )
    return Claim(
        "temperature_holds_under_shift",
        statement,
        summarise(verdicts),
        tuple(evidence),
        tuple(numbers),
    )


def _direction(ece: Estimate, auroc: Estimate) -> str:
    """Whether the detection change (AUROC) goes with the calibration change (ECE): worse
    calibration (ECE up) with worse detection (AUROC down), or better with better."""
    if not (ece.decided and auroc.decided):
        return "undecided (no interval)"
    if ece.lo <= 0 <= ece.hi or auroc.lo <= 0 <= auroc.hi:
        return "undecided (interval contains 0)"
    same = (ece.lo > 0) == (auroc.hi < 0)
    return "moves with calibration" if same else "moves against calibration"


@register_claim
def ood_moves_with_calibration(rows: list[dict], details: dict[str, Any]) -> Claim:
    """Unknown-input detection moves with calibration or against it: per model, quantized
    precision and unknown-input set, the paired change of ECE vs fp32 against that of the MSP
    AUROC vs fp32, without recalibration."""
    statement = (
        "OOD detection moves with calibration or against it under quantization (MSP AUROC vs "
        "ECE, each paired with fp32)"
    )
    recs = [
        r
        for r in details.get("ood", [])
        if "error" not in r and r.get("recal") == "none" and r.get("score") == "msp"
    ]
    main = [r for r in main_rows(rows) if r.get("recal") == "none"]
    verdicts, evidence, numbers = [], [], []
    for ds, model in groups(main):
        for p in _quantized(pick(main, dataset=ds, model=model)):
            ece = aggregate(pick(main, dataset=ds, model=model, precision=p), "ece_diff_vs_fp32")
            mine = [
                r
                for r in pick(recs, dataset=ds, model=model, precision=p)
                if r.get("ptq_sample") in (0, None)
            ]
            for ood_set in dict.fromkeys(r["ood_set"] for r in mine):
                auroc = aggregate(
                    [r for r in mine if r["ood_set"] == ood_set], "auroc_diff_vs_fp32"
                )
                if auroc.value is None:
                    continue
                v = _direction(ece, auroc)
                verdicts.append(v)
                numbers.append(
                    {**number(ds, model, p, "auroc_diff_vs_fp32", auroc), "ood_set": ood_set}
                )
                evidence.append(
                    f"{ds} / {model} {p} on {ood_set}: ECE {ece.text(sign=True)} points, MSP "
                    f"AUROC {auroc.text(sign=True)} points vs fp32 ({v})."
                )
    if not verdicts:
        return Claim(
            "ood_moves_with_calibration",
            statement,
            "not tested",
            ("needs [data] ood and a quantized precision",),
            tested=False,
        )
    evidence.sort(key=lambda s: prec_key(s.split(" on ")[0].rsplit(" ", 1)[-1]))
    return Claim(
        "ood_moves_with_calibration",
        statement,
        f"see the numbers: {summarise(verdicts)}",
        tuple(evidence),
        tuple(numbers),
    )
