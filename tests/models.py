"""Tiny random-initialised models of each supported architecture, built from a config; nothing is downloaded.

Each is written as an ordinary Hugging Face directory (weights plus fedtune's byte-level
tokenizer, as ``common.models.tiny`` does for ``tiny-llama``), so the code under test loads it
like any local model. Dropout is off everywhere, so a training step is a function of its data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: Sizes shared by every tiny model: 2 layers, width 32, 4 heads.
_BASE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, pad_token_id=0)
_DECODER = dict(**_BASE, num_key_value_heads=2, bos_token_id=1, eos_token_id=2, max_position_embeddings=128)
_ENCODER = dict(**_BASE, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=130)

#: model_type -> (transformers config class name, its arguments); the task the family is tested on.
CAUSAL_LM: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", _DECODER),
    "qwen2": ("Qwen2Config", _DECODER),
    "qwen3": ("Qwen3Config", {**_DECODER, "head_dim": 8}),
    "mistral": ("MistralConfig", _DECODER),
    "phi3": ("Phi3Config", {**_DECODER, "resid_pdrop": 0.0, "embd_pdrop": 0.0}),
    "gemma2": ("Gemma2Config", {**_DECODER, "head_dim": 8}),
    "gemma3_text": ("Gemma3TextConfig", {**_DECODER, "head_dim": 8}),
    "gpt2": (
        "GPT2Config",
        dict(
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=128,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        ),
    ),
}
CLASSIFIER: dict[str, tuple[str, dict[str, Any]]] = {
    "bert": ("BertConfig", _ENCODER),
    "roberta": ("RobertaConfig", _ENCODER),
    "deberta-v2": ("DebertaV2Config", _ENCODER),
}
ARCHITECTURES = {**CAUSAL_LM, **CLASSIFIER}


def build_tiny_model(model_type: str, directory: Path, seed: int = 0) -> Path:
    """Write a random-initialised ``model_type`` model and the byte-level tokenizer into ``directory``."""
    import torch
    import transformers

    from fedtune.common.models.tiny import byte_level_tokenizer

    config_class, arguments = ARCHITECTURES[model_type]
    tokenizer = byte_level_tokenizer()
    config = getattr(transformers, config_class)(vocab_size=len(tokenizer), **arguments)
    assert config.model_type == model_type, config.model_type
    auto = transformers.AutoModelForCausalLM if model_type in CAUSAL_LM else transformers.AutoModel
    torch.manual_seed(seed)
    auto.from_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
