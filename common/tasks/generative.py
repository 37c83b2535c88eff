"""The generative shapes: four ways a record holds a prompt and the response to learn, one way of learning it.

``question-answer`` (MedQuAD-like) and ``instruction`` (Alpaca-like; ``input`` is appended when
present) go through the tokenizer's chat template; ``prompt-completion`` is raw continuation;
``chat`` is a list of role/content messages whose last assistant turn is learned. All four
share :data:`GENERATOR`: instruction encoding, per-record causal-LM loss, loss/perplexity.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedtune.common.data.readers import RawRecord
from fedtune.common.data.shapes import BadRecord, Columns, Example, SkipRecord, normalise_text, raw_value, read_text
from fedtune.common.tasks.base import TaskShape

if TYPE_CHECKING:
    import torch

    from fedtune.common.data.encoding import EncodedSet

CHAT_ROLES = ("system", "user", "assistant")


class GeneratorHead:
    """A causal LM tuned on the response tokens only, judged by held-out loss."""

    classifies = False
    peft_task_type = "CAUSAL_LM"
    headline_metric = "loss"
    higher_is_better = False

    def encode(self, examples: list[Example], tokenizer: Any, labels: Sequence[str], max_length: int) -> EncodedSet:
        from fedtune.common.data.encoding import encode_instructions

        return encode_instructions(examples, tokenizer, max_length)

    def per_sample_loss(self, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        from fedtune.common.losses import forward_logits, per_sample_causal_lm_loss

        return per_sample_causal_lm_loss(forward_logits(model, batch), batch["labels"])[0]

    def evaluate(self, model: Any, data: EncodedSet, batch_size: int) -> dict[str, float]:
        from fedtune.common.evaluation import evaluate_generator

        return evaluate_generator(model, data, batch_size)

    def load_model(self, directory: Path, dtype: Any, labels: Sequence[str], pooling: str) -> Any:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)


def _example(
    text: str, target: str, group: str, context: tuple[tuple[str, str], ...] = (), templated: bool = True
) -> Example:
    if not text or not target:
        raise SkipRecord
    return Example(text, target, group, context, templated)


def _system(record: RawRecord, columns: Columns) -> tuple[tuple[str, str], ...]:
    """The per-record system prompt of ``data.fields.system``, as chat context (none when unset or empty)."""
    if not columns.get("system"):
        return ()
    system = read_text(record, columns, "system", required=False)
    return (("system", system),) if system else ()


def _question_answer(record: RawRecord, columns: Columns, labels: Sequence[str], group: str) -> Example:
    text, target = read_text(record, columns, "question"), read_text(record, columns, "answer")
    return _example(text, target, group, _system(record, columns))


def _instruction(record: RawRecord, columns: Columns, labels: Sequence[str], group: str) -> Example:
    instruction = read_text(record, columns, "instruction")
    extra = read_text(record, columns, "input", required=False)
    text = f"{instruction}\n\n{extra}" if instruction and extra else instruction
    return _example(text, read_text(record, columns, "output"), group, _system(record, columns))


def _prompt_completion(record: RawRecord, columns: Columns, labels: Sequence[str], group: str) -> Example:
    text, target = read_text(record, columns, "prompt"), read_text(record, columns, "completion")
    return _example(text, target, group, _system(record, columns), templated=False)


def _messages(value: Any, column: str) -> list[tuple[str, str]]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise BadRecord(f"field {column!r}: not a JSON list of messages ({exc.msg})") from None
    if not isinstance(value, list) or not value:
        raise BadRecord(f'field {column!r}: expected a non-empty list of {{"role": ..., "content": ...}} messages')
    turns = []
    for i, msg in enumerate(value, start=1):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str) or not isinstance(msg.get("content"), str):
            raise BadRecord(f'field {column!r}, message {i}: expected {{"role": str, "content": str}}')
        if msg["role"] not in CHAT_ROLES:
            raise BadRecord(
                f"field {column!r}, message {i}: role {msg['role']!r} is not one of {', '.join(CHAT_ROLES)}"
            )
        turns.append((msg["role"], normalise_text(msg["content"])))
    return turns


def _chat(record: RawRecord, columns: Columns, labels: Sequence[str], group: str) -> Example:
    """The last assistant turn is learned, the user turn before it is the prompt, earlier turns are context."""
    column = columns["messages"]
    turns = [t for t in _messages(raw_value(record, columns, "messages"), column) if t[1]]
    if not turns:
        raise SkipRecord
    if turns[-1][0] != "assistant":
        raise BadRecord(
            f"field {column!r}: the last message must be the assistant's (the reply to learn), got {turns[-1][0]!r}"
        )
    if len(turns) < 2 or turns[-2][0] != "user":
        raise BadRecord(f"field {column!r}: the assistant's last reply must follow a user message")
    return _example(turns[-2][1], turns[-1][1], group, tuple(turns[:-2]))


GENERATOR = GeneratorHead()
CHAT = TaskShape("chat", ("messages",), _chat, GENERATOR)
PROMPT_COMPLETION = TaskShape("prompt-completion", ("prompt", "completion"), _prompt_completion, GENERATOR)
QUESTION_ANSWER = TaskShape("question-answer", ("question", "answer"), _question_answer, GENERATOR)
INSTRUCTION = TaskShape("instruction", ("instruction", "output"), _instruction, GENERATOR)
