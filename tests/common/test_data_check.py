"""``fedtune data check`` on the real data sets and on broken files: summary, verdict, exit status."""

from __future__ import annotations

import json

import pytest

from fedtune.cli import main
from tests.conftest import SAMPLES, SHARED_DATA

BANKING = SHARED_DATA / "banking77" / "train.csv"
MEDQUAD = SHARED_DATA / "medquad" / "medquad.jsonl"
needs_shared = pytest.mark.skipif(not (BANKING.exists() and MEDQUAD.exists()), reason="shared data not on this machine")


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["data", "check", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


@needs_shared
def test_banking77_summary_with_labels_and_token_lengths(capsys):
    code, out, _ = _run(capsys, BANKING, "--preset", "banking77-minilm")
    assert code == 0
    assert f"{BANKING}: 10003 records (csv)" in out
    for line in (
        "records read:          10003",
        "malformed:             0",
        "duplicates (dropped):  4",
        "usable examples:       9999",
        "labels: 77 of 77 agreed labels present; largest/smallest = 187/35",
        "token lengths: min 4, median 13, p95 37, max 98; cap 32 (model.max_length): 701 truncated (7.0%)",
        "OK: this site can train on the data",
    ):
        assert line in out
    assert "card_payment_fee_charged" in out.split("labels:")[1].splitlines()[1]


@needs_shared
def test_medquad_summary_as_question_answer_and_refusal_as_chat(capsys):
    code, out, _ = _run(
        capsys, MEDQUAD, "--task", "question-answer", "--model", "tiny-llama", "--set", "model.max_length=512"
    )
    assert code == 0
    assert "records read:          16407" in out and "usable examples:       16359" in out
    assert "duplicates (dropped):  48" in out and "token lengths: min" in out
    code, out, _ = _run(capsys, MEDQUAD, "--task", "chat", "--no-tokens")
    assert code == 1
    assert f"{MEDQUAD}: field 'messages' is missing from all 16407 records; check [data.fields]" in out
    assert f"{MEDQUAD}, line 1, missing field 'messages' (data.fields.messages); fields present: answer, focus" in out
    assert "NOT TRAINABLE: 16407 malformed records" in out


def test_broken_files_exit_1_with_a_specific_message(capsys, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "a"}\n{"question": "q2", "answer": }\n')
    code, out, _ = _run(capsys, bad, "--task", "question-answer", "--no-tokens")
    assert code == 1
    assert f"{bad}, line 2: invalid JSON (Expecting value at column 30)" in out
    assert "NOT TRAINABLE: 1 malformed records" in out
    code, _, err = _run(capsys, bad, "--task", "question-answer", "--no-tokens", "--set", "data.on_malformed='skip'")
    assert code == 0
    binary = tmp_path / "b.csv"
    binary.write_bytes(b"\x00\x01\x02garbage")
    code, out, err = _run(capsys, binary, "--task", "question-answer", "--no-tokens")
    assert code == 1 and out == ""
    assert (
        err.strip() == f"NOT TRAINABLE: {binary}: looks like a binary file, not text (NUL byte at offset 0); "
        "expected UTF-8 JSON Lines, JSON, CSV/TSV, or a .parquet file"
    )


def test_delta_too_large_for_the_data_is_not_trainable(capsys, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"question": f"q{i}", "answer": "a"}) + "\n" for i in range(50)))
    code, out, _ = _run(capsys, path, "--task", "question-answer", "--no-tokens", "--set", "privacy.delta=0.05")
    assert code == 1
    assert (
        "NOT TRAINABLE: privacy.delta = 0.05 is not below 1/n for n = 45 training records; ask for delta < 2.2e-02"
        in out
    )


def test_usage_errors_exit_2(capsys, tmp_path):
    sample = SAMPLES / "banking77" / "train.csv"
    code, _, err = _run(capsys, sample, "--task", "classification", "--no-tokens")
    assert code == 2 and "classification needs the federation's agreed labels: --labels FILE" in err
    code, _, err = _run(capsys, sample, "--no-tokens")
    assert code == 2 and "give --task" in err
    code, _, err = _run(capsys, tmp_path / "absent.csv", "--task", "chat", "--no-tokens")
    assert code == 2 and f"data.path: file not found: {tmp_path / 'absent.csv'}" in err
