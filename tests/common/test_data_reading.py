"""Delimited files are read as their authors meant, or the site is told what was decided and how to change it.

Each test is a reproduction from issue 19 (files as sites bring them: quotes that never close, no
header, a header-less file named by position) with the exact message asserted.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fedtune.cli import main
from fedtune.cli.exit_codes import ExitCode
from fedtune.common.config import DataConfig, FieldMap
from fedtune.common.data.preparation import prepare
from fedtune.common.data.readers import DataError, DataUsageError, ReadOptions, read_raw

SPAM = 'label\ttext\nham\t"Keep ur problems\nspam\tWIN a FREE prize\nham\tHI BABE "\nham\tok\nspam\tURGENT cash\n'
LABELS = '--set=data.labels=["ham","spam"]'


def _check(capsys, path: Path, *extra: str) -> tuple[int, str, str]:
    code = main(["data", "check", str(path), "--task", "classification", LABELS, "--no-tokens", *extra])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_a_quote_that_would_swallow_rows_is_read_unquoted_with_a_warning(capsys, tmp_path):
    path = tmp_path / "quote.tsv"
    path.write_text(SPAM)
    code, out, _ = _check(capsys, path)
    assert code == ExitCode.OK
    assert "records read:          5" in out and "usable examples:       5" in out
    assert "  ham                                   3 " in out and "  spam                                  2 " in out
    assert (
        f"warning: {path}, lines 2-4: a quote opens a field and closes only lines later (or never), which would "
        "make whole rows one field; read the file without quoting instead (every line then has 2 columns; quotes "
        'stay as text). If those lines really are one record, set data.quoting = "csv"'
    ) in out
    records, _, _ = read_raw(path, ReadOptions(expected_fields=("text", "label")))
    assert [r.fields["text"] for r in records][:3] == ['"Keep ur problems', "WIN a FREE prize", 'HI BABE "']


def test_quoting_csv_keeps_the_merged_record_but_says_so(capsys, tmp_path):
    path = tmp_path / "quote.tsv"
    path.write_text(SPAM)
    code, out, _ = _check(capsys, path, "--set", "data.quoting='csv'")
    assert code == ExitCode.OK and "records read:          3" in out
    assert (
        f"warning: {path}: 3 records from 5 lines: 1 record(s) span several lines, a quoted field holding line "
        "breaks (lines 2-4); every line of lines 2-4 reads as a row of its own: if quotes are ordinary text in "
        'this file, set data.quoting = "none"'
    ) in out


def test_legitimate_line_breaks_in_quotes_are_read_and_counted(tmp_path):
    path = tmp_path / "qa.csv"
    path.write_text('question,answer\n"What is\ngout?","A form of arthritis."\nq2,a2\n')
    records, problems, (summary,) = read_raw(path, ReadOptions(expected_fields=("question", "answer")))
    assert [r.fields["question"] for r in records] == ["What is\ngout?", "q2"] and not problems
    assert not summary.warnings
    assert summary.notes[-1] == (
        f"{path}: 2 records from 3 lines: 1 record(s) span several lines, a quoted field holding line breaks "
        '(lines 2-3); if quotes are ordinary text in this file, set data.quoting = "none"'
    )


def test_quoting_none_keeps_quotes_as_text(tmp_path):
    path = tmp_path / "q.csv"
    path.write_text('question,answer\n"quoted",a\n')
    records, _, _ = read_raw(path, ReadOptions(expected_fields=("question", "answer"), quoting="none"))
    assert records[0].fields == {"question": '"quoted"', "answer": "a"}


def test_a_quote_that_never_closes_names_its_line(tmp_path):
    path = tmp_path / "open.csv"
    path.write_text('question,answer\nq1,a1\nq2,"a2, and\nq3\n')
    with pytest.raises(DataError) as info:
        read_raw(path, ReadOptions(expected_fields=("question", "answer")))
    assert str(info.value) == (
        f"{path}, line 3: a quoted field opens in this record and never closes (it would run to the end of the "
        'file); close the quote, or set data.quoting = "none" if quotes are ordinary text here'
    )
    clean = tmp_path / "open.tsv"  # every line is a clean row without quoting: auto reads it so, and says so
    clean.write_text('question\tanswer\nq1\ta1\nq2\t"a2\nq3\ta3\n')
    records, _, (summary,) = read_raw(clean, ReadOptions(expected_fields=("question", "answer")))
    assert [r.fields["answer"] for r in records] == ["a1", '"a2', "a3"]
    assert summary.warnings == (
        f"{clean}, lines 3-4: a quote opens a field and closes only lines later (or never), which would make whole "
        "rows one field; read the file without quoting instead (every line then has 2 columns; quotes stay as text). "
        'If those lines really are one record, set data.quoting = "csv"',
    )


def test_a_headerless_file_whose_first_row_holds_agreed_labels(capsys, tmp_path):
    path = tmp_path / "sms.tsv"
    path.write_text("ham\tGo until jurong point, crazy..\nham\tOk lar... Joking wif u oni\nspam\tFree entry in 2\n")
    code, _, err = _check(capsys, path)
    assert code == ExitCode.FAILED
    assert err.strip() == (
        f"NOT TRAINABLE: {path}, line 1: no column 'text', 'label' in this header-less file (columns are named 1, "
        "2, ... unless data.column_names names them); columns: 1, 2. Map the right columns in [data.fields]. The "
        "first row was read as data ('ham' is one of the agreed labels; 'ham' recurs in column 1; 'Go until "
        "jurong point, c'... in column 2 reads like a value, not a column name); if it names the columns, set "
        'data.header = "yes"'
    )
    code, out, _ = _check(capsys, path, "--set", "data.fields.text=2", "--set", "data.fields.label=1")
    assert code == ExitCode.OK and "records read:          3" in out
    assert (
        "    no header: the first row is data ([data.fields] names the columns by position (1, 2, ...)); "
        'if it names the columns, set data.header = "yes"'
    ) in out


def test_header_detection_weighs_the_evidence_and_says_so(tmp_path):
    path = tmp_path / "scores.csv"
    path.write_text("review,stars\n" + "".join(f"a long enough review number {i},{i % 5}\n" for i in range(20)))
    _, _, (summary,) = read_raw(path)
    assert summary.notes[0] == (
        f"{path}: header: the first row names the columns (column 2 holds numbers below the text 'stars'; "
        "every cell is short like a column name; 'review' is short like a name and column 1's values are long); "
        'if it is data, set data.header = "no"'
    )
    with pytest.raises(DataError) as info:
        read_raw(path, ReadOptions(expected_fields=("text", "label")))
    assert str(info.value).endswith(
        "Map the right columns in [data.fields]. The first row was taken as the header (column 2 holds numbers "
        "below the text 'stars'; every cell is short like a column name; 'review' is short like a name and "
        'column 1\'s values are long); if it is data, set data.header = "no"'
    )


def test_column_names_mean_no_header_unless_header_is_yes(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("question@answer\nWhat is gout?@Arthritis.\n")
    names = {"column_names": ["q", "a"], "fields": FieldMap(question="q", answer="a"), "delimiter": "@"}
    headerless = prepare(path, DataConfig(task="question-answer", **names), [])
    assert [(e.text, e.target) for e in headerless.examples] == [
        ("question", "answer"),
        ("What is gout?", "Arthritis."),
    ]
    skipped = prepare(path, DataConfig(task="question-answer", header="yes", **names), [])
    assert [(e.text, e.target) for e in skipped.examples] == [("What is gout?", "Arthritis.")]


def test_column_names_of_the_wrong_length_are_one_error(capsys, tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("".join(f"{i},t{i},ham,x,y,z\n" for i in range(50)))
    code, _, err = _check(capsys, path, "--set", "data.column_names=['a','text','label','b','c']")
    assert code == ExitCode.USAGE
    assert err.strip() == (
        f"fedtune: {path}: data.column_names has 5 names, rows have 6 (e.g. line 1); give one name per column, in order"
    )


def test_tsv_format_tab_delimiter_and_unknown_file_type(capsys, tmp_path):
    path = tmp_path / "spam"  # a tab-separated file with no extension
    path.write_text("label\ttext\nham\tok then\nspam\tWIN\n")
    code, _, err = _check(capsys, path)
    assert code == ExitCode.USAGE
    assert err.strip() == (
        f"fedtune: {path}: unknown file type (no extension); expected one of .csv, .json, .jsonl, .ndjson, "
        ".parquet, .pq, .tab, .tsv, .txt, or set data.format (one of jsonl, json, csv, tsv, parquet), "
        "e.g. --set data.format=tsv"
    )
    code, out, _ = _check(capsys, path, "--set", "data.format='tsv'")
    assert code == ExitCode.OK and f"{path}: 2 records (tsv)" in out
    code, out, _ = _check(capsys, path, "--set", "data.format='csv'", "--set", "data.delimiter='\\t'")
    assert code == ExitCode.OK and f"{path}: 2 records (csv)" in out


def test_no_agreed_label_in_the_data_is_said_once_without_suggesting_skip(capsys, tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\n" + "".join(f"message {i},{['positive', 'negative'][i % 2]}\n" for i in range(30)))
    code, out, _ = _check(capsys, path)
    assert code == ExitCode.FAILED
    assert (
        f"  {path}: none of the data's labels is in the agreed label set. In column 'label' (data.fields.label): "
        "'positive' (15), 'negative' (15); agreed (data.labels or data.labels_file): 'ham', 'spam'. Check that "
        "data.fields.label names the label column, and that the site and the federation agreed the same label names"
    ) in out
    assert "line 2" not in out and "on_malformed" not in out
    assert out.rstrip().endswith(
        "NOT TRAINABLE: no record's label is in the agreed label set (data.labels or data.labels_file); "
        "see the labels above"
    )
    with pytest.raises(DataError, match="none of the data's labels is in the agreed label set"):
        prepare(path, DataConfig(task="classification", labels=["ham", "spam"]), ["ham", "spam"]).require_usable()


def test_nearly_every_record_truncated_is_a_warning(capsys, tmp_path):
    path = tmp_path / "long.jsonl"
    path.write_text("".join(f'{{"question": "question {i} {"x" * 40}", "answer": "a"}}\n' for i in range(20)))
    code = main(
        ["data", "check", str(path), "--task", "question-answer", "--model", "tiny-llama"]
        + ["--set", "model.max_length=16"]
    )
    out = capsys.readouterr().out
    assert code == ExitCode.OK
    assert (
        "warning: 20 of 20 records (100%) are longer than model.max_length = 16 tokens and will be cut short "
        "(median 74 tokens); raise model.max_length if their ends matter"
    ) in out


def test_read_settings_that_do_not_fit_are_usage_errors(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(DataUsageError, match="data.column_names has 3 names, rows have 2"):
        read_raw(path, ReadOptions(column_names=("x", "y", "z")))
