"""``fedtune plan``: the sites a run would have, their noise and epsilon, and the findings, before anything runs."""

from __future__ import annotations

import json
from pathlib import Path

from fedtune.cli import main
from fedtune.cli.exit_codes import ExitCode
from fedtune.cli.plan import site_records
from fedtune.common.config import load_config, preset_path
from fedtune.common.data.federation_data import build_site_splits, load_site_files
from fedtune.common.privacy.accounting import calibrate_noise


def test_the_default_preset_plans_its_three_banks_without_findings(capsys):
    """The preset's schedule is the one docs/benchmarks.md found for DP: nothing to warn about."""
    assert main(["plan", "--preset", "banking77-minilm"]) == ExitCode.OK
    out = capsys.readouterr().out
    sizes = [len(s.train) for s in build_site_splits(load_config(preset_path("banking77-minilm")))[0]]
    for i, n in enumerate(sizes):
        assert f"site-{i}" in out and f" {n} " in out
    assert "epsilon after each round" in out and "findings: none" in out


def test_the_presets_old_schedule_is_flagged_as_a_fresh_adam_taking_few_noisy_steps(capsys):
    old = ["train.optimizer='adam'", "train.local_steps=20", "train.batch_size=64", "train.lr=0.02"]
    assert main(["plan", "--preset", "banking77-minilm", *[a for o in old for a in ("--set", o)]]) == ExitCode.OK
    out = capsys.readouterr().out
    assert "warning [fresh-adam-few-noisy-steps]" in out and "close to sign descent" in out


def test_json_numbers_are_the_calibration_a_site_runs(capsys):
    code = main(
        ["plan", "--records", "1000", "1000", "--json"]
        + ["--set", "train.optimizer='sgd'", "--set", "train.batch_size=1000", "--set", "train.local_steps=1"]
    )
    assert code == ExitCode.OK
    plan = json.loads(capsys.readouterr().out)
    sigma = calibrate_noise(8.0, 1e-4, 1.0, 8, "rdp")  # preset: epsilon 8, delta 1e-4, 8 rounds; q = 1
    assert [s["noise_multiplier"] for s in plan["sites"]] == [sigma, sigma]
    assert [s["sample_rate"] for s in plan["sites"]] == [1.0, 1.0]
    assert [r for r, _ in plan["sites"][0]["epsilon_by_round"]] == list(range(1, 9))
    assert plan["sites"][0]["noise_on_mean"] == sigma / 1000
    assert plan["warnings"] == [], "full-batch SGD steps are what docs/benchmarks.md recommends"


def test_a_site_that_would_refuse_exits_1_and_says_why(capsys):
    code = main(["plan", "--records", "100", "5000", "--set", "privacy.delta=0.001"])
    assert code == ExitCode.FAILED
    out = capsys.readouterr().out
    assert "site-1" in out and "refuses: privacy.delta = 0.001 is not below 1/n = 1/5000" in out
    assert "error [site-refuses]" in out


def test_records_must_be_positive(capsys):
    assert main(["plan", "--records", "100", "0"]) == ExitCode.USAGE
    assert "every site needs at least one record" in capsys.readouterr().err


def test_site_files_are_read_for_their_sizes(tmp_path: Path):
    for i, n in enumerate((30, 50)):
        rows = "\n".join(f"text {i} {k},{'ab'[k % 2]}" for k in range(n))
        (tmp_path / f"site{i}.csv").write_text(f"text,label\n{rows}\n")
    (tmp_path / "test.csv").write_text("text,label\nheld out,a\n")
    (tmp_path / "fed.toml").write_text(
        """
[model]
name = "tiny-bert"
[data]
site_paths = ["site0.csv", "site1.csv"]
test_path = "test.csv"
labels = ["a", "b"]
[partition]
scheme = "files"
num_clients = 2
min_examples = 5
"""
    )
    cfg = load_config(tmp_path / "fed.toml")
    assert site_records(cfg) == [len(load_site_files(cfg, i).train) for i in range(2)] == [27, 45]
