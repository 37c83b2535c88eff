"""Read records from JSON Lines or CSV files into plain dicts, with errors that name file and line."""

from __future__ import annotations

import csv
import json
from pathlib import Path


class DataError(ValueError):
    """Input data that cannot be used; the message names the file, line and field."""


def read_records(path: Path, max_records: int = 0) -> list[dict[str, str]]:
    """Load ``.jsonl`` or ``.csv`` rows. ``max_records`` > 0 keeps only the first rows."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = _read_jsonl(path, max_records)
    elif suffix in (".csv", ".tsv"):
        rows = _read_csv(path, "\t" if suffix == ".tsv" else ",", max_records)
    else:
        raise DataError(f"{path}: unsupported file type {suffix!r}; expected .jsonl, .csv or .tsv")
    if not rows:
        raise DataError(f"{path}: no records found")
    return rows


def _read_jsonl(path: Path, max_records: int) -> list[dict[str, str]]:
    rows = []
    with path.open(encoding="utf-8-sig") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}, line {lineno}: invalid JSON ({exc.msg})") from exc
            if not isinstance(row, dict):
                raise DataError(f"{path}, line {lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
            if max_records and len(rows) >= max_records:
                break
    return rows


def _read_csv(path: Path, delimiter: str, max_records: int) -> list[dict[str, str]]:
    rows = []
    with path.open(newline="", encoding="utf-8-sig") as fh:
        for row in csv.DictReader(fh, delimiter=delimiter):
            rows.append(row)
            if max_records and len(rows) >= max_records:
                break
    return rows


def require_field(row: dict, field: str, path: Path | str, index: int) -> str:
    """Return ``row[field]`` as a non-empty string or raise a DataError naming the record."""
    value = row.get(field)
    if value is None:
        raise DataError(f"{path}, record {index + 1}: missing field {field!r} (fields present: {sorted(row)})")
    text = str(value).strip()
    if not text:
        raise DataError(f"{path}, record {index + 1}: field {field!r} is empty")
    return text
