"""The key numbers per model and precision (accuracy, ECE, ECE after recalibration, the
fitted temperature): the terminal's summary table, and the report's key-numbers table and its
table of every recalibration method."""

from __future__ import annotations

import html

from quantcal.findings.rows import (
    aggregate,
    dataset_label,
    groups,
    main_rows,
    pct,
    pick,
    prec_key,
)
from quantcal.report.labels import short_labels
from quantcal.report.markup import html_table
from quantcal.report.repair import repair_summary

__all__ = ["all_methods_table", "key_table", "summary_table"]


def _diff(r: dict, key: str) -> str:
    """``"d [lo, hi]"`` in percentage points for a paired-difference column."""
    return f"{pct(r.get(key), 2)} [{pct(r.get(f'{key}_lo'), 2)}, {pct(r.get(f'{key}_hi'), 2)}]"


def _ci(r: dict, key: str) -> str:
    lo, hi = r.get(f"{key}_lo"), r.get(f"{key}_hi")
    if lo is None or hi is None:
        return pct(r.get(key))
    return f"{pct(r.get(key))} [{pct(lo)}, {pct(hi)}]"


def _temp(rows: list[dict]) -> str:
    """The fitted temperature (the mean over seeds)."""
    ts = [r["temperature"] for r in rows if r.get("temperature") is not None]
    return "–" if not ts else format(sum(ts) / len(ts), ".3g")


def summary_table(rows: list[dict]) -> str:
    """A compact plain-text table of the key numbers, for the terminal."""
    rows = short_labels(rows)[0]
    main = main_rows(rows)
    mw = max([22, *(len(m) for _, m in groups(main))])  # the model column fits every label
    pw = max([5, *(len(r["precision"]) for r in main)])  # and the precision column
    header = (
        f"{'dataset':<16} {'model':<{mw}} {'prec':<{pw}} {'acc%':>6} {'ECE%':>6} {'[95% CI]':>14} "
        f"{'+TS':>6} {'fp32T':>6} {'T':>6}"
    )
    lines = [header, "-" * len(header)]
    for ds, model in groups(main):
        for r in pick(main, dataset=ds, model=model, recal="none"):
            ts = pick(main, dataset=ds, model=model, recal="temperature", precision=r["precision"])
            f32 = pick(
                main, dataset=ds, model=model, recal="temperature_fp32", precision=r["precision"]
            )
            ci = f"[{pct(r['ece_lo'])},{pct(r['ece_hi'])}]" if r.get("ece_lo") is not None else ""
            lines.append(
                f"{dataset_label(ds)[:16]:<16} {model:<{mw}} {r['precision']:<{pw}} "
                f"{pct(r['accuracy']):>6} "
                f"{pct(r['ece']):>6} {ci:>14} {pct(ts[0]['ece']) if ts else '–':>6} "
                f"{pct(f32[0]['ece']) if f32 else '–':>6} "
                f"{_temp(ts):>6}"
            )
    repair = repair_summary(rows)
    if repair:
        lines.append(repair)
    errors = [r for r in rows if r.get("status") != "ok"]
    if errors:
        lines.append(f"{len(errors)} result rows failed; see the 'error' column of results.csv")
    return "\n".join(lines)


def _outside(e) -> bool:
    """A point estimate outside its own interval (binned ECE below its bootstrap interval)."""
    return e.decided and not (e.lo <= e.value <= e.hi)


_OUTSIDE_NOTE = (
    "† The binned ECE lies outside its bootstrap interval. ECE is an absolute value per bin, "
    "so the noise a resample adds raises it on average: resampled ECEs sit above the estimate "
    "when the model is well calibrated, and the percentile interval describes them. The "
    "estimate is the number to quote; the interval's width is the uncertainty."
)


def _two_line(e, digits: int = 1, sign: bool = False, mark: str = "") -> str:
    """An estimate as HTML: the number, then its interval on a second, smaller line (and as a
    tooltip), so that the key numbers fit the page."""
    if e.value is None:
        return "–"
    v = f"{100 * e.value:+.{digits}f}" if sign else pct(e.value, digits)
    if not e.decided:
        return html.escape(v + mark)
    ci = f"[{pct(e.lo, digits)}, {pct(e.hi, digits)}]"
    tip = f"{v} {ci} ({e.n_seeds} seed{'s' if e.n_seeds != 1 else ''})"
    return (
        f"<span title='{html.escape(tip)}'>{html.escape(v + mark)}</span>"
        f"<br><span class='ci'>{html.escape(ci)}</span>"
    )


