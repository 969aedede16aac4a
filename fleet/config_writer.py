"""The TOML text of a fleet config, for whoever writes one of their own:
the demos, the benchmark and the tests. Enough of TOML for fleet's
settings: strings, paths, numbers, booleans, lists, inline tables, and one
`[agents.NAME]` table an agent."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | Path):
        return json.dumps(str(value))  # a JSON string is a TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):  # an inline table
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def config_text(top: dict[str, Any], agents: dict[str, dict[str, Any]]) -> str:
    lines = [f"{key} = {toml_value(value)}" for key, value in top.items()]
    for agent, spec in agents.items():
        lines.append(f"\n[agents.{agent}]")
        lines += [f"{key} = {toml_value(value)}" for key, value in spec.items()]
    return "\n".join(lines) + "\n"
