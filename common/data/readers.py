"""Read a site's files into raw records, whatever tabular or JSON format they come in.

Formats: JSON Lines, a JSON array of objects, CSV/TSV or any delimiter ``csv.Sniffer`` can
tell (with or without a header), Parquet, and a folder of such files. Text must be UTF-8
(a BOM is fine). Every record keeps where it came from, so any later complaint can name
the file and line (or Parquet row). Problems with the file as a whole raise
:class:`DataError`; problems with one record are returned as :class:`RecordProblem` so
that ``fedtune data check`` can list several of them at once; what a reader decided about
a whole file (header or not, quoting, fewer records than lines) comes as a :class:`FileNote`,
so that no record is merged, dropped or renamed without the site being told.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

FileFormat = Literal["auto", "jsonl", "json", "csv", "tsv", "parquet"]
HeaderMode = Literal["auto", "yes", "no"]
QuotingMode = Literal["auto", "none", "csv"]
FORMATS = ("jsonl", "json", "csv", "tsv", "parquet")

SUFFIX_FORMATS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".txt": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}
SNIFF_DELIMITERS = ",\t;|"
SNIFF_BYTES = 64 * 1024


class DataError(ValueError):
    """Input data that cannot be used; the message names the file, line and field."""


class DataUsageError(DataError):
    """The read settings do not fit the file (unknown type, delimiter, column names): fix the config, not the data."""


@dataclass(frozen=True)
class RawRecord:
    """One record as read, before any task mapping: ``where`` is e.g. ``train.csv, line 12``."""

    where: str
    fields: dict[str, Any]


@dataclass(frozen=True)
class RecordProblem:
    """A record that cannot be used, and why; the message starts with its location.

    ``label`` is the record's label when the problem is only that it is outside the agreed set.
    """

    message: str
    label: str | None = None


@dataclass(frozen=True)
class FileNote:
    """What a reader decided or noticed about a whole file; a ``warning`` may mean records were misread."""

    message: str
    warning: bool = False


@dataclass(frozen=True)
class ReadOptions:
    """How to read files; ``expected_fields`` lets header detection look for the mapped columns."""

    file_format: FileFormat = "auto"
    header: HeaderMode = "auto"
    delimiter: str = ""
    quoting: QuotingMode = "auto"
    column_names: tuple[str, ...] = ()
    max_record_bytes: int = 1_000_000
    expected_fields: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()  # the agreed labels: a first row holding one is data, not a header


_DEFAULT_OPTIONS = ReadOptions()  # shared as a default argument: it is frozen


@dataclass(frozen=True)
class FileSummary:
    path: Path
    file_format: str
    records: int
    detail: str = ""
    notes: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()


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


def _dialect(delimiter: str, quoted: bool = True) -> type[csv.Dialect]:
    """RFC 4180 quoting (``"`` quotes, doubled to escape) with the given delimiter, or no quoting at all."""
    attrs: dict[str, Any] = {"delimiter": delimiter}
    if not quoted:
        attrs["quoting"] = csv.QUOTE_NONE
    return type("Delimited", (csv.excel,), attrs)


def _delimiter(path: Path, text: str, opts: ReadOptions, fmt: str) -> str:
    """data.delimiter; a tab for TSV; the one that splits the first line into the mapped columns; else sniffed.

    Only the delimiter is sniffed: ``csv.Sniffer`` guesses quoting wrong too often.
    """
    if opts.delimiter:
        return opts.delimiter
    if fmt == "tsv":
        return "\t"
    first_line = text.lstrip("\r\n").split("\n", 1)[0].rstrip("\r")
    wanted = {f for f in opts.expected_fields if not f.isdigit()}
    for candidate in SNIFF_DELIMITERS if wanted else "":
        if wanted <= {c.strip().strip('"') for c in first_line.split(candidate)}:
            return candidate
    sample = text[:SNIFF_BYTES]
    try:
        return csv.Sniffer().sniff(sample, delimiters=SNIFF_DELIMITERS).delimiter
    except csv.Error:
        if "\n" not in sample.strip() or path.suffix.lower() == ".csv":
            return ","  # one column, or nothing to tell: the extension decides
        raise DataUsageError(
            f"{path}: cannot tell the delimiter (tried {SNIFF_DELIMITERS!r}); set data.delimiter"
        ) from None


@dataclass(frozen=True)
class _Row:
    """One parsed row and the physical lines it spans (more than one when a quoted field holds line breaks)."""

    first: int
    last: int
    cells: list[str]


def _blank_line(line: str, delimiter: str) -> bool:
    return delimiter not in line and not line.strip()


def _blank(row: _Row, lines: list[str], delimiter: str) -> bool:
    """A blank line of the file (skipped), as opposed to a record whose cells are blank (kept, and counted)."""
    return not row.cells or (row.first == row.last and _blank_line(lines[row.first - 1], delimiter))


def _parse(path: Path, text: str, delimiter: str, quoted: bool) -> list[_Row]:
    try:
        reader = csv.reader(io.StringIO(text, newline=""), _dialect(delimiter, quoted))
    except (TypeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot read with delimiter {delimiter!r} ({exc}); set data.delimiter") from None
    rows, start = [], 1
    try:
        for cells in reader:
            rows.append(_Row(start, reader.line_num, cells))
            start = reader.line_num + 1
    except csv.Error as exc:
        raise DataError(f"{path}, line {start}: cannot parse as delimited text ({exc})") from None
    return rows


def _ends_in_quotes(chunk: str, delimiter: str) -> bool:
    """Whether a quote opened in ``chunk`` is still open at its end (the reader's own rules, non-strict)."""
    state, i = "start", 0
    while i < len(chunk):
        c = chunk[i]
        if state == "quoted":
            if c == '"':
                if chunk[i + 1 : i + 2] == '"':
                    i += 1
                else:
                    state = "field"
        elif c == delimiter or c in "\r\n":
            state = "start"
        elif state == "start":
            state = "quoted" if c == '"' else "field"
        i += 1
    return state == "quoted"


def _line_ranges(rows: list[_Row], limit: int = 5) -> str:
    shown = [f"{r.first}-{r.last}" if r.last > r.first else str(r.first) for r in rows[:limit]]
    more = f" and {len(rows) - limit} more" if len(rows) > limit else ""
    return ("lines " if len(rows) > 1 or rows[0].last > rows[0].first else "line ") + ", ".join(shown) + more


def _rows(
    path: Path, text: str, lines: list[str], delimiter: str, opts: ReadOptions
) -> tuple[list[_Row], list[FileNote]]:
    """The file's rows under data.quoting; ``auto`` reads it unquoted when a quote would swallow whole rows.

    A quote that opens a field and closes lines later (or never) turns the rows in between into
    one field; when every line of the file is a clean row without quoting, and no cell is quoted
    whole, that is what was meant.
    """
    if opts.quoting == "none":
        return _parse(path, text, delimiter, quoted=False), []
    rows = _parse(path, text, delimiter, quoted=True)
    last = rows[-1] if rows else None
    unclosed = last is not None and _ends_in_quotes("".join(lines[last.first - 1 :]), delimiter)
    spans = [r for r in rows if r.last > r.first]
    if opts.quoting == "auto" and (spans or unclosed):
        plain = _parse(path, text, delimiter, quoted=False)
        widths = {len(r.cells) for r in plain if not _blank(r, lines, delimiter)}
        # A cell quoted whole ("like this") means the file does use quoting; then the quoted reading stands.
        wrapped = any(len(c) >= 2 and c[0] == c[-1] == '"' for r in plain for c in r.cells)
        if len(widths) == 1 and min(widths) >= 2 and not wrapped:
            where = _line_ranges(spans or [r for r in rows[-1:]])
            return plain, [
                FileNote(
                    f"{path}, {where}: a quote opens a field and closes only lines later (or never), which would "
                    f"make whole rows one field; read the file without quoting instead (every line then has "
                    f"{min(widths)} columns; quotes stay as text). If those lines really are one record, set "
                    'data.quoting = "csv"',
                    warning=True,
                )
            ]
    if unclosed and last is not None:
        raise DataError(
            f"{path}, line {last.first}: a quoted field opens in this record and never closes (it would run to "
            'the end of the file); close the quote, or set data.quoting = "none" if quotes are ordinary text here'
        )
    return rows, []


_NUMBER = re.compile(r"[-+]?(\d[\d,_]*(\.\d*)?|\.\d+)([eE][-+]?\d+)?%?")
_NAME = re.compile(r"[^\W\d][\w .()/#-]{0,39}")  # what a column name looks like: short, starts with a letter
HEADER_SAMPLE = 1000  # rows weighed against the first one


def _is_number(value: str) -> bool:
    return bool(_NUMBER.fullmatch(value))


def _header_evidence(first: list[str], rest: list[list[str]], labels: set[str]) -> tuple[list, list]:
    """Weighted reasons to read the first row as a header, and as data."""
    header: list[tuple[int, str]] = []
    data: list[tuple[int, str]] = []
    agreed = [c for c in first if c in labels]
    if agreed:
        data.append((3, f"{agreed[0]!r} is one of the agreed labels"))
    twice = [c for c in first if c and first.count(c) > 1]
    if twice:
        data.append((2, f"{twice[0]!r} appears twice in it"))
    if any(not c for c in first):
        data.append((1, "it has an empty cell"))
    if all(_NAME.fullmatch(c) for c in first) and not twice:
        header.append((1, "every cell is short like a column name"))
    for j, value in enumerate(first):
        column = [row[j].strip() for row in rest if len(row) > j]
        if not column or not value:
            continue
        name = f"column {j + 1}"
        numeric = sum(map(_is_number, column)) / len(column)
        if _is_number(value):
            data.append((2 if numeric >= 0.9 else 1, f"{value!r} in {name} is a number"))
        elif numeric >= 0.9:
            header.append((2, f"{name} holds numbers below the text {value!r}"))
        distinct = set(column)
        if value in distinct:
            data.append((2, f"{value!r} recurs in {name}"))
        elif len(column) >= 5 and len(distinct) <= max(2, len(column) // 10):
            header.append((2, f"{value!r} is not among the {len(distinct)} values that recur in {name}"))
        lengths = sorted(len(c) for c in column)
        if _NAME.fullmatch(value) and lengths[len(lengths) // 2] >= max(20, 3 * len(value)):
            header.append((1, f"{value!r} is short like a name and {name}'s values are long"))
        elif len(value) > 40 or len(value.split()) > 4:
            data.append((1, f"{value[:24]!r}... in {name} reads like a value, not a column name"))
    return header, data


def _decide_header(first: list[str], rest: list[list[str]], opts: ReadOptions) -> tuple[bool, str, bool]:
    """Whether the first row names the columns, the reason (said to the user), and whether that is certain."""
    if opts.header != "auto":
        return opts.header == "yes", f'data.header = "{opts.header}"', True
    if opts.column_names:
        return False, "data.column_names names the columns", True
    cells = [c.strip() for c in first]
    named = [f for f in opts.expected_fields if f in cells and not f.isdigit()]
    if named:
        return True, f"it holds {', '.join(map(repr, named))} of [data.fields]", True
    if opts.expected_fields and all(f.isdigit() for f in opts.expected_fields):
        return False, "[data.fields] names the columns by position (1, 2, ...)", True
    header, data = _header_evidence(cells, rest, set(opts.labels))
    is_header = sum(w for w, _ in header) > sum(w for w, _ in data)
    reasons = sorted(header if is_header else data, key=lambda wr: -wr[0])[:3]
    return is_header, "; ".join(r for _, r in reasons) or "no sign either way", False


def _header_note(path: Path, is_header: bool, why: str) -> str:
    if is_header:
        return f'{path}: header: the first row names the columns ({why}); if it is data, set data.header = "no"'
    return f'{path}: no header: the first row is data ({why}); if it names the columns, set data.header = "yes"'


def _require_columns(path: Path, columns: list[str], opts: ReadOptions, what: str, hint: str = "") -> None:
    """Every record of a table has the same columns, so a missing one is one error for the whole file."""
    missing = [f for f in opts.expected_fields if f not in columns]
    if missing:
        raise DataError(
            f"{path}, line 1: no column {', '.join(map(repr, missing))} in {what}; columns: "
            f"{', '.join(columns)}. Map the right columns in [data.fields]{hint}"
        )


def _swallows_rows(lines: list[str], row: _Row, delimiter: str, width: int) -> bool:
    """A record over several lines, each of which would be a whole row of ``width`` cells without quoting."""
    span = lines[row.first - 1 : row.last]
    return width >= 2 and all(len(line.rstrip("\r\n").split(delimiter)) == width for line in span)


def _count_note(
    path: Path, rows: list[_Row], lines: list[str], delimiter: str, width: int, quoting: str
) -> FileNote | None:
    """Fewer records than lines is always said, with the records that span lines; a warning when they look wrong."""
    if not rows:
        return None
    n_lines = sum(1 for line in lines[rows[0].first - 1 :] if not _blank_line(line, delimiter))
    spans = [r for r in rows if r.last > r.first]
    if len(rows) == n_lines or not spans:
        return None
    suspicious = [r for r in spans if _swallows_rows(lines, r, delimiter, width)]
    message = (
        f"{path}: {len(rows)} records from {n_lines} lines: {len(spans)} record(s) span several lines, "
        f"a quoted field holding line breaks ({_line_ranges(spans)})"
    )
    if suspicious and len(suspicious) == len(spans):  # records that span lines legitimately make these likely too
        return FileNote(
            f"{message}; every line of {_line_ranges(suspicious)} reads as a row of its own: if quotes are "
            'ordinary text in this file, set data.quoting = "none"',
            warning=True,
        )
    hint = "" if quoting == "csv" else '; if quotes are ordinary text in this file, set data.quoting = "none"'
    return FileNote(message + hint)


def _read_delimited(
    path: Path, text: str, opts: ReadOptions, fmt: str
) -> Iterator[RawRecord | RecordProblem | FileNote]:
    delimiter = _delimiter(path, text, opts, fmt)
    csv.field_size_limit(max(opts.max_record_bytes * 64, 64_000_000))  # oversize is reported per field below
    lines = io.StringIO(text, newline="").readlines()
    parsed, notes = _rows(path, text, lines, delimiter, opts)
    yield from notes
    rows = [r for r in parsed if not _blank(r, lines, delimiter)]
    if not rows:
        return
    is_header, why, certain = _decide_header(rows[0].cells, [r.cells for r in rows[1 : HEADER_SAMPLE + 1]], opts)
    if opts.header == "auto" and not opts.column_names:
        yield FileNote(_header_note(path, is_header, why))
    body = rows[1:] if is_header else rows
    width = Counter(len(r.cells) for r in body).most_common(1)[0][0] if body else len(rows[0].cells)
    if opts.column_names:
        header = list(opts.column_names)
        if len(header) != width:
            example = next((r for r in body if len(r.cells) == width), rows[0])
            raise DataUsageError(
                f"{path}: data.column_names has {len(header)} names, rows have {width} (e.g. line {example.first}); "
                "give one name per column, in order"
            )
    elif is_header:
        header = [c.strip() for c in rows[0].cells]
        dupes = sorted({c for c in header if header.count(c) > 1})
        if dupes:
            raise DataError(f"{path}, line {rows[0].first}: duplicate column names {dupes} in the header")
    else:
        header = [str(i) for i in range(1, width + 1)]
    if opts.column_names:
        what = "data.column_names"
    elif is_header:
        what = "the header"
    else:
        what = "this header-less file (columns are named 1, 2, ... unless data.column_names names them)"
    if certain:
        hint = ""
    elif is_header:
        hint = f'. The first row was taken as the header ({why}); if it is data, set data.header = "no"'
    else:
        hint = f'. The first row was read as data ({why}); if it names the columns, set data.header = "yes"'
    _require_columns(path, header, opts, what, hint)
    note = _count_note(path, body, lines, delimiter, width, opts.quoting)
    if note is not None:
        yield note
    for row in body:
        where = f"{path}, line {row.first}"
        if len(row.cells) != len(header):
            yield RecordProblem(
                f"{where}: {len(row.cells)} columns, but the header has {len(header)} "
                f"({', '.join(header)}); check quoting and the delimiter {delimiter!r}"
            )
            continue
        fields = dict(zip(header, row.cells, strict=True))
        yield _oversized(where, fields, opts.max_record_bytes) or RawRecord(where, fields)


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
        suffix = repr(path.suffix) if path.suffix else "(no extension)"
        raise DataUsageError(
            f"{path}: unknown file type {suffix}; expected one of {', '.join(sorted(SUFFIX_FORMATS))}, "
            f"or set data.format (one of {', '.join(FORMATS)}), e.g. --set data.format=tsv"
        )
    return fmt


def read_file(path: Path, opts: ReadOptions) -> Iterator[RawRecord | RecordProblem | FileNote]:
    """Records, per-record problems and notes of one file; file-level problems raise DataError."""
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
        yield from _read_delimited(path, text, opts, fmt)


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
        notes: list[FileNote] = []
        for item in read_file(file, opts):
            if isinstance(item, RawRecord):
                records.append(item)
            elif isinstance(item, FileNote):
                notes.append(item)
            else:
                problems.append(item)
        if len(records) == before and len(problems) == problems_before:
            raise DataError(f"{file}: no records found (only a header, or blank lines)")
        summaries.append(
            FileSummary(
                file,
                detect_format(file, opts),
                len(records) - before,
                notes=tuple(n.message for n in notes if not n.warning),
                warnings=tuple(n.message for n in notes if n.warning),
            )
        )
    summaries += [FileSummary(f, "skipped", 0, "not a data file type") for f in skipped]
    return records, problems, summaries
