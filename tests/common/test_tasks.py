"""The task registry: one vocabulary of tasks, each shape's fields and examples, and the legacy ``model.task``."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fedtune.common.config import (
    ConfigError,
    config_from_dict,
    config_from_run_config,
    config_to_toml_dict,
    load_config,
    preset_path,
)
from fedtune.common.data.readers import RawRecord, RecordProblem
from fedtune.common.data.shapes import Example
from fedtune.common.tasks.registry import TASK_NAMES, TASKS, task_for
from tests.conftest import REPO, SAMPLES

COLUMNS = {
    "text": "text",
    "label": "label",
    "prompt": "prompt",
    "completion": "completion",
    "question": "question",
    "answer": "answer",
    "instruction": "instruction",
    "input": "input",
    "output": "output",
    "messages": "messages",
    "system": "",
}
LABELS = ["card_arrival", "card_linking"]
MEDQUAD = SAMPLES / "medquad" / "medquad_sample.jsonl"


def _example(task: str, columns: dict[str, str] | None = None, **fields) -> Example | RecordProblem | None:
    return task_for(task).example(RawRecord("r.jsonl, line 1", fields), columns or COLUMNS, LABELS)


def test_the_registry_names_the_five_record_shapes_and_their_kind():
    assert TASK_NAMES == ("classification", "chat", "prompt-completion", "question-answer", "instruction")
    assert all(task_for(name).name == name for name in TASK_NAMES)
    assert [name for name in TASK_NAMES if task_for(name).classifies] == ["classification"]


def test_an_unknown_task_names_the_known_ones():
    with pytest.raises(
        ValueError,
        match="unknown task 'causal-lm'; known tasks: classification, chat, "
        "prompt-completion, question-answer, instruction",
    ):
        task_for("causal-lm")


def test_generative_shapes_share_one_head_and_the_heads_say_how_they_are_judged():
    generative = {id(t.head) for t in TASKS.values() if not t.classifies}
    assert len(generative) == 1
    classify, generate = task_for("classification").head, task_for("chat").head
    assert (classify.headline_metric, classify.higher_is_better) == ("accuracy", True)
    assert (generate.headline_metric, generate.higher_is_better) == ("loss", False)
    from peft import TaskType

    assert {TaskType(t.head.peft_task_type) for t in TASKS.values()} == {TaskType.SEQ_CLS, TaskType.CAUSAL_LM}


@pytest.mark.parametrize(
    ("task", "roles"),
    [
        ("classification", ("text", "label")),
        ("chat", ("messages",)),
        ("prompt-completion", ("prompt", "completion")),
        ("question-answer", ("question", "answer")),
        ("instruction", ("instruction", "output")),
    ],
)
def test_each_shape_requires_its_roles(task, roles):
    assert task_for(task).roles == roles
    problem = _example(task, unrelated="x")
    assert isinstance(problem, RecordProblem)
    assert f"(data.fields.{roles[0]}); fields present: unrelated" in problem.message


def test_classification_reads_a_label_by_name_or_index_and_groups_by_it():
    assert _example("classification", text="  where is   my card ", label="card_arrival") == Example(
        "where is my card", "card_arrival", "card_arrival"
    )
    assert _example("classification", text="link it", label=1).target == "card_linking"
    assert _example("classification", text="", label=0) is None
    bad = _example("classification", text="hi", label="refund")
    assert isinstance(bad, RecordProblem) and "label 'refund' is not in the agreed label set" in bad.message


def test_generative_shapes_build_prompt_and_target():
    qa = _example("question-answer", question="What is gout?", answer="A form of arthritis.")
    assert qa == Example("What is gout?", "A form of arthritis.")
    assert _example("question-answer", question="What is gout?", answer="") is None
    inst = _example("instruction", instruction="Summarise.", input="Gout is arthritis.", output="Arthritis.")
    assert inst.text == "Summarise.\n\nGout is arthritis." and inst.templated
    assert _example("instruction", instruction="Summarise.", output="Short.").text == "Summarise."
    raw = _example("prompt-completion", prompt="Gout is", completion="a form of arthritis.")
    assert raw == Example("Gout is", "a form of arthritis.", templated=False)


def test_chat_learns_the_last_assistant_turn_with_earlier_turns_as_context():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "What is gout?"},
        {"role": "assistant", "content": "Arthritis."},
    ]
    chat = _example("chat", messages=json.dumps(messages))
    assert chat == Example(
        "What is gout?", "Arthritis.", "", (("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello."))
    )
    bad = _example("chat", messages=messages[:-1])
    assert isinstance(bad, RecordProblem) and "the last message must be the assistant's" in bad.message


def test_a_system_column_becomes_context_for_every_generative_shape_but_chat():
    columns = {**COLUMNS, "system": "sys"}
    qa = _example("question-answer", columns, question="q", answer="a", sys="Answer as a nurse.")
    assert qa.context == (("system", "Answer as a nurse."),)
    assert _example("question-answer", columns, question="q", answer="a").context == ()


def _raw(legacy: str, data_task: str | None = None) -> dict:
    data = {"path": str(MEDQUAD), **({"task": data_task} if data_task else {})}
    return {"model": {"name": "tiny-llama", **({"task": legacy} if legacy else {})}, "data": data}


def test_the_config_names_its_task_in_data_task_only():
    cfg = config_from_dict(_raw("", "chat"), "test", Path.cwd())
    assert cfg.task is task_for("chat") and not cfg.task.classifies
    assert "task" not in config_to_toml_dict(cfg)["model"]
    for preset in ("banking77-minilm", "medquad-smollm2"):
        assert "task" not in load_config(preset_path(preset)).model_dump()["model"]


@pytest.mark.parametrize(
    ("legacy", "data_task", "expected"),
    [
        ("causal-lm", None, "question-answer"),
        ("causal-lm", "chat", "chat"),
        ("causal-lm", "instruction", "instruction"),
    ],
)
def test_a_legacy_model_task_that_agrees_with_data_task_still_loads(legacy, data_task, expected):
    cfg = config_from_dict(_raw(legacy, data_task), "old.toml", Path.cwd())
    assert cfg.data.task == expected
    assert "task" not in config_to_toml_dict(cfg)["model"]


def test_a_legacy_classification_model_task_still_loads(tmp_path):
    raw = {
        "model": {"name": "tiny-bert", "task": "classification"},
        "data": {"path": str(MEDQUAD), "labels": ["a", "b"]},
    }
    assert config_from_dict(raw, "old.toml", tmp_path).task is task_for("classification")


@pytest.mark.parametrize(("legacy", "data_task"), [("causal-lm", "classification"), ("classification", "chat")])
def test_a_legacy_model_task_that_disagrees_is_refused_naming_both_fields(legacy, data_task):
    raw = _raw(legacy, data_task)
    raw["data"]["labels"] = ["a"]
    with pytest.raises(ConfigError, match=f"data.task = '{data_task}' does not fit model.task = '{legacy}'"):
        config_from_dict(raw, "old.toml", Path.cwd())


def test_run_directories_and_bundles_written_with_model_task_still_load(tmp_path):
    from fedtune.server.run_directory import load_run_config

    old = config_to_toml_dict(config_from_dict(_raw("", "question-answer"), "test", tmp_path))
    old["model"]["task"] = "causal-lm"  # what config.json held before data.task alone named the task
    (tmp_path / "config.json").write_text(json.dumps(old))
    assert load_run_config(tmp_path).task is task_for("question-answer")
    assert config_from_run_config({"fedtune-config": json.dumps(old)}).task is task_for("question-answer")


def test_the_config_does_not_import_torch():
    """The registry's heads import torch and transformers lazily, so every command that reads a config stays quick."""
    code = "import sys, fedtune.common.config; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_no_code_outside_the_registry_compares_task_names():
    pattern = re.compile(r"""task\s*[!=]=\s*["']""")
    found = [
        f"{p.relative_to(REPO)}:{n}"
        for folder in ("common", "client", "server", "deploy", "fedtune")
        for p in (REPO / folder).rglob("*.py")
        if "samples" not in p.parts
        for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if pattern.search(line)
    ]
    assert found == []