def _count(n: float | None, unit: str) -> str:
    """``327 k``, ``1307 kB``; a count under a thousand exactly (a tiny model is not ``0 k``)."""
    if n is None:
        return "–"
    return f"{n / 1e3:.0f} k{unit}" if n >= 1e3 else f"{n:.0f} {unit}".rstrip()


def key_table(rows: list[dict]) -> str:
    """One line per model and precision (seeds aggregated), raw and after temperature
    scaling; each number with its interval beneath it."""
    main = main_rows(rows)
    multi_ds = len({r["dataset"] for r in main}) > 1
    body, flagged = [], False
    for ds, model in groups(main):
        raw = pick(main, dataset=ds, model=model, recal="none")
        for p in sorted({r["precision"] for r in raw}, key=prec_key):
            rs = pick(raw, precision=p)
            same = {"dataset": ds, "model": model, "precision": p}
            ts = pick(main, recal="temperature", **same)
            f32 = pick(main, recal="temperature_fp32", **same)
            ece = aggregate(rs, "ece")
            mark = " †" if _outside(ece) else ""
            ts_ece = aggregate(ts, "ece")
            ts_mark = " †" if _outside(ts_ece) else ""
            flagged |= bool(mark or ts_mark)
            r = rs[0]
            name = f"{dataset_label(ds)} / {model}" if multi_ds else model
            cells = [
                _two_line(aggregate(rs, "accuracy")),
                _two_line(ece, mark=mark),
                _two_line(aggregate(rs, "ece_diff_vs_fp32"), 2, sign=True) if p != "fp32" else "–",
                _two_line(ts_ece, mark=ts_mark) if ts else "–",
                _two_line(aggregate(f32, "ece")) if f32 else "–",
                html.escape(_temp(ts)),
                _count(r.get("params"), ""),
                _count(r.get("weight_bytes"), "B"),
            ]
            body.append(
                f"<tr><td class='text model'>{html.escape(name).replace('@', '<wbr>@')}</td>"
                f"<td class='text'>{html.escape(p)}</td>"
                + "".join(f"<td>{c}</td>" for c in cells)
                + "</tr>"
            )
    heads = [
        ("model", "dataset / model" if multi_ds else "model"),
        ("precision", "precision"),
        ("top-1 test accuracy", "accuracy %"),
        ("binned ECE on the test split, raw logits", "ECE %"),
        ("paired-bootstrap ECE difference vs the same model at fp32", "ΔECE vs fp32 (points)"),
        ("ECE after temperature scaling fitted on this model", "ECE % after TS"),
        ("ECE when the fp32 model's temperature is reused", "ECE % with fp32's T"),
        ("the fitted temperature", "T"),
        ("parameters", "params"),
        ("stored weight size at this precision", "weights"),
    ]
    head = "".join(f"<th title='{html.escape(t)}'>{html.escape(h)}</th>" for t, h in heads)
    table = (
        f"<table class='nums key'><thead><tr>{head}</tr></thead>"
        f"<tbody>{''.join(body)}</tbody></table>"
    )
    seeds = len({r.get("seed") for r in main})
    notes = ["Under each number, its bootstrap interval (hover the number for it too)."]
    if seeds > 1:
        notes.append(
            f"Each line is the mean of {seeds} seeds; its interval holds the test-image "
            "variance within seeds and the training variance between them."
        )
    if flagged:
        notes.append(_OUTSIDE_NOTE)
    return table + "".join(f"<p class='muted'>{html.escape(n)}</p>" for n in notes)


def all_methods_table(rows: list[dict]) -> str:
    """The ECE of every recalibration method, per dataset, model and precision."""
    main = main_rows(rows)
    methods = list(dict.fromkeys(r["recal"] for r in main))
    body = []
    for ds, model in groups(main):
        for p in sorted(
            {r["precision"] for r in pick(main, dataset=ds, model=model)}, key=prec_key
        ):
            cells = []
            for m in methods:
                rs = pick(main, dataset=ds, model=model, recal=m, precision=p)
                cells.append(pct(rs[0]["ece"]) if rs else "–")
            body.append([ds, model, p, *cells])
    return html_table(["dataset", "model", "precision", *[f"ECE % {m}" for m in methods]], body)
