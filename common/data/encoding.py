"""Tokenise examples: for a classifier, or for generation with loss on the response only (see ``common/tasks``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedtune.common.data.shapes import Example

IGNORE_INDEX = -100
FALLBACK_PROMPT = "Question: {question}\nAnswer: "


@dataclass
class EncodedSet:
    """Token ids per example; ``labels`` holds a class id, or per-token targets with -100 on the prompt."""

    input_ids: list[list[int]]
    labels: list[Any]
    pad_token_id: int
    truncated: int = 0
    lengths: list[int] | None = None  # token counts before truncation, for the site's data report

    def __len__(self) -> int:
        return len(self.input_ids)

    def batch(self, indices: list[int] | torch.Tensor) -> dict[str, torch.Tensor]:
        """Right-padded tensors for the given rows."""
        idx = [int(i) for i in indices]
        width = max((len(self.input_ids[i]) for i in idx), default=1)
        ids = torch.full((len(idx), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        token_labels = bool(idx) and isinstance(self.labels[idx[0]], list)
        labels = (
            torch.full((len(idx), width), IGNORE_INDEX, dtype=torch.long)
            if token_labels
            else torch.zeros(len(idx), dtype=torch.long)
        )
        for row, i in enumerate(idx):
            seq = self.input_ids[i]
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
            if token_labels:
                labels[row, : len(seq)] = torch.tensor(self.labels[i])
            else:
                labels[row] = self.labels[i]
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def encode_classification(
    examples: list[Example], tokenizer: Any, labels: Sequence[str], max_length: int
) -> EncodedSet:
    label_ids = {name: i for i, name in enumerate(labels)}
    texts = [e.text for e in examples]
    lengths = [len(ids) for ids in tokenizer(texts)["input_ids"]] if texts else []
    enc = tokenizer(texts, truncation=True, max_length=max_length) if texts else {"input_ids": []}
    return EncodedSet(
        input_ids=[list(ids) for ids in enc["input_ids"]],
        labels=[label_ids[e.target] for e in examples],
        pad_token_id=tokenizer.pad_token_id,
        truncated=sum(n > max_length for n in lengths),
        lengths=lengths,
    )


def _prompt_ids(example: Example, text: str, tokenizer: Any) -> list[int]:
    """The prompt: raw text for prompt-completion, else the chat template (or a plain fallback)."""
    if not example.templated:
        return tokenizer(text)["input_ids"]
    turns = [*example.context, ("user", text)]
    if getattr(tokenizer, "chat_template", None):
        out = tokenizer.apply_chat_template(
            [{"role": r, "content": c} for r, c in turns], add_generation_prompt=True, tokenize=True
        )
        return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)
    history = "".join(f"{role.capitalize()}: {content}\n" for role, content in example.context)
    return tokenizer(history + FALLBACK_PROMPT.format(question=text))["input_ids"]


def _turn_end_id(tokenizer: Any) -> int:
    """The token that closes an assistant turn in the chat template (ChatML's ``<|im_end|>``), else EOS."""
    if getattr(tokenizer, "chat_template", None):
        im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
            return im_end
    return tokenizer.eos_token_id


def encode_instructions(examples: list[Example], tokenizer: Any, max_length: int) -> EncodedSet:
    """Prompt (through the chat template when the tokenizer has one) + response; loss on response tokens only.

    The user turn is cut to a quarter of the budget and the prompt to half (keeping its end,
    where the latest turn and the generation prompt are), so every example keeps response tokens.
    """
    input_ids, labels, lengths, truncated = [], [], [], 0
    turn_end = _turn_end_id(tokenizer)
    for e in examples:
        question_ids = tokenizer(e.text, add_special_tokens=False)["input_ids"]
        question = e.text
        if len(question_ids) > max_length // 4:
            question = tokenizer.decode(question_ids[: max_length // 4])
        full_prompt = _prompt_ids(e, question, tokenizer)
        prompt = full_prompt[-(max_length // 2) :]
        end = turn_end if e.templated else tokenizer.eos_token_id
        response = tokenizer(e.target, add_special_tokens=False)["input_ids"] + [end]
        seq = (prompt + response)[:max_length]
        full = len(full_prompt) - len(question_ids[: max_length // 4]) + len(question_ids) + len(response)
        lengths.append(full)
        truncated += full > max_length
        input_ids.append(seq)
        labels.append([IGNORE_INDEX] * len(prompt) + seq[len(prompt) :])
    return EncodedSet(
        input_ids=input_ids, labels=labels, pad_token_id=tokenizer.pad_token_id, truncated=truncated, lengths=lengths
    )
