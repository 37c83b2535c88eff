"""Tiny random-initialised models built from a config, for tests and quick experiments.

They are written once into the cache as ordinary Hugging Face directories (weights plus a
byte-level tokenizer), so every later step loads them exactly like a real local model.
"""

from __future__ import annotations

from pathlib import Path

from fedtune.common.atomic_files import write_dir_atomically
from fedtune.common.models.builtin import cache_root

TINY_MODELS = ("tiny-llama", "tiny-bert")
_SPECIALS = ["<pad>", "<s>", "</s>"]


def byte_level_tokenizer():
    """A 259-token byte-level tokenizer: every string is representable, nothing to train."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(_SPECIALS + alphabet)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A </s> $B", special_tokens=[("<s>", 1), ("</s>", 2)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", model_max_length=512
    )


def _tiny_config(name: str, vocab_size: int):
    from transformers import BertConfig, LlamaConfig

    if name == "tiny-llama":
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            tie_word_embeddings=True,
        )
    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
        pad_token_id=0,
    )


def resolve_tiny(name: str, seed: int = 0) -> Path:
    """Return the cached directory of a tiny model, building it deterministically once."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    if name not in TINY_MODELS:
        raise ValueError(f"unknown tiny model {name!r}; known: {TINY_MODELS}")
    final = cache_root() / "models" / f"{name}-seed{seed}"

    def build(staging: Path) -> None:
        tokenizer = byte_level_tokenizer()
        config = _tiny_config(name, len(tokenizer))
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config) if name == "tiny-llama" else AutoModel.from_config(config)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)

    return write_dir_atomically(final, build, replace=False)
