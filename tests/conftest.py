"""Shared fixtures: tiny models built from a config, and small real samples of the shared data sets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
SAMPLES = REPO / "common" / "data" / "samples"

os.environ.setdefault("FEDTUNE_CACHE", str(REPO / ".cache" / "fedtune"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_llama_spec():
    from fedtune.common.config import ModelConfig
    from fedtune.common.models.loading import BaseModelSpec, resolve_model_dir

    return BaseModelSpec(resolve_model_dir(ModelConfig(name="tiny-llama")), "question-answer", "float32")


@pytest.fixture(scope="session")
def tiny_bert_spec():
    from fedtune.common.config import ModelConfig
    from fedtune.common.models.loading import BaseModelSpec, resolve_model_dir

    labels = ("card_arrival", "card_linking", "exchange_rate")
    return BaseModelSpec(resolve_model_dir(ModelConfig(name="tiny-bert")), "classification", "float32", labels)


@pytest.fixture
def server_identity(monkeypatch):
    """Let a test build and reply to Flower messages outside a Flower runtime (as the server would)."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)
