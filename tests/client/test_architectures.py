"""Every supported architecture, on a tiny random-init model built from its config (tests/models.py):

LoRA finds its targets at start, DP-SGD at zero noise equals plain SGD (the Opacus/peft guard of
test_dp_training.py), and a clipped DP step equals clipping each record's own gradient in a loop,
which fails if Opacus mixes records or mis-shapes a per-record gradient (GPT-2's ``Conv1D``).
An architecture whose LoRA targets Opacus cannot sample is refused at start, naming it.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from fedtune.client.dp_training import LocalTrainPlan, poisson_batches, train_adapter
from fedtune.common.config import ConfigError, LoraSettings
from fedtune.common.data.shapes import Example
from fedtune.common.models.loading import BaseModelSpec
from fedtune.common.models.lora import adapter_state, build_adapted_model, check_target_modules
from fedtune.common.tasks.registry import task_for
from tests.models import ARCHITECTURES, CLASSIFIER, build_tiny_model

LABELS = ("card_arrival", "card_linking", "exchange_rate")
QA = [
    Example("What is anemia?", "A lack of healthy red blood cells."),
    Example("Who gets gout?", "Mostly adult men."),
    Example("Is asthma curable?", "No, but it can be controlled."),
    Example("What causes flu?", "Influenza viruses."),
    Example("How is diabetes diagnosed?", "With blood tests such as fasting glucose."),
    Example("What is a stroke?", "Brain damage caused by interrupted blood flow."),
]
INTENTS = [
    Example("my card has not arrived yet", "card_arrival"),
    Example("how do I link my new card", "card_linking"),
    Example("what rate do you use for euros", "exchange_rate"),
    Example("still waiting for the card", "card_arrival"),
    Example("add a card to the app", "card_linking"),
    Example("is the exchange rate fixed", "exchange_rate"),
]


@pytest.fixture(scope="module")
def specs(tmp_path_factory) -> dict[str, BaseModelSpec]:
    root = tmp_path_factory.mktemp("architectures")
    return {
        model_type: (
            BaseModelSpec(build_tiny_model(model_type, root / model_type), "classification", "float32", LABELS)
            if model_type in CLASSIFIER
            else BaseModelSpec(build_tiny_model(model_type, root / model_type), "question-answer", "float32")
        )
        for model_type in ARCHITECTURES
    }


def _adapted(spec: BaseModelSpec):
    """The model with LoRA on its default targets, B moved off zero so that every LoRA matrix gets a gradient."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*fan_in_fan_out.*")  # peft must not have to correct us
        model, tokenizer = build_adapted_model(spec, LoraSettings(rank=4, alpha=8))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    task = task_for(spec.task)
    return model, task.head.encode(INTENTS if task.classifies else QA, tokenizer, list(spec.labels), 48)


def _tensors(model) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in adapter_state(model, ffa=False).items()}


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_lora_targets_of_each_architecture_are_found_and_linear(specs, model_type):
    spec = specs[model_type]
    check_target_modules(spec, LoraSettings())  # the start-time check, with the architecture's default targets
    model, _ = _adapted(spec)
    assert model.config.model_type == model_type
    lora = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    assert len(lora) >= 2 * model.config.num_hidden_layers, lora


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_dp_step_without_noise_or_clipping_equals_plain_step(specs, model_type):
    spec = specs[model_type]
    model, data = _adapted(spec)
    twin, before = copy.deepcopy(model), _tensors(model)
    plan = LocalTrainPlan(steps=2, batch_size=4, lr=0.5, optimizer="sgd", seed=7)
    train_adapter(model, data, task_for(spec.task), plan)
    train_adapter(
        twin,
        data,
        task_for(spec.task),
        LocalTrainPlan(**{**plan.__dict__, "noise_multiplier": 0.0, "max_grad_norm": 1e6}),
    )
    plain, private = _tensors(model), _tensors(twin)
    moved = [k for k in plain if not torch.allclose(plain[k], before[k])]
    assert any("lora_A" in k for k in moved) and any("lora_B" in k for k in moved), moved
    for key in plain:
        torch.testing.assert_close(private[key], plain[key], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_clipped_dp_step_equals_clipping_each_records_gradient(specs, model_type):
    """One DP step (sigma = 0, a clip bound below every record's gradient norm) against the definition:
    w - lr * sum_i clip_C(g_i) / B, each g_i the gradient of record i's own loss in the same batch."""
    spec = specs[model_type]
    task = task_for(spec.task)
    model, data = _adapted(spec)
    clip, lr = 1e-4, 1.0
    plan = LocalTrainPlan(
        steps=1, batch_size=4, lr=lr, optimizer="sgd", noise_multiplier=0.0, max_grad_norm=clip, seed=5
    )
    (idx,) = poisson_batches(len(data), plan.sample_rate(len(data)), 1, torch.Generator().manual_seed(plan.seed))
    assert len(idx) >= 2, "the reference needs a batch of several records"
    reference = copy.deepcopy(model)
    reference.train()
    params = {n: p for n, p in reference.named_parameters() if p.requires_grad}
    losses = task.head.per_sample_loss(reference, data.batch(idx))
    summed = {n: torch.zeros_like(p) for n, p in params.items()}
    norms = []
    for i in range(len(idx)):
        grads = torch.autograd.grad(losses[i], list(params.values()), retain_graph=True, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params.values(), strict=True)]
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        norms.append(float(norm))
        for name, g in zip(params, grads, strict=True):
            summed[name] += g * min(1.0, clip / float(norm))
    assert min(norms) > clip, "every record must be clipped for the check to bite"
    expected = {n: (p - lr * summed[n] / plan.batch_size).detach() for n, p in params.items()}
    train_adapter(model, data, task, plan)
    trained = dict(model.named_parameters())
    for name, value in expected.items():
        torch.testing.assert_close(trained[name].detach(), value, rtol=1e-4, atol=1e-9)


def test_gpt2_conv1d_targets_are_adapted_transposed(specs):
    """GPT-2 stores c_attn as a ``Conv1D`` (weight in x out): LoRA must be told (fan_in_fan_out), not guess."""
    model, _ = _adapted(specs["gpt2"])
    assert model.peft_config["default"].fan_in_fan_out is True
    llama, _ = _adapted(specs["llama"])
    assert llama.peft_config["default"].fan_in_fan_out is False


def test_lora_on_embeddings_is_refused_at_start_under_dp(specs):
    """Opacus cannot sample LoRA's embedding matrices: the DP step fails, so the start-time check refuses them."""
    spec = specs["llama"]
    settings = LoraSettings(rank=4, alpha=8, target_modules=["q_proj", "embed_tokens"])
    with pytest.raises(ConfigError) as info:
        check_target_modules(spec, settings)
    message = str(info.value)
    assert message.startswith(
        "lora.target_modules: model type 'llama' cannot be trained with DP-SGD on 'embed_tokens' (Embedding): "
        "Opacus computes per-record gradients of LoRA on linear layers only; set lora.target_modules to some of: "
        "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"
    ), message
    check_target_modules(spec, settings, private=False)  # without DP-SGD peft trains them fine
    model, tokenizer = build_adapted_model(spec, settings)
    data = task_for(spec.task).head.encode(QA, tokenizer, [], 48)
    with pytest.raises(ValueError, match="Per sample gradient is not initialized"):
        train_adapter(
            model, data, task_for(spec.task), LocalTrainPlan(steps=1, batch_size=4, lr=0.1, noise_multiplier=0.0)
        )
