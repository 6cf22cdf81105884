"""The report's mixed-precision section: the cost-vs-calibration front of the uniform precisions
and the found plans (``[quant] plans``), and which layers each plan kept at high precision and
why (their sensitivities, from ``details.json["plans"]``)."""

from __future__ import annotations

import base64
import html
import io
from typing import Any

from quantcal.findings.rows import aggregate, groups, main_rows, model_label, pick, prec_key

__all__ = ["fig_front", "plans_section"]


def _cost(rows: list[dict], kind: str) -> float | None:
    vals = [r.get(kind) for r in rows if r.get(kind) is not None]
    return sum(vals) / len(vals) if vals else None


def fig_front(rows: list[dict], dataset: str, model: str, cost: str) -> bytes:
    """Test accuracy and ECE (raw and after temperature scaling) against the cost, one point
    per uniform precision and plan, labelled."""
    from matplotlib.figure import Figure

    main = pick(main_rows(rows), dataset=dataset, model=model)
    precs = sorted({r["precision"] for r in main if r["precision"] != "fp32"}, key=prec_key)
    fig = Figure(figsize=(9, 3.3), dpi=110, layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    for p in precs:
        raw = pick(main, precision=p, recal="none")
        ts = pick(main, precision=p, recal="temperature")
        c = _cost(raw, cost)
        if c is None or not raw:
            continue
        is_plan = p.startswith("plan:")
        style = {"marker": "*" if is_plan else "o", "s": 90 if is_plan else 36}
        color = "tab:red" if p == "plan:calib" else "tab:orange" if is_plan else "tab:blue"
        acc = aggregate(raw, "accuracy").value
        ax1.scatter([c], [100 * acc], color=color, **style)
        ax1.annotate(p, (c, 100 * acc), textcoords="offset points", xytext=(4, 4), fontsize=7)
        e_raw = aggregate(raw, "ece").value
        ax2.scatter([c], [100 * e_raw], color=color, facecolors="none", **style)
        if ts:
            e_ts = aggregate(ts, "ece").value
            ax2.scatter([c], [100 * e_ts], color=color, **style)
            ax2.plot([c, c], [100 * e_raw, 100 * e_ts], color=color, alpha=0.4, linewidth=1)
            ax2.annotate(p, (c, 100 * e_ts), textcoords="offset points", xytext=(4, 4), fontsize=7)
    eces = [100 * r["ece"] for r in main if r["precision"] != "fp32" and r.get("ece")]
    if eces and max(eces) > 8 * sorted(eces)[len(eces) // 2]:
        ax2.set_yscale("log")  # one cell dwarfs the rest
    unit = "BOPs per image" if cost == "bops" else "weight bytes"
    for ax, label in ((ax1, "test accuracy (%)"), (ax2, "test ECE (%): hollow raw, filled + TS")):
        ax.set_xscale("log")
        ax.set_xlabel(f"cost: {unit} (log scale)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
    fig.suptitle(f"{model}: cost against accuracy and calibration", fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _plan_records(details: dict, dataset: str, model: str) -> list[dict[str, Any]]:
    out = []
    for d in details.get("plans", []):
        label = model_label(
            {"arch": d["arch"], "width": float(d["width"]), "objective": d.get("objective")}
        )
        if (d["dataset"], label) == (dataset, model):
            out.append(d)
    return out


def _top_level(uniform_costs: dict[str, float]) -> str:
    """The plan's highest precision: the level with the most (weight, activation) bits, read
    from the level names, not from their order (details.json stores its keys sorted)."""
    return max(uniform_costs, key=_bits, default="")


def _kept_high(d: dict[str, Any], top: int = 5) -> str:
    """The most sensitive layers the plan kept at its top level, with their penalties (the
    largest rise measured when the layer alone dropped a level)."""
    level = _top_level(d["uniform_costs"])
    if not level:
        return "–"
    sens = d.get("sensitivity", {})
    kept = [
        (max((sens.get(n) or {}).values(), default=0.0), n)
        for n, b in d["plan"].items()
        if tuple(b) == _bits(level)
    ]
    kept.sort(key=lambda t: (-t[0], t[1]))
    return ", ".join(f"{n} ({p:.3g})" for p, n in kept[:top]) or "–"


def _bits(precision: str) -> tuple[int, int]:
    w, _, a = precision.upper().lstrip("W").partition("A")
    return int(w), int(a)


def plans_section(rows: list[dict], details: dict) -> tuple[str, list]:
    """The section's HTML and figures; empty when the study searched no plan."""
    main = main_rows(rows)
    if not any(r["precision"].startswith("plan:") for r in main):
        return "", []
    parts = [
        "<h2>Mixed precision</h2><p class='muted'>plan:calib is the cheapest per-layer plan "
        "found whose validation accuracy and ECE after recalibration stay within the budget; "
        "plan:accuracy budgets accuracy alone, as other tools do. Both were searched on "
        "validation (recalibrators fitted on one half, the budget checked on the other) and "
        "are measured here on the untouched test split.</p>"
    ]
    figs = []
    for ds, model in groups(main):
        recs = _plan_records(details, ds, model)
        cost = recs[0]["cost_kind"] if recs else "bops"
        png = fig_front(rows, ds, model, cost)
        name = f"front_{len(figs)}"
        caption = f"{ds} / {model}: cost vs test accuracy and ECE, uniform precisions and plans"
        figs.append((name, caption, png))
        parts.append(f"<h3>{html.escape(f'{ds} / {model}')}</h3>")
        body = []
        for d in recs:
            cell = pick(main, dataset=ds, model=model, precision=d["precision"])
            ts = [r for r in cell if r["recal"] == "temperature"]
            per_level = {}
            for b in d["plan"].values():
                per_level[f"W{b[0]}A{b[1]}"] = per_level.get(f"W{b[0]}A{b[1]}", 0) + 1
            top = max(d["uniform_costs"].values())
            levels = ", ".join(
                f"{k}: {v}" for k, v in sorted(per_level.items(), key=lambda kv: prec_key(kv[0]))
            )
            raw = [r for r in cell if r["recal"] == "none"]
            body.append(
                "<tr>"
                + f"<td class='text'>{html.escape(d['precision'])}</td>"
                + f"<td>{100 * d['cost'] / top:.0f} %</td>"
                + f"<td class='text'>{html.escape(levels)}</td>"
                + f"<td>{aggregate(raw, 'accuracy').text()}</td>"
                + f"<td>{aggregate(ts, 'ece').text() if ts else '–'}</td>"
                + f"<td>{d['evaluations']}</td>"
                + f"<td class='text why'>{html.escape(_kept_high(d))}</td></tr>"
            )
        if body:
            head = "".join(
                f"<th>{h}</th>"
                for h in (
                    "plan",
                    f"cost vs {max(recs[0]['uniform_costs'], key=recs[0]['uniform_costs'].get)}",
                    "layers per precision",
                    "test accuracy %",
                    "test ECE % after TS",
                    "evaluations",
                    f"most sensitive layers kept at {_top_level(recs[0]['uniform_costs'])} "
                    "(penalty)",
                )
            )
            parts.append(f"<table><tr>{head}</tr>{''.join(body)}</table>")
        b64 = base64.b64encode(png).decode()
        parts.append(
            f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,{b64}'>"
            f"<figcaption class='muted'>{html.escape(caption)}</figcaption></figure>"
        )
    parts.append(
        "<p class='muted'>The last column lists the layers the plan kept at its highest "
        "precision, most sensitive first. A layer's penalty is the largest rise in validation "
        "NLL (plus accuracy lost, and ECE after recalibration for plan:calib) measured when it "
        "alone drops to a lower level; the cost is "
        "relative to the most expensive uniform precision searched.</p>"
    )
    return "\n".join(parts), figs
