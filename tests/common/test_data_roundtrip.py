"""Property: records written in any supported format read back exactly, or the difference is said, with its line.

Random fields hold quotes, every delimiter, line breaks (``\\n``, ``\\r\\n``, a lone ``\\r``) and
Unicode (line separators included). Written by each format's own writer they must come back
exactly those records; written by hand, with quotes as plain text, ``data.quoting = "none"``
must read them exactly and ``auto`` must never change the number of records without a note
or warning that names the lines.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedtune.common.data.readers import DataError, ReadOptions, read_raw

FIELDS = ("question", "answer")
SPECIALS = ['"', '""', '"a', 'b"', ",", "\t", ";", "|", "\n", "\r\n", "\r", " ", "é", "\u2028", "\x85", "日本", "🙂"]
_chars = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00\ufeff")  # NUL: binary; BOM: encoding
_text = st.lists(st.sampled_from(SPECIALS) | st.text(_chars, max_size=4), max_size=5).map("".join)
_records = st.lists(st.fixed_dictionaries({f: _text for f in FIELDS}), min_size=1, max_size=6)
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _write_delimited(path: Path, rows: list[dict], delimiter: str, header: bool, terminator: str) -> None:
    out = io.StringIO(newline="")
    # Python 3.11's writer leaves a lone \r unquoted under a "\n" terminator (a line break to any reader),
    # so that variant quotes every field, as spreadsheet exports often do.
    quoting = csv.QUOTE_ALL if terminator == "\n" else csv.QUOTE_MINIMAL
    writer = csv.writer(out, delimiter=delimiter, lineterminator=terminator, quoting=quoting)
    if header:
        writer.writerow(FIELDS)
    writer.writerows([[r[f] for f in FIELDS] for r in rows])
    path.write_text(out.getvalue(), encoding="utf-8", newline="")


def _write(tmp: Path, fmt: str, rows: list[dict], terminator: str) -> tuple[Path, ReadOptions]:
    opts = ReadOptions(expected_fields=FIELDS, quoting="csv")
    if fmt == "jsonl":
        (path := tmp / "r.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    elif fmt == "json":
        (path := tmp / "r.json").write_text(json.dumps(rows, ensure_ascii=False, indent=1))
    elif fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path := tmp / "r.parquet")
    elif fmt == "csv-headerless":
        _write_delimited(path := tmp / "r.txt", rows, ";", header=False, terminator=terminator)
        opts = ReadOptions(expected_fields=FIELDS, quoting="csv", delimiter=";", header="no", column_names=FIELDS)
    else:
        _write_delimited(path := tmp / f"r.{fmt}", rows, "\t" if fmt == "tsv" else ",", True, terminator)
    return path, opts


@FAST
@given(
    rows=_records,
    fmt=st.sampled_from(["jsonl", "json", "parquet", "csv", "tsv", "csv-headerless"]),
    terminator=st.sampled_from(["\n", "\r\n"]),
)
def test_every_format_reads_back_exactly_what_was_written(tmp_path, rows, fmt, terminator):
    path, opts = _write(tmp_path, fmt, rows, terminator)
    records, problems, (summary,) = read_raw(path, opts)
    assert [r.fields for r in records] == rows and not problems, (fmt, summary)
    auto, problems, (summary,) = read_raw(path, ReadOptions(**{**opts.__dict__, "quoting": "auto"}))
    if [r.fields for r in auto] != rows:  # auto may read a file unquoted, but only with a warning naming the lines
        assert any(", line" in w for w in summary.warnings), (fmt, summary)


_plain = _text.map(lambda s: s.replace("\t", " ").replace("\r", " ").replace("\n", " "))


@FAST
@given(rows=st.lists(st.fixed_dictionaries({f: _plain for f in FIELDS}), min_size=1, max_size=8))
def test_quotes_as_plain_text_never_change_the_count_silently(tmp_path, rows):
    path = tmp_path / "plain.tsv"
    path.write_text("question\tanswer\n" + "".join(f"{r['question']}\t{r['answer']}\n" for r in rows))
    records, problems, _ = read_raw(path, ReadOptions(expected_fields=FIELDS, quoting="none"))
    assert [r.fields for r in records] == rows and not problems
    try:
        records, problems, (summary,) = read_raw(path, ReadOptions(expected_fields=FIELDS))
    except DataError as exc:
        assert f"{path}, line " in str(exc)
        return
    if len(records) + len(problems) != len(rows):
        assert any(" lines" in n or ", line" in n for n in summary.notes + summary.warnings), summary
