"""Micro-batching a logical Poisson batch: the same records, the same clipped sum, one noise draw, one step."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from fedtune.client.dp_training import LocalTrainPlan, train_adapter
from fedtune.client.micro_batches import micro_batches
from fedtune.common.config import LoraSettings
from fedtune.common.models.lora import adapter_state, build_adapted_model
from fedtune.common.tasks.registry import task_for
from tests.client.test_dp_training import INTENTS, QA


def test_micro_batches_keep_every_index_in_order():
    idx = torch.tensor([3, 5, 8, 9, 13])
    chunks = micro_batches(idx, 2)
    assert [c.tolist() for c in chunks] == [[3, 5], [8, 9], [13]]
    assert [c.tolist() for c in micro_batches(idx, 0)] == [idx.tolist()]  # 0: no limit
    assert [c.tolist() for c in micro_batches(idx[:0], 2)] == [[]]  # an empty Poisson batch is still one step


def _setup(spec):
    model, tok = build_adapted_model(spec, LoraSettings(rank=4, alpha=8, dropout=0.0, init_seed=0))
    with torch.no_grad():  # B off zero: gradients reach A too
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    for module in model.modules():  # BERT's own dropout would draw different masks for differently shaped batches
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    task = task_for(spec.task)
    return model, task, task.head.encode(INTENTS if task.classifies else QA, tok, list(spec.labels), 48)


def _trained(model, data, task, plan, seen=None):
    model = copy.deepcopy(model)
    if seen is not None:
        real = data.batch
        data = copy.copy(data)
        data.batch = lambda idx: (seen.append([int(i) for i in idx]), real(idx))[1]
    result = train_adapter(model, data, task, plan)
    return adapter_state(model, ffa=False), result


@pytest.mark.parametrize("spec_name", ["tiny_llama_spec", "tiny_bert_spec"])
@pytest.mark.parametrize("sigma", [0.0, 1.0])
def test_micro_batched_dp_step_equals_the_whole_batch_step(spec_name, sigma, request):
    """Clipping active (C small), batches of ~5 in micro-batches of 2: the same records are drawn, the clipped
    sum is the same, and the noise is drawn once a step (sigma > 0 with the same seed: the same adapter)."""
    model, task, data = _setup(request.getfixturevalue(spec_name))
    plan = LocalTrainPlan(steps=2, batch_size=5, lr=0.5, optimizer="sgd", noise_multiplier=sigma, max_grad_norm=0.01)
    whole_seen: list[list[int]] = []
    micro_seen: list[list[int]] = []
    whole, whole_result = _trained(model, data, task, plan, whole_seen)
    micro_plan = LocalTrainPlan(**{**plan.__dict__, "max_physical_batch_size": 2})
    micro, micro_result = _trained(model, data, task, micro_plan, micro_seen)
    assert max(len(b) for b in micro_seen) <= 2 < max(len(b) for b in whole_seen)
    assert sum(micro_seen, []) == sum(whole_seen, [])  # exactly the records the Poisson draw picked, in order
    assert micro_result.records_seen == whole_result.records_seen
    assert micro_result.mean_loss == pytest.approx(whole_result.mean_loss, rel=1e-5)
    before = adapter_state(model, ffa=False)
    assert any(not np.allclose(before[k], whole[k]) for k in whole)  # the step moved the adapter
    for key in whole:
        np.testing.assert_allclose(micro[key], whole[key], atol=1e-6, rtol=0, err_msg=key)


def test_micro_batched_plain_step_equals_the_whole_batch_step(tiny_llama_spec):
    model, task, data = _setup(tiny_llama_spec)
    plan = LocalTrainPlan(steps=2, batch_size=6, lr=0.5, optimizer="sgd")
    whole, _ = _trained(model, data, task, plan)
    micro, _ = _trained(model, data, task, LocalTrainPlan(**{**plan.__dict__, "max_physical_batch_size": 4}))
    for key in whole:
        np.testing.assert_allclose(micro[key], whole[key], atol=1e-6, rtol=0, err_msg=key)


def test_gradient_checkpointing_keeps_the_per_record_gradients(tiny_llama_spec):
    """Re-entrant checkpointing (``place_model``) under Opacus: the same clipped, noised step as without it.
    With the non-re-entrant kind Opacus' hooks see no per-record gradients and the step fails."""
    from fedtune.common.models.placement import place_model

    model, task, data = _setup(tiny_llama_spec)
    plan = LocalTrainPlan(steps=2, batch_size=5, lr=0.5, optimizer="sgd", noise_multiplier=1.0, max_grad_norm=0.01)
    plain, _ = _trained(model, data, task, plan)
    checkpointed = place_model(copy.deepcopy(model), torch.device("cpu"), gradient_checkpointing=True)
    assert checkpointed.base_model.model.model.gradient_checkpointing
    recomputed, _ = _trained(checkpointed, data, task, plan)
    for key in plain:
        np.testing.assert_allclose(recomputed[key], plain[key], atol=1e-6, rtol=0, err_msg=key)
