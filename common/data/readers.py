"""Read a site's files into raw records, whatever tabular or JSON format they come in.

Formats: JSON Lines, a JSON array of objects, CSV/TSV or any delimiter ``csv.Sniffer`` can
tell (with or without a header), Parquet, and a folder of such files. Text must be UTF-8
(a BOM is fine). Every record keeps where it came from, so any later complaint can name
the file and line (or Parquet row). Problems with the file as a whole raise
:class:`DataError`; problems with one record are returned as :class:`RecordProblem` so
that ``fedtune data check`` can list several of them at once.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

FileFormat = Literal["auto", "jsonl", "json", "csv", "parquet"]
HeaderMode = Literal["auto", "yes", "no"]

SUFFIX_FORMATS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "csv",
    ".tab": "csv",
    ".txt": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}
SNIFF_DELIMITERS = ",\t;|"
SNIFF_BYTES = 64 * 1024


class DataError(ValueError):
    """Input data that cannot be used; the message names the file, line and field."""


@dataclass(frozen=True)
class RawRecord:
    """One record as read, before any task mapping: ``where`` is e.g. ``train.csv, line 12``."""

    where: str
    fields: dict[str, Any]


@dataclass(frozen=True)
class RecordProblem:
    """A record that cannot be used, and why; the message starts with its location."""

    message: str


@dataclass(frozen=True)
class ReadOptions:
    """How to read files; ``expected_fields`` lets header detection look for the mapped columns."""

    file_format: FileFormat = "auto"
    header: HeaderMode = "auto"
    delimiter: str = ""
    column_names: tuple[str, ...] = ()
    max_record_bytes: int = 1_000_000
    expected_fields: tuple[str, ...] = ()


_DEFAULT_OPTIONS = ReadOptions()  # shared as a default argument: it is frozen


@dataclass(frozen=True)
class FileSummary:
    path: Path
    file_format: str
    records: int
    detail: str = ""


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def data_files(path: Path) -> tuple[list[Path], list[Path]]:
    """The readable files at ``path`` (itself, or every supported file under a folder) and the ones skipped."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder; check data.path (or the PATH you gave)")
    if path.is_file():
        return [path], []
    found: list[Path] = []
    skipped: list[Path] = []
    for child in sorted(path.rglob("*")):
        if child.is_dir() or any(part.startswith(".") for part in child.relative_to(path).parts):
            continue
        (found if child.suffix.lower() in SUFFIX_FORMATS else skipped).append(child)
    if not found:
        raise DataError(
            f"{path}: folder holds no data files; expected files ending in {', '.join(sorted(SUFFIX_FORMATS))}"
        )
    return found, skipped


def _decode(path: Path, raw: bytes) -> str:
    """UTF-8 text, or a DataError saying what the bytes look like and what to do."""
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise DataError(f"{path}: file is UTF-16 encoded; re-save it as UTF-8 (e.g. `iconv -f UTF-16 -t UTF-8`)")
    nul = raw.find(b"\x00", 0, SNIFF_BYTES)
    if nul >= 0:
        raise DataError(
            f"{path}: looks like a binary file, not text (NUL byte at offset {nul}); "
            "expected UTF-8 JSON Lines, JSON, CSV/TSV, or a .parquet file"
        )
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DataError(
            f"{path}, line {line}: not UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
            "re-save the file as UTF-8, e.g. `iconv -f LATIN1 -t UTF-8 in.csv > out.csv`"
        ) from None


def _oversized(where: str, fields: dict[str, Any], limit: int) -> RecordProblem | None:
    for name, value in fields.items():
        size = len(value) if isinstance(value, str | bytes) else 0
        if size > limit:
            return RecordProblem(
                f"{where}, field {name!r}: value is {_mb(size)}, over the {_mb(limit)} limit per record "
                "(data.max_record_bytes); remove or shorten it"
            )
    return None


