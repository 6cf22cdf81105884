"""Findings of the study's newer axes, one function per claim, each over result rows.

Each function takes the rows of ``results.csv`` (as :func:`quantcal.report.load_rows` gives them)
and returns ``None`` when the study does not test its claim, else ``{"claim", "verdict",
"evidence"}`` like the paper's claims in :func:`quantcal.report.findings`, which appends them.
"""

from __future__ import annotations

from typing import Any

__all__ = ["FINDINGS", "training_objectives"]


def _span(rows: list[dict], key: str) -> tuple[float | None, float | None, float | None]:
    """(mean estimate, lowest lo, highest hi) of ``key`` over rows (e.g. the disjoint
    range-calibration samples of one cell): the interval spans every sample's interval."""
    est = [r[key] for r in rows if r.get(key) is not None]
    lo = [r[f"{key}_lo"] for r in rows if r.get(f"{key}_lo") is not None]
    hi = [r[f"{key}_hi"] for r in rows if r.get(f"{key}_hi") is not None]
    mean = sum(est) / len(est) if est else None
    return mean, (min(lo) if lo else None), (max(hi) if hi else None)


def _fmt(t: tuple[float | None, float | None, float | None]) -> str:
    est, lo, hi = t
    if est is None:
        return "–"
    ci = f" [{100 * lo:.2f}, {100 * hi:.2f}]" if lo is not None and hi is not None else ""
    return f"{100 * est:+.2f}{ci}"


def training_objectives(rows: list[dict]) -> dict[str, Any] | None:
    """Claim: *training for calibration keeps quantized models calibrated* (issue of the
    study's third next check; Müller et al. 2019, Mukhoti et al. 2020, Thulasidasan et al.
    2019). Tested when a model was trained with cross-entropy and at least one other objective.

    Per model and objective: fp32 ECE; the ECE rise at each quantized precision vs the same
    objective's fp32 model (paired bootstrap, in points); the temperature-scaling gain at that
    precision (ECE after TS minus raw, paired). Verdict per objective at the lowest precision,
    on the quantized model's raw ECE (is it calibrated, not only less damaged than its own fp32
    model, which may have started far worse): *supported* when its ECE interval lies wholly below
    cross-entropy's, *contradicted* when wholly above, else *undecided*. The two intervals come
    from different models on the same test images, so demanding no overlap is conservative.
    """
    from quantcal.report import _pct, _prec_key

    ok = [r for r in rows if r.get("status") == "ok"]
    objectives = list(dict.fromkeys(r.get("objective") or "ce" for r in ok))
    if "ce" not in objectives or len(objectives) < 2:
        return None
    precs = sorted({r["precision"] for r in ok}, key=_prec_key)
    quantized = [p for p in precs if p != "fp32"]
    if not quantized:
        return None
    lowest = quantized[-1]
    bases = list(dict.fromkeys((r["dataset"], r["arch"], r["width"]) for r in ok))
    evidence: list[str] = []
    verdicts: list[str] = []

    def pick(base, obj, prec, recal):
        return [
            r
            for r in ok
            if (r["dataset"], r["arch"], r["width"]) == base
            and (r.get("objective") or "ce") == obj
            and r["precision"] == prec
            and r["recal"] == recal
        ]

    for base in bases:
        ece_ce = _span(pick(base, "ce", lowest, "none"), "ece")
        for obj in objectives:
            fp32 = pick(base, obj, "fp32", "none")
            if not fp32:
                continue
            parts = [f"fp32 ECE {_pct(fp32[0]['ece'])} %, accuracy {_pct(fp32[0]['accuracy'])} %"]
            for p in quantized:
                raw = pick(base, obj, p, "none")
                ts = pick(base, obj, p, "temperature")
                if not raw:
                    continue
                ece, ece_lo, ece_hi = _span(raw, "ece")
                ci = "" if ece_lo is None else f" [{_pct(ece_lo)}, {_pct(ece_hi)}]"
                txt = f"{p}: ECE {_pct(ece)}{ci} %, rise {_fmt(_span(raw, 'ece_diff_vs_fp32'))}"
                if ts:
                    txt += f", TS gain {_fmt(_span(ts, 'ece_diff_vs_none'))}"
                parts.append(txt)
            verdict = ""
            if obj != "ce":
                _, lo, hi = _span(pick(base, obj, lowest, "none"), "ece")
                _, ce_lo, ce_hi = ece_ce
                if None in (lo, hi, ce_lo, ce_hi):
                    verdict = "undecided (no interval)"
                elif hi < ce_lo:
                    verdict = "supported (its ECE interval lies below cross-entropy's)"
                elif lo > ce_hi:
                    verdict = "contradicted (its ECE interval lies above cross-entropy's)"
                else:
                    verdict = "undecided (the ECE intervals overlap)"
                verdicts.append(verdict.split()[0])
                verdict = f" — at {lowest}: {verdict}"
            ds, arch, width = base
            evidence.append(f"{ds} / {arch}@{width:g} / {obj}: " + "; ".join(parts) + verdict)
    if not verdicts:
        return None
    counts = {v: verdicts.count(v) for v in dict.fromkeys(verdicts)}
    summary = ", ".join(f"{v} {k} of {len(verdicts)}" for v, k in counts.items())
    evidence.append(
        "Rises and TS gains are in ECE points with 95 % paired-bootstrap intervals; with several "
        "range-calibration samples the estimate is their mean and the interval spans theirs. A "
        "negative TS gain means temperature scaling lowered ECE."
    )
    return {
        "claim": "Training for calibration keeps quantized models calibrated (each objective's "
        f"ECE at {lowest} compared with cross-entropy's; its rise vs its own fp32 model beside).",
        "verdict": summary,
        "evidence": evidence,
    }


#: The findings :func:`quantcal.report.findings` appends, in order.
FINDINGS = (training_objectives,)
