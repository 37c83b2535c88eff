"""Tokenise examples for a task: classification, or instruction tuning with loss on the response only."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from common.data.federation_data import Example

IGNORE_INDEX = -100
FALLBACK_PROMPT = "Question: {question}\nAnswer: "


@dataclass
class EncodedSet:
    """Token ids per example; ``labels`` holds a class id, or per-token targets with -100 on the prompt."""

    input_ids: list[list[int]]
    labels: list[Any]
    pad_token_id: int
    truncated: int = 0

    def __len__(self) -> int:
        return len(self.input_ids)

    def batch(self, indices: list[int] | torch.Tensor) -> dict[str, torch.Tensor]:
        """Right-padded tensors for the given rows."""
        idx = [int(i) for i in indices]
        width = max((len(self.input_ids[i]) for i in idx), default=1)
        ids = torch.full((len(idx), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        token_labels = bool(idx) and isinstance(self.labels[idx[0]], list)
        labels = torch.full((len(idx), width), IGNORE_INDEX, dtype=torch.long) if token_labels else torch.zeros(
            len(idx), dtype=torch.long
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


def encode_classification(examples: list[Example], tokenizer: Any, labels: list[str], max_length: int) -> EncodedSet:
    label_ids = {name: i for i, name in enumerate(labels)}
    enc = tokenizer([e.text for e in examples], truncation=True, max_length=max_length)
    truncated = sum(len(ids) >= max_length for ids in enc["input_ids"])
    return EncodedSet(
        input_ids=[list(ids) for ids in enc["input_ids"]],
        labels=[label_ids[e.target] for e in examples],
        pad_token_id=tokenizer.pad_token_id,
        truncated=truncated,
    )


def _prompt_ids(question: str, tokenizer: Any) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        out = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True
        )
        return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)
    return tokenizer(FALLBACK_PROMPT.format(question=question))["input_ids"]


def _response_ids(answer: str, tokenizer: Any) -> list[int]:
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    end = tokenizer.eos_token_id
    if getattr(tokenizer, "chat_template", None):
        end = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() else end
    return ids + [end]


def encode_instructions(examples: list[Example], tokenizer: Any, max_length: int) -> EncodedSet:
    """Prompt (through the chat template when the tokenizer has one) + response; loss on response tokens only.

    Questions are cut to half the budget so that every example keeps response tokens.
    """
    input_ids, labels, truncated = [], [], 0
    for e in examples:
        question_ids = tokenizer(e.text, add_special_tokens=False)["input_ids"]
        question = e.text
        if len(question_ids) > max_length // 4:
            question = tokenizer.decode(question_ids[: max_length // 4])
        prompt = _prompt_ids(question, tokenizer)[: max_length // 2]
        response = _response_ids(e.target, tokenizer)
        seq = (prompt + response)[:max_length]
        truncated += len(prompt) + len(response) > max_length
        input_ids.append(seq)
        labels.append([IGNORE_INDEX] * len(prompt) + seq[len(prompt):])
    return EncodedSet(input_ids=input_ids, labels=labels, pad_token_id=tokenizer.pad_token_id, truncated=truncated)


def encode_examples(examples: list[Example], tokenizer: Any, task: str, labels: list[str], max_length: int) -> EncodedSet:
    if task == "classification":
        return encode_classification(examples, tokenizer, labels, max_length)
    return encode_instructions(examples, tokenizer, max_length)
