"""The DP-overhead benchmark compares like with like: its ghost-clipping step is fedtune's DP-SGD step."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedtune.client.dp_training import LocalTrainPlan, train_adapter
from fedtune.common.config import LoraSettings, load_config, preset_path
from fedtune.common.data.encoding import EncodedSet
from fedtune.common.models.lora import adapter_state, build_adapted_model, load_adapter_state
from fedtune.common.tasks.registry import task_for
from tests.benchmarks.scripts import load_benchmark_module, load_benchmark_script

dp_overhead = load_benchmark_script("dp_overhead")
ghost_clipping = load_benchmark_module("ghost_clipping")


@pytest.fixture()
def bert_and_batch(tiny_bert_spec):
    model, _ = build_adapted_model(tiny_bert_spec, LoraSettings(rank=2, alpha=4))
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 200, size=(6, 12)).tolist()
    data = EncodedSet(ids, [0, 1, 2, 0, 1, 2], pad_token_id=0)
    # Non-zero B, so that A gets gradients too and every LoRA matrix is clipped.
    start = {k: rng.normal(0, 0.5, v.shape).astype(np.float32) for k, v in adapter_state(model, False).items()}
    load_adapter_state(model, start, False)
    return model, data, start


def _delta_after(model, data, start, private: str) -> np.ndarray:
    load_adapter_state(model, start, False)
    torch.manual_seed(0)  # the same dropout masks in every variant
    plan = LocalTrainPlan(
        steps=1,
        batch_size=len(data),
        lr=1.0,
        optimizer="sgd",
        noise_multiplier=None if private == "none" else 0.0,
        max_grad_norm=0.05,
    )
    if private == "ghost":
        ghost_clipping.ghost_clipping_train(model, data, task_for("classification"), plan)
    else:
        train_adapter(model, data, task_for("classification"), plan)
    after = adapter_state(model, False)
    return np.concatenate([(after[k] - start[k]).ravel() for k in sorted(start)])


def test_ghost_clipping_step_equals_per_sample_clipping(bert_and_batch):
    hooks = _delta_after(*bert_and_batch, "hooks")
    ghost = _delta_after(*bert_and_batch, "ghost")
    plain = _delta_after(*bert_and_batch, "none")
    assert np.linalg.norm(hooks) > 0
    np.testing.assert_allclose(ghost, hooks, rtol=1e-4, atol=1e-7)
    # Clipping was active: the clipped mean gradient is shorter than max_grad_norm, the plain one is not.
    assert np.linalg.norm(hooks) <= 0.05 + 1e-6 < np.linalg.norm(plain)


def test_ghost_clipping_leaves_no_hooks(bert_and_batch):
    model, data, _ = bert_and_batch
    ghost_clipping.ghost_clipping_train(
        model, data, task_for("classification"), LocalTrainPlan(steps=1, batch_size=6, lr=1e-3, noise_multiplier=1.0)
    )
    assert not any(hasattr(p, attr) for p in model.parameters() for attr in ("grad_sample", "_norm_sample"))
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())


def test_train_variant_freezes_a_only_under_ffa(bert_and_batch):
    model, data, _ = bert_and_batch
    cfg = load_config(preset_path("banking77-minilm"))
    ffa = dp_overhead.train_variant(cfg, model, data, dp_overhead.Variant("x", "none", False), 1)
    lora = dp_overhead.train_variant(cfg, model, data, dp_overhead.Variant("y", "none", True), 1)
    a_values = sum(p.numel() for n, p in model.named_parameters() if "lora_A" in n)
    assert lora - ffa == a_values > 0
