"""Every config field documents itself, and `fedtune config show` prints a config that loads back unchanged."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from pydantic import BaseModel

from fedtune.common.config import FedtuneConfig, config_from_dict, load_config, preset_path
from fedtune.common.config_reference import preset_descriptions, render_config


def _sections(model: type[BaseModel], prefix: str = ""):
    for name, info in model.model_fields.items():
        yield f"{prefix}{name}", info
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from _sections(annotation, f"{prefix}{name}.")


def test_every_config_field_has_a_description():
    missing = [name for name, info in _sections(FedtuneConfig) if not (info.description or "").strip()]
    assert missing == []


@pytest.mark.parametrize("preset", sorted(preset_descriptions()))
def test_the_shown_config_loads_back_as_the_same_config(preset, tmp_path):
    cfg = load_config(preset_path(preset), ["train.lr=0.125", "data.fields.system='sys'"])
    text = render_config(cfg)
    again = config_from_dict(tomllib.loads(text), "shown", Path(tmp_path))
    assert again == cfg
    assert "lr = 0.125  # default: 0.005" in text
    assert "# path = (unset)" in text  # model.path has no value in the presets


def test_every_preset_has_a_one_line_description():
    rows = preset_descriptions()
    assert set(rows) >= {"banking77-minilm", "medquad-smollm2"}
    assert all(d and "\n" not in d and d != "(no description)" for d in rows.values())
