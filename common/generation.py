"""Greedy completions of a causal LM, prompted exactly as training encoded its prompts.

The prompt of a record is the part of its training encoding that carries no loss (chat
template, system turn, truncation and all: ``common.data.encoding.encode_instructions``), so
what the model is asked here is what it learned to answer.
"""

from __future__ import annotations

from typing import Any

import torch

from fedtune.common.data.encoding import IGNORE_INDEX, encode_instructions
from fedtune.common.data.shapes import Example


def prompt_ids(example: Example, tokenizer: Any, max_length: int) -> list[int]:
    """The token ids of ``example``'s prompt, as training saw them (its target is ignored)."""
    encoded = encode_instructions([example], tokenizer, max_length)
    ids, labels = encoded.input_ids[0], encoded.labels[0]
    prompt_length = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(ids))
    return ids[:prompt_length]


def stop_token_ids(tokenizer: Any) -> list[int]:
    """EOS, and the token that closes an assistant turn in a ChatML template (what training ended responses with)."""
    stops = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if getattr(tokenizer, "chat_template", None):
        im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        if isinstance(im_end, int) and im_end != tokenizer.unk_token_id and im_end not in stops:
            stops.append(im_end)
    return stops


def complete(model: Any, tokenizer: Any, prompt: list[int], max_new_tokens: int) -> str:
    """The model's greedy continuation of ``prompt`` (token ids), decoded without special tokens."""
    was_training = model.training
    model.eval()
    try:
        ids = torch.tensor([prompt], dtype=torch.long, device=model.device)
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=stop_token_ids(tokenizer) or None,
                pad_token_id=tokenizer.pad_token_id,
            )
    finally:
        model.train(was_training)
    return tokenizer.decode(out[0, len(prompt) :], skip_special_tokens=True).strip()
