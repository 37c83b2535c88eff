"""Task shapes: which fields of a raw record make one training example, and how they are cleaned.

Five shapes cover what sites bring: ``classification`` (text + label), ``prompt-completion``
(raw continuation, no chat template), ``question-answer`` (MedQuAD-like), ``instruction``
(Alpaca-like instruction/input/output) and ``chat`` (a list of role/content messages; the
last assistant turn is learned). ``FieldMap`` (``[data.fields]`` in the config) names the
column that holds each part.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass
from typing import Any, get_args

from fedtune.common.config import DataTask, FieldMap
from fedtune.common.data.readers import RawRecord, RecordProblem

DATA_TASKS: tuple[str, ...] = get_args(DataTask)
CHAT_ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Example:
    """One training record after mapping and cleaning.

    ``text`` is the classifier input, the raw prompt (prompt-completion) or the user turn;
    ``target`` is the label name or the response to learn; ``context`` holds earlier chat
    turns as ``(role, content)``; ``templated`` is False for raw prompt-completion text.
    """

    text: str
    target: str
    group: str = ""
    context: tuple[tuple[str, str], ...] = ()
    templated: bool = True

    @property
    def key(self) -> tuple:
        """What makes two records exact duplicates."""
        return (self.context, self.text, self.target)


def required_roles(task: str) -> tuple[str, ...]:
    """The FieldMap roles a task reads; ``instruction`` also reads ``input`` when the column exists."""
    return {
        "classification": ("text", "label"),
        "prompt-completion": ("prompt", "completion"),
        "question-answer": ("question", "answer"),
        "instruction": ("instruction", "output"),
        "chat": ("messages",),
    }[task]


_SPACES = re.compile(r"[^\S\n]+")
_BLANK_LINES = re.compile(r"\n{3,}")


def normalise_text(text: str, single_line: bool = False) -> str:
    """NFC, one space for any run of spaces/tabs, at most one blank line, no edge whitespace."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    if single_line:
        return " ".join(text.split())
    lines = [_SPACES.sub(" ", line).strip() for line in text.split("\n")]
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


class _Skip(Exception):
    """A record with nothing to learn from (empty after cleaning): dropped and counted, not an error."""


class _Bad(Exception):
    """A malformed record; the message names the field."""


def _field(record: RawRecord, column: str, role: str, single_line: bool = False, required: bool = True) -> str:
    if column not in record.fields:
        if not required:
            return ""
        present = ", ".join(sorted(map(str, record.fields))) or "none"
        raise _Bad(f"missing field {column!r} (data.fields.{role}); fields present: {present}")
    value = record.fields[column]
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise _Bad(f"field {column!r}: expected text, got {type(value).__name__}")
    return normalise_text(str(value), single_line)


def resolve_label(value: Any, column: str, labels: list[str]) -> str:
    """A label given by name, or by 0-based index into the agreed label list."""
    if isinstance(value, bool):
        raise _Bad(f"field {column!r}: expected a label name or index, got a boolean")
    if isinstance(value, str):
        name = normalise_text(value, single_line=True)
        if name in labels:
            return name
        if not name:
            raise _Skip
        if re.fullmatch(r"\d+", name):
            value = int(name)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int):
        if 0 <= value < len(labels):
            return labels[value]
        raise _Bad(f"field {column!r}: label index {value} is outside the agreed label set (0..{len(labels) - 1})")
    if value is None:
        raise _Skip
    shown = repr(value) if len(repr(value)) < 80 else repr(value)[:77] + "...'"
    raise _Bad(f"field {column!r}: label {shown} is not in the agreed label set ({len(labels)} labels, "
               "from data.labels or data.labels_file)")


def _messages(value: Any, column: str) -> list[tuple[str, str]]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise _Bad(f"field {column!r}: not a JSON list of messages ({exc.msg})") from None
    if not isinstance(value, list) or not value:
        raise _Bad(f"field {column!r}: expected a non-empty list of {{\"role\": ..., \"content\": ...}} messages")
    turns = []
    for i, msg in enumerate(value, start=1):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str) or not isinstance(msg.get("content"), str):
            raise _Bad(f"field {column!r}, message {i}: expected {{\"role\": str, \"content\": str}}")
        if msg["role"] not in CHAT_ROLES:
            raise _Bad(f"field {column!r}, message {i}: role {msg['role']!r} is not one of {', '.join(CHAT_ROLES)}")
        turns.append((msg["role"], normalise_text(msg["content"])))
    return turns


def _chat(record: RawRecord, column: str) -> tuple[str, str, tuple[tuple[str, str], ...]]:
    if column not in record.fields:
        present = ", ".join(sorted(map(str, record.fields))) or "none"
        raise _Bad(f"missing field {column!r} (data.fields.messages); fields present: {present}")
    turns = [t for t in _messages(record.fields[column], column) if t[1]]
    if not turns:
        raise _Skip
    if turns[-1][0] != "assistant":
        raise _Bad(f"field {column!r}: the last message must be the assistant's (the reply to learn), "
                   f"got {turns[-1][0]!r}")
    if len(turns) < 2 or turns[-2][0] != "user":
        raise _Bad(f"field {column!r}: the assistant's last reply must follow a user message")
    return turns[-2][1], turns[-1][1], tuple(turns[:-2])


def to_example(
    record: RawRecord, task: str, fields: FieldMap, labels: list[str], group_field: str = ""
) -> Example | RecordProblem | None:
    """The example in ``record``, None if it is empty after cleaning, or a RecordProblem if malformed."""
    try:
        group = str(record.fields.get(group_field, "")) if group_field else ""
        if task == "classification":
            text = _field(record, fields.text, "text", single_line=True)
            if fields.label not in record.fields:
                _field(record, fields.label, "label")
            target = resolve_label(record.fields[fields.label], fields.label, labels)
            if not text:
                raise _Skip
            return Example(text, target, group or target)
        context: tuple[tuple[str, str], ...] = ()
        if task == "chat":
            text, target, context = _chat(record, fields.messages)
        elif task == "instruction":
            instruction = _field(record, fields.instruction, "instruction")
            extra = _field(record, fields.input, "input", required=False)
            text = f"{instruction}\n\n{extra}" if instruction and extra else instruction
            target = _field(record, fields.output, "output")
        elif task == "question-answer":
            text, target = _field(record, fields.question, "question"), _field(record, fields.answer, "answer")
        else:
            text, target = _field(record, fields.prompt, "prompt"), _field(record, fields.completion, "completion")
        if fields.system and task != "chat":
            system = _field(record, fields.system, "system", required=False)
            context = (("system", system),) if system else ()
        if not text or not target:
            raise _Skip
        return Example(text, target, group, context, templated=task != "prompt-completion")
    except _Skip:
        return None
    except _Bad as exc:
        return RecordProblem(f"{record.where}, {exc}")
