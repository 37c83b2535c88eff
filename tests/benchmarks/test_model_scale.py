"""The model-scale benchmark and the GPU check: their configs and pure parts, without the heavy runs."""

from __future__ import annotations

import pytest
import torch

from tests.benchmarks.scripts import load_benchmark_script

model_scale = load_benchmark_script("model_scale")
gpu_check = load_benchmark_script("gpu_check")


SIZE_BOUNDS = [("0.1b", 0.08e9, 0.15e9), ("0.5b", 0.4e9, 0.6e9), ("1b", 0.9e9, 1.2e9)]


@pytest.mark.parametrize(("size", "low", "high"), SIZE_BOUNDS)
def test_the_sizes_are_the_sizes_they_are_named(size, low, high):
    from transformers import LlamaForCausalLM

    with torch.device("meta"):  # shapes only, no memory
        model = LlamaForCausalLM(model_scale.llama_config(size))
    assert low < sum(p.numel() for p in model.parameters()) < high


def test_each_variant_is_one_step_at_the_fixed_budget():
    assert model_scale.plan_for("non-private", 8, 2).noise_multiplier is None
    micro = model_scale.plan_for("dp-micro", 8, 2)
    assert micro.noise_multiplier and micro.max_physical_batch_size == 2 and micro.batch_size == 8
    assert model_scale.plan_for("dp", 8, 2).max_physical_batch_size == 0
    data = model_scale.token_batch(3, 16)
    assert len(data) == 3 and {len(row) for row in data.input_ids} == {16} and data.labels == data.input_ids


def test_a_tiny_size_runs_every_variant_and_reports_ratios_and_memory(monkeypatch):
    monkeypatch.setitem(model_scale.SIZES, "tiny", (32, 1, 2, 2, 64))
    setting = model_scale.Setting(torch.device("cpu"), torch.float32, records=2, seq_len=8, micro=1, rounds=1)
    rows = model_scale.measure_size("tiny", setting)
    assert [r["variant"] for r in rows] == list(model_scale.VARIANTS)
    assert rows[0]["wall_ratio"] == 1.0 and all(r["step_cpu_s"] > 0 and r["peak_gib"] > 0 for r in rows)


def test_the_targets_are_read_off_the_rows():
    rows = [
        {"size": "0.1b", "variant": "dp", "cpu_ratio": 1.05, "peak_gib": 1.0},
        {"size": "1b", "variant": "dp", "cpu_ratio": 1.2, "peak_gib": 30.0},
        {"size": "1b", "variant": "dp-micro", "cpu_ratio": 1.3, "peak_gib": 9.0},
    ]
    verdict = model_scale.verdicts(rows)
    assert verdict["dp_within_1.10x"] is False and verdict["1b_micro_within_24gib"] is True


def test_the_gpu_check_says_it_needs_a_gpu_and_exits_2(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == gpu_check.NO_GPU == 2
    assert "no CUDA GPU" in capsys.readouterr().err


@pytest.mark.parametrize("quantization", ["none", "4bit"])
def test_the_gpu_checks_federation_config_builds(tiny_llama_spec, tmp_path, quantization):
    cfg = gpu_check.check_config(tiny_llama_spec.directory, tmp_path, quantization=quantization)
    assert cfg.train.device == "cuda" and cfg.model.dtype == "bfloat16" and cfg.model.quantization == quantization
    assert cfg.partition.num_clients == 2 and cfg.secure_aggregation.enabled and cfg.privacy.enabled
    assert cfg.federation.gpus_per_client == 0.5 and cfg.train.max_physical_batch_size < cfg.train.batch_size
