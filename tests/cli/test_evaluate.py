"""`fedtune evaluate`, `predict` and `generate` on hand-built run directories (no federation is run)."""

from __future__ import annotations

import json
import shutil

import pytest

from fedtune.cli import main
from fedtune.cli.exit_codes import ExitCode
from tests.trained_runs import LABELS, build_run


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory):
    return build_run(tmp_path_factory.mktemp("classifier"))


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    return build_run(tmp_path_factory.mktemp("lm"), task="question-answer")


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("fedtune: ") and "Traceback" not in err, err
    return lines[0]


def test_evaluate_a_classifier_run_writes_metrics_per_class_scores_and_the_confusion_matrix(classifier_run, capsys):
    from fedtune.common.data.federation_data import load_examples

    assert main(["evaluate", str(classifier_run.run_dir), "--data", str(classifier_run.data)]) == ExitCode.OK
    out_dir = classifier_run.run_dir / "eval"
    result = json.loads((out_dir / "eval.json").read_text())
    assert (out_dir / "confusion_matrix.png").stat().st_size > 0
    assert result["round"] == 1 and result["num-examples"] == 18 and result["labels"] == LABELS
    assert [c["label"] for c in result["per-class"]] == LABELS
    assert {"precision", "recall", "f1", "support"} <= set(result["per-class"][0])
    matrix = result["confusion-matrix"]
    assert sum(map(sum, matrix)) == 18 and [sum(row) for row in matrix] == [6, 6, 6]
    assert result["metrics"]["accuracy"] == pytest.approx(sum(matrix[i][i] for i in range(3)) / 18)
    # The same numbers as the server's own evaluation of the global model on that file.
    cfg = classifier_run.cfg
    model = classifier_run.model
    encoded = cfg.task.head.encode(load_examples(classifier_run.data, cfg), model.tokenizer, LABELS, 32)
    server = cfg.task.head.evaluate(model.model, encoded, 8)
    for key in ("accuracy", "macro-f1", "loss"):
        assert result["metrics"][key] == pytest.approx(server[key], rel=1e-4), key
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "eval.json" in printed


def test_evaluate_a_bare_merged_directory_reads_its_export_record(classifier_run, tmp_path):
    moved = tmp_path / "elsewhere" / "model"
    shutil.copytree(classifier_run.run_dir / "merged", moved)
    assert main(["evaluate", str(moved), "--data", str(classifier_run.data)]) == ExitCode.OK
    assert json.loads((tmp_path / "elsewhere" / "eval" / "eval.json").read_text())["round"] == 1


def test_a_merged_directory_without_its_record_needs_a_config(classifier_run, tmp_path, capsys):
    moved = tmp_path / "model"
    shutil.copytree(classifier_run.run_dir / "merged", moved)
    (moved / "fedtune.json").unlink()
    assert main(["evaluate", str(moved), "--data", str(classifier_run.data)]) == ExitCode.USAGE
    assert "give --config FILE or --preset NAME" in _one_line_error(capsys)


def test_a_checkpoint_is_evaluated_on_its_base_model(classifier_run, tmp_path):
    checkpoint = classifier_run.run_dir / "checkpoints" / "round-0002"
    out = tmp_path / "out"
    assert main(["evaluate", str(checkpoint), "--data", str(classifier_run.data), "--out", str(out)]) == ExitCode.OK
    result = json.loads((out / "eval.json").read_text())
    assert result["round"] == 2 and "round-0002" in result["model"]


def test_bad_paths_and_files_are_one_line_usage_errors(classifier_run, tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "nope"), "--data", str(classifier_run.data)]) == ExitCode.USAGE
    assert "no such run or model directory" in _one_line_error(capsys)
    assert main(["evaluate", str(classifier_run.run_dir), "--data", str(tmp_path / "none.csv")]) == ExitCode.USAGE
    assert "no such data file" in _one_line_error(capsys)
    (tmp_path / "empty").mkdir()
    assert main(["evaluate", str(tmp_path / "empty"), "--data", str(classifier_run.data)]) == ExitCode.USAGE
    assert "neither a fedtune run directory" in _one_line_error(capsys)


def test_evaluate_a_causal_lm_compares_base_and_fine_tuned(lm_run, capsys):
    code = main(
        ["evaluate", str(lm_run.run_dir), "--data", str(lm_run.data), "--generations", "2", "--max-new-tokens", "4"]
    )
    assert code == ExitCode.OK
    result = json.loads((lm_run.run_dir / "eval" / "eval.json").read_text())
    metrics, base = result["metrics"], result["base-metrics"]
    assert metrics["perplexity"] == pytest.approx(2.718281828 ** metrics["loss"], rel=1e-6)
    assert base["loss"] != metrics["loss"]  # the adapter changed the model
    assert len(result["generations"]) == 2
    assert {"prompt", "reference", "base", "fine-tuned"} == set(result["generations"][0])
    assert "**base:**" in (lm_run.run_dir / "eval" / "generations.md").read_text()
    assert "perplexity" in capsys.readouterr().out


def test_predict_prints_a_label_and_its_probability(classifier_run, tmp_path, capsys):
    texts = tmp_path / "texts.txt"
    texts.write_text("my card has not arrived\n\nwhat rate for euros?\n", encoding="utf-8")
    code = main(["predict", str(classifier_run.run_dir), "hello", "--file", str(texts), "--top", "2", "--json"])
    assert code == ExitCode.OK
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["text"] for r in rows] == ["hello", "my card has not arrived", "what rate for euros?"]
    for row in rows:
        assert len(row["labels"]) == 2 and row["labels"][0]["label"] in LABELS
        assert 1.0 >= row["labels"][0]["probability"] >= row["labels"][1]["probability"] > 0.0


def test_predict_and_generate_refuse_the_other_task(classifier_run, lm_run, capsys):
    assert main(["predict", str(lm_run.run_dir), "hi"]) == ExitCode.USAGE
    assert "use `fedtune generate`" in _one_line_error(capsys)
    assert main(["generate", str(classifier_run.run_dir), "hi"]) == ExitCode.USAGE
    assert "use `fedtune predict`" in _one_line_error(capsys)


def test_generate_completes_a_prompt(lm_run, capsys):
    assert main(["generate", str(lm_run.run_dir), "What is CFS?", "--max-new-tokens", "3"]) == ExitCode.OK
    assert capsys.readouterr().err == ""


def test_a_checkpoint_trained_on_a_quantised_base_is_loaded_on_that_base(classifier_run, monkeypatch):
    """Not silently on a full-precision one: the base keeps model.quantization (and refuses where it cannot run)."""
    import dataclasses

    import fedtune.common.models.loading as loading
    from fedtune.cli.model_source import locate

    seen = []
    monkeypatch.setattr(loading, "load_base_model", lambda spec, *args, **kwargs: seen.append(spec) or _Eval())
    trained = locate(classifier_run.run_dir / "checkpoints" / "round-0002")
    raw = {**trained.raw_config, "model": {**trained.raw_config["model"], "quantization": "4bit"}}
    dataclasses.replace(trained, raw_config=raw).load_base()
    assert seen[-1].quantization == "4bit"


class _Eval:
    def eval(self):
        return self
