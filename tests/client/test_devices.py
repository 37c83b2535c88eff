"""train.device, federation.gpus_per_client and model.quantization: resolved at start, refused in one line."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from fedtune.common.config import ConfigError, config_from_dict
from fedtune.common.data.encoding import EncodedSet
from fedtune.common.devices import EncodedSetOnDevice, on_device, resolve_device
from fedtune.common.models.loading import load_base_model, quantization_config, quantization_problem

SAMPLES = Path(__file__).resolve().parents[2] / "common" / "data" / "samples"


def _config(tmp_path: Path, **sections):
    raw = {
        "run": {"output_dir": str(tmp_path / "runs")},
        "model": {"name": "tiny-llama", "max_length": 32},
        "data": {
            "task": "question-answer",
            "path": str(SAMPLES / "medquad" / "medquad_sample.jsonl"),
            "max_records": 60,
        },
        "partition": {"num_clients": 2},
        "secure_aggregation": {"enabled": False},
    }
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values}
    return config_from_dict(raw, "test", tmp_path)


def test_auto_is_cuda_only_where_torch_sees_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda:1")


def test_an_explicit_gpu_the_machine_lacks_is_one_line_naming_the_field(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"train.device = 'cuda' .*set train.device = 'auto' or 'cpu'"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match=r"train.device = 'cuda:3' .*1 GPU"):
        resolve_device("cuda:3")


def test_the_device_field_accepts_only_devices(tmp_path):
    assert _config(tmp_path, train={"device": "cuda:1"}).train.device == "cuda:1"
    with pytest.raises(ConfigError, match="train.device"):
        _config(tmp_path, train={"device": "gpu"})
    with pytest.raises(ConfigError, match="gpus_per_client"):
        _config(tmp_path, federation={"gpus_per_client": -1})


def test_batches_on_a_device_are_the_same_batches_there():
    data = EncodedSet(input_ids=[[5, 6, 7], [8]], labels=[0, 1], pad_token_id=0)
    assert on_device(data, torch.device("cpu")) is data
    moved = on_device(data, torch.device("meta"))  # a device every machine has, with no memory behind it
    assert isinstance(moved, EncodedSetOnDevice) and len(moved) == 2
    batch, plain = moved.batch([0, 1]), data.batch([0, 1])
    assert {v.device.type for v in batch.values()} == {"meta"}
    assert {k: v.shape for k, v in batch.items()} == {k: v.shape for k, v in plain.items()}


def test_the_simulation_reserves_gpus_per_client_and_refuses_a_missing_gpu_first(tmp_path, monkeypatch):
    import flwr.simulation

    from fedtune.simulation import simulate

    asked: dict = {}

    class Stop(Exception):
        pass

    def fake_run_simulation(**kwargs):
        asked.update(kwargs["backend_config"]["client_resources"])
        raise Stop

    monkeypatch.setattr(flwr.simulation, "run_simulation", fake_run_simulation)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(Stop):
        simulate(_config(tmp_path, federation={"gpus_per_client": 0.5}))
    assert asked == {"num_cpus": 1.0, "num_gpus": 0.5}
    with pytest.raises(ConfigError, match="train.device = 'cuda'"):
        simulate(_config(tmp_path, train={"device": "cuda"}))


def test_qlora_config_is_nf4_in_the_base_dtype_and_refused_without_bitsandbytes_or_a_gpu(tiny_llama_spec, monkeypatch):
    four = quantization_config("4bit", "bfloat16")
    assert four.load_in_4bit and four.bnb_4bit_quant_type == "nf4" and four.bnb_4bit_compute_dtype == torch.bfloat16
    assert quantization_config("8bit", "float32").load_in_8bit and quantization_config("none", "float32") is None
    spec = dataclasses.replace(tiny_llama_spec, quantization="4bit")
    cpu = torch.device("cpu")
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "bitsandbytes" else real_find_spec(n))
    assert "pip install 'fedtune[qlora]'" in quantization_problem(spec, cpu)
    with pytest.raises(ConfigError, match="needs bitsandbytes"):
        load_base_model(spec)
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: object() if n == "bitsandbytes" else None)
    assert "needs a CUDA GPU" in quantization_problem(spec, cpu)
    assert quantization_problem(spec, torch.device("cuda")) is None
    assert "generative tasks" in quantization_problem(dataclasses.replace(spec, task="classification"), cpu)
    assert quantization_problem(tiny_llama_spec, cpu) is None


def test_the_quantised_base_is_loaded_with_the_bitsandbytes_config_on_the_gpu(tiny_llama_spec, monkeypatch):
    """Up to the point of loading (no bitsandbytes or GPU here): what from_pretrained is asked for."""
    import transformers

    import fedtune.common.models.loading as loading

    asked: dict = {}

    class Stop(Exception):
        pass

    def fake_from_pretrained(directory, **kwargs):
        asked.update(kwargs)
        raise Stop

    monkeypatch.setattr(loading, "quantization_problem", lambda spec, device: None)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_from_pretrained)
    with pytest.raises(Stop):
        load_base_model(dataclasses.replace(tiny_llama_spec, quantization="4bit", dtype="bfloat16"))
    assert asked["quantization_config"].load_in_4bit and asked["dtype"] == torch.bfloat16
    assert asked["device_map"] == {"": 0}
