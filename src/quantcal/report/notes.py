"""The report's notes: each distinct note of the result rows with the cells it applies to,
the quantization coverage per model, and any cache entries that were damaged and rebuilt."""

from __future__ import annotations

from pathlib import Path

from quantcal.findings.rows import model_label, prec_key
from quantcal.report.markup import html_table

__all__ = ["notes_section"]


def notes_section(rows: list[dict], run: Path) -> list[str]:
    """Each distinct note of the rows with the cells it applies to, and any cache entries that
    were damaged and rebuilt (their numbers equal a clean run's; listed so nothing is hidden)."""
    from quantcal.store.cache import healed_entries

    parts: list[str] = []
    by_note: dict[str, set[str]] = {}
    for r in rows:
        for note in filter(None, (n.strip() for n in str(r.get("notes") or "").split(" | "))):
            by_note.setdefault(note, set()).add(f"{model_label(r)} {r['precision']}")
    if by_note:
        parts.append(
            "<h2>Notes</h2><p class='muted'>What a number may not mean as its name "
            "says (also in the notes column of results.csv).</p>"
        )
        parts.append(
            html_table(
                ["note", "cells"],
                [
                    [n, ", ".join(sorted(c)[:6]) + (" …" if len(c) > 6 else "")]
                    for n, c in by_note.items()
                ],
            )
        )
    coverage: dict[str, set[str]] = {}
    for r in rows:
        if r.get("quantized_layers"):
            coverage.setdefault(model_label(r), set()).add(
                f"{r['precision']} {r['quantized_layers']}"
            )
    if coverage:
        parts.append(
            "<h2>Quantization coverage</h2><p class='muted'>Conv/linear computations quantized "
            "of those in the deploy graph (k/n); any left in fp32 are named in the notes.</p>"
        )
        parts.append(
            html_table(
                ["model", "quantized layers"],
                [
                    [m, ", ".join(sorted(c, key=lambda t: prec_key(t.split()[0])))]
                    for m, c in coverage.items()
                ],
            )
        )
    healed = healed_entries(run / "cache")
    if healed:
        parts.append(
            "<h2>Cache entries rebuilt</h2><p class='muted'>Damaged entries found and "
            "computed again; the results equal a clean run's.</p>"
        )
        parts.append(
            html_table(
                ["file", "what was wrong"],
                [[h.get("file", ""), h.get("reason", "")] for h in healed[-50:]],
            )
        )
    return parts
