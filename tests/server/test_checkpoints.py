"""Checkpoints are complete peft adapters, written atomically; the newest complete one wins."""

from __future__ import annotations

import numpy as np
import pytest

from fedtune.common.config import LoraSettings
from fedtune.common.models.lora import adapter_state, build_adapted_model, load_adapter_state
from fedtune.server.checkpoints import CheckpointStore


def test_rounds_round_trip_and_half_written_dirs_are_ignored(tmp_path, tiny_bert_spec):
    from peft import PeftModel

    from fedtune.common.models.loading import load_base_model

    model, _ = build_adapted_model(tiny_bert_spec, LoraSettings(rank=4))
    state = {k: v + 0.5 for k, v in adapter_state(model, ffa=False).items()}
    load_adapter_state(model, state, ffa=False)
    store = CheckpointStore(tmp_path / "ckpt")
    store.save(1, model, {"status": "ok"})
    (tmp_path / "ckpt" / ".round-0002.abc.staging").mkdir()  # a crash mid-write
    (tmp_path / "ckpt" / "round-0003").mkdir()  # incomplete: no files
    latest = store.latest()
    assert latest is not None and latest.round == 1 and latest.info["status"] == "ok"
    loaded = PeftModel.from_pretrained(load_base_model(tiny_bert_spec), latest.directory)
    for key, value in adapter_state(loaded, ffa=False).items():
        np.testing.assert_allclose(value, state[key])


def test_adapter_state_refuses_foreign_tensors(tiny_bert_spec):
    model, _ = build_adapted_model(tiny_bert_spec, LoraSettings(rank=4))
    state = adapter_state(model, ffa=False)
    with pytest.raises(ValueError, match="do not match this model"):
        load_adapter_state(model, {**state, "extra.weight": np.zeros(2, np.float32)}, ffa=False)
    with pytest.raises(ValueError, match="missing"):
        load_adapter_state(model, dict(list(state.items())[1:]), ffa=False)
