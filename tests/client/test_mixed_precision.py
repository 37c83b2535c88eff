"""A bf16 base under DP-SGD: the LoRA tensors, their per-record gradients, the clipped sum and the noise stay fp32,
and the step moves the adapter as the fp32 step does, within a stated tolerance."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from fedtune.client.dp_training import LocalTrainPlan, train_adapter
from fedtune.common.config import LoraSettings
from fedtune.common.models.lora import adapter_state, build_adapted_model
from fedtune.common.models.placement import place_model
from fedtune.common.models.precision import keep_trainables_fp32
from fedtune.common.tasks.registry import task_for
from tests.client.test_dp_training import INTENTS, QA

#: Relative L2 distance allowed between the adapter updates of a bf16 base and of the same weights in fp32: bf16
#: keeps 8 bits of mantissa (2^-9 ~ 0.2 % a value), compounded through the layers and three steps. Seen here:
#: 0.2 % (tiny Llama), 1.7 % (tiny BERT with its trained head).
TOLERANCE = 0.05


def _model(spec, dtype):
    model, tok = build_adapted_model(dataclasses.replace(spec, dtype=dtype), LoraSettings(rank=4, alpha=8, dropout=0))
    with torch.no_grad():  # the same B, off zero, in both precisions
        gen = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    place_model(model, torch.device("cpu"))
    task = task_for(spec.task)
    return model, task, task.head.encode(INTENTS if task.classifies else QA, tok, list(spec.labels), 48)


def _dtypes_in_dp_step(monkeypatch) -> dict[str, set[torch.dtype]]:
    """The dtypes of what Opacus clips (grad_sample), sums (summed_grad) and noises (grad after pre_step)."""
    from opacus.optimizers import DPOptimizer

    seen: dict[str, set[torch.dtype]] = {"grad_sample": set(), "summed_grad": set(), "noised_grad": set()}
    real_clip, real_noise = DPOptimizer.clip_and_accumulate, DPOptimizer.add_noise

    def clip(self):
        seen["grad_sample"] |= {g.dtype for g in self.grad_samples}
        real_clip(self)
        seen["summed_grad"] |= {p.summed_grad.dtype for p in self.params}

    def noise(self):
        real_noise(self)
        seen["noised_grad"] |= {p.grad.dtype for p in self.params}

    monkeypatch.setattr(DPOptimizer, "clip_and_accumulate", clip)
    monkeypatch.setattr(DPOptimizer, "add_noise", noise)
    return seen


@pytest.mark.parametrize("spec_name", ["tiny_llama_spec", "tiny_bert_spec"])
def test_bf16_base_clips_and_noises_in_fp32_and_moves_the_adapter_like_fp32(spec_name, request, monkeypatch):
    spec = request.getfixturevalue(spec_name)
    plan = LocalTrainPlan(steps=3, batch_size=6, lr=0.5, optimizer="sgd", noise_multiplier=0.0, max_grad_norm=0.05)
    half, task, data = _model(spec, "bfloat16")
    # The fp32 twin computes with the very same (bf16-representable) base weights: only the arithmetic differs.
    full = copy.deepcopy(half).float()
    frozen = {p.dtype for p in half.parameters() if not p.requires_grad}
    assert frozen == {torch.bfloat16}  # the base really is bf16
    assert {p.dtype for p in half.parameters() if p.requires_grad} == {torch.float32}
    before = adapter_state(full, ffa=False)
    seen = _dtypes_in_dp_step(monkeypatch)
    train_adapter(half, data, task, plan)
    assert seen == {"grad_sample": {torch.float32}, "summed_grad": {torch.float32}, "noised_grad": {torch.float32}}
    train_adapter(full, data, task, plan)
    after_full, after_half = adapter_state(full, ffa=False), adapter_state(half, ffa=False)
    moved = np.concatenate([(after_full[k] - before[k]).ravel() for k in before])
    moved_half = np.concatenate([(after_half[k] - before[k]).ravel() for k in before])
    assert np.linalg.norm(moved) > 0
    assert np.linalg.norm(moved_half - moved) / np.linalg.norm(moved) < TOLERANCE


def test_a_trained_head_over_a_bf16_base_is_cast_to_fp32_with_its_inputs(tiny_bert_spec):
    """Without the cast a classifier's head would train in bf16 (peft keeps only the LoRA layers in fp32)."""
    model, _ = build_adapted_model(dataclasses.replace(tiny_bert_spec, dtype="bfloat16"), LoraSettings(rank=4))
    head = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}
    assert head and set(head.values()) == {torch.bfloat16}
    assert keep_trainables_fp32(model) == len(head)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    twin = copy.deepcopy(model)
    assert keep_trainables_fp32(twin) == 0  # idempotent
    batch = {"input_ids": torch.tensor([[101, 7, 9, 102]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    assert model(**batch).logits.dtype == torch.float32
