"""The report's configuration section: the study's config.toml, read (``parse_config``) and
shown less what does not apply (no ``[train]`` recipe when no network was trained)."""

from __future__ import annotations

import html
from typing import Any

__all__ = ["config_section", "parse_config"]


def _trains_nothing(config: dict[str, Any]) -> bool:
    """The study's training recipe reaches no result (``studyconfig.recipe_unused``), read off
    its config.toml as written (a moved run folder's checkpoints need not exist here)."""
    from quantcal.study.config import recipe_unused

    models = config.get("model")
    if not isinstance(models, list) or not all(isinstance(m, dict) for m in models):
        return False
    objectives = (config.get("train") or {}).get("objectives") or []
    names = [o if isinstance(o, str) else (o or {}).get("name") for o in objectives]
    return recipe_unused(
        [bool(m.get("checkpoint")) for m in models],
        (config.get("quant") or {}).get("methods") or ["ptq"],
        names,
    )


def _without_table(text: str, name: str) -> str:
    """``text`` (TOML) without the table ``name`` and its sub-tables (``[name]``,
    ``[name.x]``, ``[[name.x]]``)."""
    out, skip = [], False
    for line in text.splitlines():
        head = line.strip()
        if head.startswith("["):
            key = head.strip("[]").strip()
            skip = key == name or key.startswith(f"{name}.")
        if not skip:
            out.append(line)
    return "\n".join(out).rstrip() + "\n"


def parse_config(config_text: str) -> dict[str, Any]:
    """The study's config.toml as a dict ({} when it is missing or does not parse)."""
    import tomllib

    try:
        return tomllib.loads(config_text) if config_text else {}
    except tomllib.TOMLDecodeError:
        return {}


def config_section(config_text: str) -> str:
    """The study's config.toml, less what does not apply: no training recipe when it reaches no
    result (config.toml of such a run leaves it out already; one of an earlier release has it)."""
    config = parse_config(config_text)
    note = ""
    if _trains_nothing(config) and "train" in config:
        config_text = _without_table(config_text, "train")
        note = (
            "<p class='muted'>No network was trained: every model came from a checkpoint "
            "([[model]] checkpoint), so the training recipe ([train]) does not apply and is "
            "left out here.</p>"
        )
    return "<h2>Configuration</h2>" + note + "<pre>" + html.escape(config_text) + "</pre>"
