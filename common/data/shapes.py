"""A training example, and the record cleaning every task shape shares.

The shapes themselves (which fields a record has, how they become an :class:`Example`)
are in ``common/tasks``. This module imports no config, so the task registry the config
validates against can build on it. ``Columns`` maps a role (``text``, ``answer``...) to
the column that holds it: ``[data.fields]`` in the config.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedtune.common.data.readers import RawRecord

Columns = Mapping[str, str]


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


_SPACES = re.compile(r"[^\S\n]+")
_BLANK_LINES = re.compile(r"\n{3,}")


def normalise_text(text: str, single_line: bool = False) -> str:
    """NFC, one space for any run of spaces/tabs, at most one blank line, no edge whitespace."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    if single_line:
        return " ".join(text.split())
    lines = [_SPACES.sub(" ", line).strip() for line in text.split("\n")]
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


class SkipRecord(Exception):
    """A record with nothing to learn from (empty after cleaning): dropped and counted, not an error."""


class BadRecord(Exception):
    """A malformed record; the message names the field."""


class UnknownLabel(BadRecord):
    """A record whose label is outside the agreed set; ``label`` is that label, for the site's summary."""

    def __init__(self, message: str, label: str) -> None:
        super().__init__(message)
        self.label = label


def raw_value(record: RawRecord, columns: Columns, role: str) -> Any:
    """The uncleaned value of ``role``'s column; a missing column is a malformed record that says what is there."""
    column = columns[role]
    if column not in record.fields:
        present = ", ".join(sorted(map(str, record.fields))) or "none"
        raise BadRecord(f"missing field {column!r} (data.fields.{role}); fields present: {present}")
    return record.fields[column]


def read_text(record: RawRecord, columns: Columns, role: str, single_line: bool = False, required: bool = True) -> str:
    """The cleaned text of ``role``'s column ("" when absent and not ``required``)."""
    column = columns[role]
    if column not in record.fields and not required:
        return ""
    value = raw_value(record, columns, role)
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise BadRecord(f"field {column!r}: expected text, got {type(value).__name__}")
    return normalise_text(str(value), single_line)
