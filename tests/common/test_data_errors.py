"""Broken input gets one clear error naming the file, the line and the field; loaders never crash otherwise."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedtune.common.config import DataConfig, FieldMap
from fedtune.common.data.preparation import prepare
from fedtune.common.data.readers import DataError
from fedtune.common.tasks.registry import TASK_NAMES

LABELS = ["card_arrival", "card_linking"]


def _qa(path: Path, **kw):
    cfg = DataConfig(path=None, task="question-answer", **kw)
    return prepare(path, cfg, []).require_usable(cfg.on_malformed)


def _classify(path: Path, **kw):
    cfg = DataConfig(path=None, task="classification", fields=FieldMap(label="category"), **kw)
    return prepare(path, cfg, LABELS).require_usable()


def _error(fn, path: Path, **kw) -> str:
    with pytest.raises(DataError) as info:
        fn(path, **kw)
    return str(info.value)


def test_missing_path_and_empty_file(tmp_path):
    assert _error(_qa, tmp_path / "absent.jsonl") == (
        f"{tmp_path / 'absent.jsonl'}: no such file or folder; check data.path (or the PATH you gave)"
    )
    (tmp_path / "empty.jsonl").write_text("")
    assert _error(_qa, tmp_path / "empty.jsonl") == f"{tmp_path / 'empty.jsonl'}: file is empty"
    (tmp_path / "header_only.csv").write_text("question,answer\n")
    assert _error(_qa, tmp_path / "header_only.csv") == (
        f"{tmp_path / 'header_only.csv'}: no records found (only a header, or blank lines)"
    )
    (tmp_path / "nothing").mkdir()
    assert "folder holds no data files" in _error(_qa, tmp_path / "nothing")


def test_invalid_json_on_line_1234_names_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [json.dumps({"question": f"q{i}", "answer": "a"}) for i in range(1233)] + ['{"question": "q", oops}']
    path.write_text("\n".join(lines) + "\n")
    assert _error(_qa, path) == (
        f'1 malformed record(s) in {path}; fix them, or set data.on_malformed = "skip" to train without them:\n'
        f"  {path}, line 1234: invalid JSON (Expecting property name enclosed in double quotes at column 19)"
    )
    assert len(_qa(path, on_malformed="skip")) == 1233


def test_a_10_mb_line_names_line_and_field(tmp_path):
    path = tmp_path / "big.jsonl"
    path.write_text(
        json.dumps({"question": "q", "answer": "a"})
        + "\n"
        + json.dumps({"question": "q2", "answer": "x" * 10_000_000})
        + "\n"
    )
    assert (
        f"{path}, line 2, field 'answer': value is 10.0 MB, over the 1.0 MB limit per record "
        "(data.max_record_bytes); remove or shorten it"
    ) in _error(_qa, path)
    csv_path = tmp_path / "big.csv"
    csv_path.write_text("question,answer\nq," + "y" * 10_000_000 + "\n")
    assert f"{csv_path}, line 2, field 'answer': value is 10.0 MB" in _error(_qa, csv_path)


def test_missing_column_is_one_error_for_the_whole_table(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,intent\nmy card is late,card_arrival\n")
    assert _error(_classify, path) == (
        f"{path}, line 1: no column 'category' in the header; columns: text, intent. "
        "Map the right columns in [data.fields]"
    )
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"text": "a", "intent": "card_arrival"}\n{"text": "b", "intent": "card_arrival"}\n')
    message = _error(_classify, jsonl)
    assert f"{jsonl}: field 'category' is missing from all 2 records; check [data.fields]" in message
    assert f"{jsonl}, line 2, missing field 'category' (data.fields.label); fields present: intent, text" in message


def test_label_outside_the_agreed_set(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,category\nmy card is late,card_arrival\nrefund please,refund_request\nx,7\n")
    message = _error(_classify, path)
    assert (
        f"{path}, line 3, field 'category': label 'refund_request' is not in the agreed label set "
        "(2 labels, from data.labels or data.labels_file)"
    ) in message
    assert f"{path}, line 4, field 'category': label index 7 is outside the agreed label set (0..1)" in message


def test_binary_garbage_and_wrong_encodings(tmp_path):
    garbage = tmp_path / "d.csv"
    garbage.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + os.urandom(512))
    assert _error(_qa, garbage) == (
        f"{garbage}: looks like a binary file, not text (NUL byte at offset 8); "
        "expected UTF-8 JSON Lines, JSON, CSV/TSV, or a .parquet file"
    )
    latin = tmp_path / "l.csv"
    latin.write_bytes("question,answer\nq,ok\ncaf\xe9?,yes\n".encode("latin-1"))
    assert _error(_qa, latin) == (
        f"{latin}, line 3: not UTF-8 (byte 0xe9 at offset 24); re-save the file as UTF-8, "
        "e.g. `iconv -f LATIN1 -t UTF-8 in.csv > out.csv`"
    )
    utf16 = tmp_path / "u.csv"
    utf16.write_bytes("question,answer\nq,a\n".encode("utf-16"))
    assert (
        _error(_qa, utf16) == f"{utf16}: file is UTF-16 encoded; re-save it as UTF-8 (e.g. `iconv -f UTF-16 -t UTF-8`)"
    )
    fake = tmp_path / "f.parquet"
    fake.write_text("question,answer\n")
    assert _error(_qa, fake).startswith(f"{fake}: not a readable Parquet file")


def test_chat_records_must_end_with_the_assistant(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"messages": [{"role": "user", "content": "hi"}]},
                {"messages": [{"role": "doctor", "content": "hi"}, {"role": "assistant", "content": "yes"}]},
                {"messages": "not json"},
            ]
        )
        + "\n"
    )
    with pytest.raises(DataError) as info:
        prepare(path, DataConfig(path=None, task="chat"), []).require_usable()
    message = str(info.value)
    assert (
        f"{path}, line 1, field 'messages': the last message must be the assistant's (the reply to learn), got 'user'"
    ) in message
    assert (
        f"{path}, line 2, field 'messages', message 1: role 'doctor' is not one of system, user, assistant" in message
    )
    assert f"{path}, line 3, field 'messages': not a JSON list of messages (Expecting value)" in message


def test_ragged_csv_row_is_reported_not_misread(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("question,answer\nq1,a1\nq2,a2,extra\n")
    assert (
        f"{path}, line 3: 3 columns, but the header has 2 (question, answer); check quoting and the delimiter ','"
    ) in _error(_qa, path)


TASKS = list(TASK_NAMES)  # every registered task, so a new one is fuzzed too


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    content=st.binary(max_size=2000),
    suffix=st.sampled_from([".jsonl", ".json", ".csv", ".tsv", ".parquet"]),
    task=st.sampled_from(TASKS),
)
def test_fuzz_arbitrary_bytes_raise_only_data_error(tmp_path, content, suffix, task):
    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(content)
    cfg = DataConfig(path=None, task=task)
    try:
        prepare(path, cfg, LABELS).require_usable()
    except DataError as exc:
        assert str(path) in str(exc)


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=10,
)
_records = st.dictionaries(
    st.sampled_from(
        [
            "text",
            "label",
            "question",
            "answer",
            "prompt",
            "completion",
            "instruction",
            "input",
            "output",
            "messages",
            "role",
            "content",
        ]
    ),
    _json_values,
    max_size=5,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(_records | _json_values, max_size=6), task=st.sampled_from(TASKS))
def test_fuzz_structured_json_records_raise_only_data_error(tmp_path, rows, task):
    path = tmp_path / "fuzz.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    try:
        examples = prepare(path, DataConfig(path=None, task=task), LABELS).require_usable()
    except DataError as exc:
        assert str(path) in str(exc)
    else:
        assert all(e.text and e.target for e in examples)
