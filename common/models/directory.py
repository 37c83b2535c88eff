"""What a local base-model directory must hold, checked when the config is validated.

A directory that is missing, is not a Hugging Face model or lacks a tokenizer would otherwise
be found only when a site loads it, after data was read and a run directory written, as a
transformers traceback. The checks read file names and ``config.json`` only: no weights.
"""

from __future__ import annotations

import json
from pathlib import Path

#: Files a tokenizer is loaded from (fast tokenizers, sentencepiece, WordPiece, byte-level BPE).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.txt", "vocab.json")
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json", "pytorch_model.bin.index.json")


def model_dir_problem(directory: Path) -> str | None:
    """Why ``directory`` cannot be a base model, in one sentence naming it; None when it looks usable."""
    if not directory.exists():
        return f"{directory} does not exist; give a local Hugging Face model directory, or unset it to use model.name"
    if not directory.is_dir():
        return f"{directory} is a file; give the Hugging Face model directory that holds it"
    config = directory / "config.json"
    if not config.is_file():
        return f"{directory} has no config.json: not a Hugging Face model directory"
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (ValueError, AttributeError, UnicodeDecodeError):
        model_type = None
    if not isinstance(model_type, str) or not model_type:
        return (
            f"{config} names no model_type: not a Hugging Face model config "
            "(write the directory with model.save_pretrained)"
        )
    if not any(next(directory.glob(pattern), None) for pattern in WEIGHT_PATTERNS):
        return f"{directory} has no weights (model.safetensors or pytorch_model.bin)"
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        return (
            f"{directory} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
            "save it beside the model with tokenizer.save_pretrained"
        )
    return None