def _read_jsonl(path: Path, text: str, opts: ReadOptions) -> Iterator[RawRecord | RecordProblem]:
    for lineno, line in enumerate(text.split("\n"), start=1):  # not splitlines(): U+2028 is valid inside JSON strings
        if not line.strip():
            continue
        where = f"{path}, line {lineno}"
        if len(line) > max(opts.max_record_bytes * 64, 64_000_000):
            yield RecordProblem(
                f"{where}: line is {_mb(len(line))}, over the {_mb(opts.max_record_bytes)} "
                "limit per record (data.max_record_bytes)"
            )
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            yield RecordProblem(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})")
            continue
        if not isinstance(row, dict):
            yield RecordProblem(f"{where}: expected a JSON object {{...}}, got {type(row).__name__}")
            continue
        yield _oversized(where, row, opts.max_record_bytes) or RawRecord(where, row)


def _read_json_array(path: Path, text: str, opts: ReadOptions) -> Iterator[RawRecord | RecordProblem]:
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}, line {exc.lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
    if isinstance(rows, dict):
        yield _oversized(f"{path}, line 1", rows, opts.max_record_bytes) or RawRecord(f"{path}, line 1", rows)
        return
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON array of objects, got {type(rows).__name__}")
    # Locate each element's line cheaply: elements are objects, so each starts at a "{".
    starts, pos = [], text.find("[") + 1
    decoder = json.JSONDecoder()
    line, last = 1, 0
    for _ in rows:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        line += text.count("\n", last, pos)
        last = pos
        starts.append(line)
        try:
            pos = decoder.raw_decode(text, pos)[1]
        except json.JSONDecodeError:
            break
    for i, row in enumerate(rows):
        where = f"{path}, element {i + 1} (line {starts[i] if i < len(starts) else '?'})"
        if not isinstance(row, dict):
            yield RecordProblem(f"{where}: expected a JSON object {{...}}, got {type(row).__name__}")
            continue
        yield _oversized(where, row, opts.max_record_bytes) or RawRecord(where, row)


def _dialect(delimiter: str) -> type[csv.Dialect]:
    """RFC 4180 quoting (``"`` quotes, doubled to escape) with the given delimiter."""
    return type("Delimited", (csv.excel,), {"delimiter": delimiter})


def _sniff(path: Path, text: str, opts: ReadOptions) -> type[csv.Dialect]:
    """The delimiter from config or ``csv.Sniffer``; quoting is not sniffed, it guesses it wrong too often."""
    if opts.delimiter:
        return _dialect(opts.delimiter)
    sample = text[:SNIFF_BYTES]
    try:
        return _dialect(csv.Sniffer().sniff(sample, delimiters=SNIFF_DELIMITERS).delimiter)
    except csv.Error:
        if path.suffix.lower() in (".tsv", ".tab"):
            return _dialect("\t")
        if "\n" not in sample.strip() or path.suffix.lower() == ".csv":
            return _dialect(",")  # one column, or nothing to tell: the extension decides
        raise DataError(f"{path}: cannot tell the delimiter (tried {SNIFF_DELIMITERS!r}); set data.delimiter") from None


def _has_header(first: list[str], text: str, opts: ReadOptions) -> bool:
    if opts.header != "auto":
        return opts.header == "yes"
    if set(opts.expected_fields) & {c.strip() for c in first}:
        return True
    try:
        return csv.Sniffer().has_header(text[:SNIFF_BYTES])
    except csv.Error:
        return False


def _require_columns(path: Path, columns: list[str], opts: ReadOptions, what: str) -> None:
    """Every record of a table has the same columns, so a missing one is one error for the whole file."""
    missing = [f for f in opts.expected_fields if f not in columns]
    if missing:
        raise DataError(
            f"{path}, line 1: no column {', '.join(map(repr, missing))} in {what}; columns: "
            f"{', '.join(columns)}. Map the right columns in [data.fields]"
        )


def _read_delimited(path: Path, text: str, opts: ReadOptions) -> Iterator[RawRecord | RecordProblem]:
    dialect = _sniff(path, text, opts)
    csv.field_size_limit(max(opts.max_record_bytes * 64, 64_000_000))  # oversize is reported per field below
    reader = csv.reader(io.StringIO(text, newline=""), dialect)
    line_start, header = 1, None
    try:
        for row in reader:
            where, line_start = f"{path}, line {line_start}", reader.line_num + 1
            if not row or not any(cell.strip() for cell in row):
                continue
            if header is None:
                if _has_header(row, text, opts):
                    header = [c.strip() for c in row]
                    dupes = sorted({c for c in header if header.count(c) > 1})
                    if dupes:
                        raise DataError(f"{path}, line 1: duplicate column names {dupes} in the header")
                    _require_columns(path, header, opts, "the header")
                    continue
                header = list(opts.column_names) or [str(i) for i in range(1, len(row) + 1)]
                _require_columns(
                    path,
                    header,
                    opts,
                    "this header-less file (columns are named 1, 2, ... unless data.column_names names them)",
                )
            if len(row) != len(header):
                yield RecordProblem(
                    f"{where}: {len(row)} columns, but the header has {len(header)} "
                    f"({', '.join(header)}); check quoting and the delimiter {dialect.delimiter!r}"
                )
                continue
            fields = dict(zip(header, row, strict=True))
            yield _oversized(where, fields, opts.max_record_bytes) or RawRecord(where, fields)
    except csv.Error as exc:
        raise DataError(f"{path}, line {reader.line_num}: cannot parse as delimited text ({exc})") from None


def _read_parquet(path: Path, opts: ReadOptions) -> Iterator[RawRecord | RecordProblem]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    missing = [f for f in opts.expected_fields if f not in table.schema_arrow.names]
    if missing:
        raise DataError(
            f"{path}: no column {', '.join(map(repr, missing))}; columns: "
            f"{', '.join(table.schema_arrow.names)}. Map the right columns in [data.fields]"
        )
    row = 0
    for batch in table.iter_batches(batch_size=4096):
        for fields in batch.to_pylist():
            row += 1
            where = f"{path}, row {row}"
            yield _oversized(where, fields, opts.max_record_bytes) or RawRecord(where, fields)


def detect_format(path: Path, opts: ReadOptions) -> str:
    if opts.file_format != "auto":
        return opts.file_format
    fmt = SUFFIX_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(
            f"{path}: unknown file type {path.suffix!r}; expected one of "
            f"{', '.join(sorted(SUFFIX_FORMATS))} or set data.format"
        )
    return fmt


def read_file(path: Path, opts: ReadOptions) -> Iterator[RawRecord | RecordProblem]:
    """Records and per-record problems of one file; file-level problems raise DataError."""
    fmt = detect_format(path, opts)
    if fmt == "parquet":
        yield from _read_parquet(path, opts)
        return
    raw = path.read_bytes()
    if raw[:4] == b"PAR1":
        raise DataError(f'{path}: this is a Parquet file; name it .parquet or set data.format = "parquet"')
    text = _decode(path, raw)
    if not text.strip():
        raise DataError(f"{path}: file is empty")
    if fmt == "json":
        fmt = "json" if text.lstrip().startswith("[") else "jsonl"
    if fmt == "jsonl":
        yield from _read_jsonl(path, text, opts)
    elif fmt == "json":
        yield from _read_json_array(path, text, opts)
    else:
        yield from _read_delimited(path, text, opts)


def read_raw(
    path: Path, opts: ReadOptions = _DEFAULT_OPTIONS
) -> tuple[list[RawRecord], list[RecordProblem], list[FileSummary]]:
    """Every record under ``path`` (a file or a folder), the problems found, and a summary per file."""
    files, skipped = data_files(path)
    records: list[RawRecord] = []
    problems: list[RecordProblem] = []
    summaries: list[FileSummary] = []
    for file in files:
        before, problems_before = len(records), len(problems)
        for item in read_file(file, opts):
            if isinstance(item, RawRecord):
                records.append(item)
            else:
                problems.append(item)
        if len(records) == before and len(problems) == problems_before:
            raise DataError(f"{file}: no records found (only a header, or blank lines)")
        summaries.append(FileSummary(file, detect_format(file, opts), len(records) - before))
    summaries += [FileSummary(f, "skipped", 0, "not a data file type") for f in skipped]
    return records, problems, summaries
