"""The config explained: every field with its value, default and description, as TOML.

Descriptions live in the schema's field metadata (``Field(description=...)``, as peft's
``LoraConfig`` keeps them), so this text and the validation cannot drift apart.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from fedtune.common.config import PRESETS_DIR, FedtuneConfig


def _toml_value(value: Any) -> str:
    """A TOML literal for a JSON-mode value (strings, numbers, booleans, lists)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def _section(model: BaseModel, name: str) -> list[str]:
    lines = [f"[{name}]"]
    nested: list[tuple[str, BaseModel]] = []
    for key, info in type(model).model_fields.items():
        value = getattr(model, key)
        if isinstance(value, BaseModel):
            nested.append((f"{name}.{key}", value))
            continue
        lines.append(f"# {info.description}")
        current = model.model_dump(mode="json")[key]
        default = None if info.is_required() else info.get_default(call_default_factory=True)
        default_text = _toml_value(json.loads(json.dumps(default, default=str))) if default is not None else "unset"
        if current is None:
            lines.append(f"# {key} = (unset)")
            continue
        marker = "" if default is not None and _toml_value(current) == default_text else f"  # default: {default_text}"
        lines.append(f"{key} = {_toml_value(current)}{marker}")
    for child_name, child in nested:
        lines += ["", *_section(child, child_name)]
    return lines


def render_config(cfg: FedtuneConfig) -> str:
    """The effective config as valid TOML, each field preceded by its description."""
    lines = ["# The effective fedtune config (`fedtune config show`). Values that differ from the default say so."]
    for key, info in FedtuneConfig.model_fields.items():
        lines += ["", f"# --- {info.description}", *_section(getattr(cfg, key), key)]
    return "\n".join(lines) + "\n"


def preset_descriptions() -> dict[str, str]:
    """Each built-in preset and its ``run.description``."""
    out = {}
    for path in sorted(PRESETS_DIR.glob("*.toml")):
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        out[path.stem] = str(raw.get("run", {}).get("description", "")) or "(no description)"
    return out
