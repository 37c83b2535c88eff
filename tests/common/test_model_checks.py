"""Every model problem is found when the config is validated or the run starts: one line naming the setting.

Reproductions from issue 19: a model.path that does not exist, one whose config.json is ``{}``, one
without a tokenizer, an unknown built-in name, and LoRA targets the model does not have.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from fedtune.common.config import ConfigError, load_config
from fedtune.common.models.lora import check_target_modules
from fedtune.common.models.tiny import resolve_tiny


def _error(overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    return str(info.value)


PRESET = "invalid configuration in {}/common/presets/banking77-minilm.toml: "


def _prefix() -> str:
    return PRESET.format(Path(__file__).resolve().parents[2])


def test_a_missing_model_path_says_it_does_not_exist():
    assert _error(["model.path='/typo/path'"]) == _prefix() + (
        "model.path: /typo/path does not exist; give a local Hugging Face model directory, or unset it to use "
        "model.name"
    )


def test_a_directory_that_is_not_a_model(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert _error([f"model.path='{tmp_path}'"]) == _prefix() + (
        f"model.path: {tmp_path / 'config.json'} names no model_type: not a Hugging Face model config "
        "(write the directory with model.save_pretrained)"
    )
    (tmp_path / "config.json").unlink()
    assert _error([f"model.path='{tmp_path}'"]) == _prefix() + (
        f"model.path: {tmp_path} has no config.json: not a Hugging Face model directory"
    )


def test_a_model_without_a_tokenizer(tmp_path):
    source = resolve_tiny("tiny-bert")
    model = tmp_path / "model"
    model.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(source / name, model / name)
    assert _error([f"model.path='{model}'"]) == _prefix() + (
        f"model.path: {model} has no tokenizer (none of tokenizer.json, tokenizer.model, spiece.model, vocab.txt, "
        "vocab.json); save it beside the model with tokenizer.save_pretrained"
    )
    shutil.copy(source / "tokenizer.json", model / "tokenizer.json")
    assert load_config(None, [f"model.path='{model}'"]).model.path == model


def test_an_unknown_built_in_name_lists_the_known_ones():
    assert _error(["model.name=minilm-l12"]) == _prefix() + (
        "model.name = 'minilm-l12' is not a built-in model (known: minilm-l6, smollm2-135m, tiny-llama, tiny-bert); "
        "give a local Hugging Face model directory with model.path instead"
    )


def test_lora_targets_the_model_lacks_list_its_linear_modules(tiny_bert_spec, tiny_llama_spec):
    cfg = load_config(None, ["model.name='tiny-bert'", "lora.target_modules=['q_proj', 'value']"])
    with pytest.raises(ConfigError) as info:
        check_target_modules(tiny_bert_spec, cfg.lora)
    assert str(info.value) == (
        f"lora.target_modules: no module named 'q_proj' in the base model ({tiny_bert_spec.directory}, model type "
        "'bert'); its linear modules are: query, key, value, dense, classifier. Set lora.target_modules to some of them"
    )
    check_target_modules(tiny_llama_spec, load_config(None, ["lora.target_modules=[]"]).lora)  # llama's defaults
