"""Every file format and task shape a site may bring, on real records from MedQuAD and Banking77.

Each format is written from the same real records and must read back to the same examples,
so a site can switch formats by config alone.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fedtune.common.config import DataConfig, FieldMap
from fedtune.common.data.preparation import prepare
from fedtune.common.data.readers import ReadOptions, read_raw
from fedtune.common.data.shapes import Example, normalise_text
from fedtune.common.tasks.registry import task_for
from tests.conftest import SAMPLES, SHARED_DATA


def _medquad_path() -> Path:
    shared = SHARED_DATA / "medquad" / "medquad.jsonl"
    return shared if shared.exists() else SAMPLES / "medquad" / "medquad_sample.jsonl"


def _banking_path() -> Path:
    shared = SHARED_DATA / "banking77" / "train.csv"
    return shared if shared.exists() else SAMPLES / "banking77" / "train.csv"


@pytest.fixture(scope="module")
def medquad() -> list[dict]:
    rows = []
    with _medquad_path().open(encoding="utf-8") as fh:
        for line in fh:
            rows.append(json.loads(line))
            if len(rows) == 30:
                break
    return rows


@pytest.fixture(scope="module")
def banking() -> list[dict]:
    with _banking_path().open(encoding="utf-8", newline="") as fh:
        return [row for _, row in zip(range(40), csv.DictReader(fh), strict=False)]


@pytest.fixture(scope="module")
def labels() -> list[str]:
    path = SHARED_DATA / "banking77" / "categories.json"
    return json.loads((path if path.exists() else SAMPLES / "banking77" / "categories.json").read_text())


def _data(path: Path, task: str, **kw) -> DataConfig:
    return DataConfig(path=path, task=task, **kw)


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _write_csv(path: Path, rows: list[dict], delimiter: str = ",", header: bool = True, bom: bool = False) -> Path:
    with path.open("w", encoding="utf-8-sig" if bom else "utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]), delimiter=delimiter)
        if header:
            writer.writeheader()
        writer.writerows(rows)
    return path


def _qa_pairs(prepared) -> list[tuple[str, str]]:
    return [(e.text, e.target) for e in prepared.examples]


def _clean(rows, a="question", b="answer") -> list[tuple[str, str]]:
    return [(normalise_text(r[a]), normalise_text(r[b])) for r in rows]


def _qa(rows):
    return [{"question": r["question"], "answer": r["answer"], "source": r["source"]} for r in rows]


def test_medquad_question_answer_reads_identically_from_every_format(tmp_path, medquad):
    rows = _qa(medquad)
    reference = _qa_pairs(prepare(_write_jsonl(tmp_path / "qa.jsonl", rows), _data(None, "question-answer"), []))
    assert len(reference) == len(rows)
    (tmp_path / "qa.json").write_text(json.dumps(rows, indent=2), encoding="utf-8")
    _write_csv(tmp_path / "qa.csv", rows)
    _write_csv(tmp_path / "qa.tsv", rows, delimiter="\t")
    _write_csv(tmp_path / "qa_semicolon.csv", rows, delimiter=";")
    _write_csv(tmp_path / "qa_bom.csv", rows, bom=True)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "qa.parquet")
    for name in ("qa.json", "qa.csv", "qa.tsv", "qa_semicolon.csv", "qa_bom.csv", "qa.parquet"):
        got = prepare(tmp_path / name, _data(None, "question-answer"), [])
        assert _qa_pairs(got) == reference, name
        assert not got.report.problems, name


def test_headerless_pipe_file_with_column_names(tmp_path, medquad):
    rows = _qa(medquad)
    path = _write_csv(tmp_path / "qa.txt", rows, delimiter="|", header=False)
    by_number = prepare(path, _data(None, "question-answer", fields=FieldMap(question="1", answer="2")), [])
    named = prepare(
        path,
        _data(None, "question-answer", column_names=["q", "a", "src"], fields=FieldMap(question="q", answer="a")),
        [],
    )
    assert _qa_pairs(by_number) == _qa_pairs(named) == _clean(rows)


def test_a_folder_of_mixed_files_is_read_in_name_order(tmp_path, medquad):
    rows = _qa(medquad)
    folder = tmp_path / "site"
    (folder / "part2").mkdir(parents=True)
    _write_jsonl(folder / "a.jsonl", rows[:10])
    _write_csv(folder / "b.csv", rows[10:20])
    pq.write_table(pa.Table.from_pylist(rows[20:]), folder / "part2" / "c.parquet")
    (folder / "LICENSE").write_text("CC BY 4.0")
    (folder / ".hidden.jsonl").write_text("not read")
    got = prepare(folder, _data(None, "question-answer"), [])
    assert _qa_pairs(got) == _clean(rows)
    assert [(f.path.name, f.records) for f in got.report.files] == [
        ("a.jsonl", 10),
        ("b.csv", 10),
        ("c.parquet", 10),
        ("LICENSE", 0),
    ]
    assert got.report.files[-1].file_format == "skipped"


def test_medquad_as_chat_in_jsonl_csv_and_parquet(tmp_path, medquad):
    system = {"role": "system", "content": "You answer patients' questions."}
    rows = [
        {
            "messages": [
                system,
                {"role": "user", "content": r["question"]},
                {"role": "assistant", "content": r["answer"]},
            ]
        }
        for r in medquad
    ]
    _write_jsonl(tmp_path / "chat.jsonl", rows)
    _write_csv(tmp_path / "chat.csv", [{"messages": json.dumps(r["messages"])} for r in rows])
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "chat.parquet")
    for name in ("chat.jsonl", "chat.csv", "chat.parquet"):
        got = prepare(tmp_path / name, _data(None, "chat"), [])
        assert [(e.text, e.target) for e in got.examples] == _clean(medquad), name
        assert all(e.context == (("system", system["content"]),) and e.templated for e in got.examples)


def test_multi_turn_chat_learns_the_last_assistant_turn(tmp_path):
    turns = [
        {"role": "user", "content": "What is gout?"},
        {"role": "assistant", "content": "A form of arthritis."},
        {"role": "user", "content": "Who gets it?"},
        {"role": "assistant", "content": "Mostly older men."},
    ]
    got = prepare(_write_jsonl(tmp_path / "c.jsonl", [{"messages": turns}]), _data(None, "chat"), [])
    (example,) = got.examples
    assert (example.text, example.target) == ("Who gets it?", "Mostly older men.")
    assert example.context == (("user", "What is gout?"), ("assistant", "A form of arthritis."))


def test_prompt_completion_is_raw_text_and_instruction_joins_input(tmp_path, medquad, tiny_llama_spec):
    from fedtune.common.models.loading import load_tokenizer

    pc = [{"prompt": r["question"], "completion": r["answer"]} for r in medquad[:5]]
    alpaca = [
        {"instruction": "Answer the patient's question.", "input": r["question"], "output": r["answer"]}
        for r in medquad[:4]
    ] + [{"instruction": medquad[4]["question"], "input": "", "output": medquad[4]["answer"]}]
    raw = prepare(_write_jsonl(tmp_path / "pc.jsonl", pc), _data(None, "prompt-completion"), [])
    inst = prepare(_write_jsonl(tmp_path / "alpaca.jsonl", alpaca), _data(None, "instruction"), [])
    assert [e.templated for e in raw.examples] == [False] * 5
    assert inst.examples[0].text == f"Answer the patient's question.\n\n{normalise_text(medquad[0]['question'])}"
    assert inst.examples[4].text == normalise_text(medquad[4]["question"])
    tok = load_tokenizer(tiny_llama_spec)
    head = task_for("prompt-completion").head
    enc_raw = head.encode(raw.examples, tok, [], 256)
    enc_inst = head.encode(inst.examples, tok, [], 256)
    prompt_raw = [t for t, lab in zip(enc_raw.input_ids[0], enc_raw.labels[0], strict=True) if lab == -100]
    prompt_inst = [t for t, lab in zip(enc_inst.input_ids[0], enc_inst.labels[0], strict=True) if lab == -100]
    assert "Answer:" not in tok.decode(prompt_raw) and "Answer: " in tok.decode(prompt_inst)
    short = head.encode([Example("Gout is", "arthritis.", templated=False)], tok, [], 256)
    assert short.input_ids[0] == tok("Gout is")["input_ids"] + tok("arthritis.", add_special_tokens=False)[
        "input_ids"
    ] + [tok.eos_token_id]


def test_banking77_classification_labels_by_name_index_or_digit_string(tmp_path, banking, labels):
    fields = FieldMap(label="category")
    by_name = prepare(_write_csv(tmp_path / "names.csv", banking), _data(None, "classification", fields=fields), labels)
    index_rows = [{"text": r["text"], "category": labels.index(r["category"])} for r in banking]
    pq.write_table(pa.Table.from_pylist(index_rows), tmp_path / "ints.parquet")
    by_int = prepare(tmp_path / "ints.parquet", _data(None, "classification", fields=fields), labels)
    by_digits = prepare(
        _write_csv(tmp_path / "digits.tsv", index_rows, delimiter="\t"),
        _data(None, "classification", fields=fields),
        labels,
    )
    expected = [(" ".join(r["text"].split()), r["category"]) for r in banking]
    for got in (by_name, by_int, by_digits):
        assert [(e.text, e.target) for e in got.examples] == expected
        assert got.report.label_counts == {k: v for k, v in _count(r["category"] for r in banking).items()}


def _count(items) -> dict[str, int]:
    out: dict[str, int] = {}
    for x in items:
        out[x] = out.get(x, 0) + 1
    return out


def test_cleaning_normalises_whitespace_and_drops_empty_and_duplicate_records(tmp_path):
    rows = [
        {"question": "  What   is\tgout? ", "answer": "Arthritis.\r\n\r\n\r\n\r\nPainful."},
        {"question": "What is gout?", "answer": "Arthritis.\n\nPainful."},  # same after cleaning
        {"question": "   ", "answer": "no question"},
        {"question": "Who gets gout?", "answer": None},
        {"question": "Cafe\u0301?", "answer": "NFC"},
    ]
    got = prepare(_write_jsonl(tmp_path / "d.jsonl", rows), _data(None, "question-answer"), [])
    assert [(e.text, e.target) for e in got.examples] == [
        ("What is gout?", "Arthritis.\n\nPainful."),
        ("Caf\u00e9?", "NFC"),
    ]
    r = got.report
    assert (r.records_read, r.duplicates_dropped, r.empty_dropped, r.examples) == (5, 1, 2, 2)


def test_read_raw_keeps_file_and_line_of_every_record(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('question,answer\n"multi\nline",a\nq2,a2\n', encoding="utf-8")
    records, problems, _ = read_raw(path, ReadOptions(expected_fields=("question", "answer")))
    assert [r.where for r in records] == [f"{path}, line 2", f"{path}, line 4"]
    assert not problems
    arr = tmp_path / "d.json"
    arr.write_text('[\n  {"question": "a", "answer": "b"},\n\n  {"question": "c", "answer": "d"}\n]')
    assert [r.where for r in read_raw(arr)[0]] == [f"{arr}, element 1 (line 2)", f"{arr}, element 2 (line 4)"]


def test_jsonl_lines_split_on_newline_only(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(
        '{"question": "a\u2028b", "answer": "c\u0085d"}\r\n{"question": "e", "answer": "f"}\n', encoding="utf-8"
    )
    records, problems, _ = read_raw(path)
    assert not problems and [r.where for r in records] == [f"{path}, line 1", f"{path}, line 2"]
