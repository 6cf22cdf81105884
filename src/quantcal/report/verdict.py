"""The report's verdict section: per model and precision, whether the quantized cell is safe
to deploy (colour and text), the numbers behind it and the reason, within the study's budget
(its config.toml's ``[report]``, :mod:`quantcal.findings.verdicts`)."""

from __future__ import annotations

import html
from pathlib import Path

from quantcal.findings.rows import dataset_label, pct

__all__ = ["config_budget", "run_budget", "verdict_section"]

_BADGE = {
    "safe as is": ("safe", "✔ safe as is"),
    "safe after recalibration": ("repair", "✔ safe after recalibration"),
    "as trustworthy as fp32, which is not: recalibrate": (
        "asfp32",
        "✔ as trustworthy as fp32, which is not: recalibrate",
    ),
    "as trustworthy as fp32, which is not: cannot be repaired": (
        "asfp32",
        "✘ as trustworthy as fp32, which is not: cannot be repaired",
    ),
    "not safe: accuracy lost": ("lost", "✘ not safe: accuracy lost"),
    "not safe: confidence cannot be repaired": (
        "broken",
        "✘ not safe: confidence cannot be repaired",
    ),
}


def config_budget(config_text: str):
    """The study's verdict budget from its config.toml ([report]), else the defaults."""
    import tomllib

    from quantcal.findings.verdicts import Budget

    try:
        section = tomllib.loads(config_text).get("report", {}) if config_text else {}
        return Budget(
            **{
                k: section[k]
                for k in ("max_accuracy_drop", "max_ece_rise", "max_ece")
                if k in section
            }
        )
    except (tomllib.TOMLDecodeError, TypeError, ValueError):
        return Budget()


def run_budget(run_dir: str | Path):
    """The verdict budget of a run folder (its config.toml's [report]), else the defaults."""
    path = Path(run_dir) / "config.toml"
    try:
        text = path.read_text(encoding="utf-8") if path.is_file() else ""
    except OSError:
        text = ""
    return config_budget(text)


def _muted(text: str) -> str:
    return f"<span class='muted'>{html.escape(text)}</span>"


def _estimate_html(e, fp32=None) -> str:
    """A compact cell: the estimate (its interval as a tooltip), then fp32's in grey."""
    if e.value is None:
        return "–"
    tip = f"{e.text()} ({e.n_seeds} seed{'s' if e.n_seeds != 1 else ''})"
    out = f"<span title='{html.escape(tip)}'>{pct(e.value)}</span>"
    if fp32 is not None and fp32.value is not None:
        out += f" {_muted(f'fp32 {pct(fp32.value)}')}"
    return out


def verdict_section(rows: list[dict], budget) -> str:
    """The verdict table: per model and precision, the outcome (colour and text), the numbers
    behind it (intervals as tooltips and in the key numbers below) and the reason."""
    from quantcal.findings.verdicts import LIKE_FP32_RECAL, SAFE_AFTER_RECAL, verdicts
    from quantcal.findings.verdicts import summary as summary_notes

    vs = verdicts(rows, budget)
    if not vs:
        return "<p>No quantized cell with an fp32 reference: no verdict.</p>"
    multi_ds = len({v.dataset for v in vs}) > 1
    body = []
    for v in vs:
        cls, label = _BADGE[v.outcome]
        after = ""
        if v.outcome in (SAFE_AFTER_RECAL, LIKE_FP32_RECAL):
            fix = f"{v.recal} → {pct(v.best_ece.value)} %, fitted on {v.recal_fit}"
            after = f"<br>{_muted(fix)}"
        near = (
            " <span class='near' title='"
            + html.escape(f"borderline: {v.basis or 'the deciding interval'} crosses its line")
            + "'>≈</span>"
            if v.borderline
            else ""
        )
        model = f"{dataset_label(v.dataset)} / {v.model}" if multi_ds else v.model
        best = f"{html.escape(v.recal)} {_estimate_html(v.best_ece)}" if v.recal else "–"
        body.append(
            f"<tr><td class='text'>{html.escape(model)}</td>"
            f"<td class='text'>{html.escape(v.precision)}</td>"
            f"<td class='text verdict'><span class='badge {cls}'>{label}</span>{near}{after}</td>"
            f"<td>{_estimate_html(v.accuracy, v.fp32_accuracy)}</td>"
            f"<td>{_estimate_html(v.ece, v.fp32_ece)}</td>"
            f"<td>{best}</td><td class='text'>{html.escape(v.threshold or '–')}</td>"
            f"<td class='text why'>{html.escape(v.reason)}</td></tr>"
        )
    head = "".join(
        f"<th>{h}</th>"
        for h in (
            "model",
            "precision",
            "verdict",
            "accuracy %",
            "ECE % as is",
            "best recalibrator: ECE %",
            "fp32's abstention threshold",
            "why",
        )
    )
    counts = {o: sum(v.outcome == o for v in vs) for o in _BADGE}
    summary = "; ".join(f"{n} {o}" for o, n in counts.items() if n)
    datasets = "" if multi_ds else f" on {html.escape(dataset_label(vs[0].dataset))}"
    return (
        f"<p><b>{len(vs)} quantized cells{datasets}: {html.escape(summary)}.</b></p>"
        + "".join(f"<p>{html.escape(s)}</p>" for s in summary_notes(rows, budget))
        + f"<table class='verdicts'><tr>{head}</tr>{''.join(body)}</table>"
        f"<p class='muted'>Budget: at most {100 * budget.max_accuracy_drop:g} point(s) of "
        f"top-1 accuracy lost and {100 * budget.max_ece_rise:g} point(s) of ECE gained vs "
        f"fp32 (as is; after recalibration, vs fp32's best), and an ECE of at most "
        f"{100 * budget.max_ece:g} % whatever fp32's, from the study's [report] "
        "max_accuracy_drop, max_ece_rise and max_ece. A recalibrator that costs more accuracy "
        "than the budget, or whose fit raised the held-out ECE, is no repair. Point estimates "
        "decide; hover a number for its 95 % interval (the key numbers below list them); ≈ "
        "marks a verdict whose deciding interval crosses its line: the paired ΔECE vs fp32 "
        "where the rows have it (hover ≈ to see which). The abstention column carries a "
        "threshold set on the fp32 model's validation confidence for the study's target risk "
        "(metrics.target_risk) to this cell as deployed: it holds, must be re-set on the "
        "cell's own validation images, or no threshold reaches the target (the decisions "
        "section has the numbers).</p>"
    )
