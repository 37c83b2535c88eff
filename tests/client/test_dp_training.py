"""DP-SGD on LoRA adapters: exactness at zero noise, clipping, and what gets trained."""

from __future__ import annotations

import copy

import pytest
import torch

from fedtune.client.dp_training import LocalTrainPlan, train_adapter
from fedtune.common.config import LoraSettings
from fedtune.common.data.shapes import Example
from fedtune.common.models.lora import adapter_state, build_adapted_model
from fedtune.common.tasks.registry import task_for

CLASSIFICATION, QUESTION_ANSWER = task_for("classification"), task_for("question-answer")
QA = [
    Example("What is anemia?", "A condition in which the blood lacks healthy red blood cells."),
    Example("Who gets gout?", "Mostly adult men; risk rises with age and uric acid levels."),
    Example("Is asthma curable?", "No, but it can be controlled with medicines and by avoiding triggers."),
    Example("What causes flu?", "Influenza viruses."),
    Example(
        "How is diabetes diagnosed?", "With blood tests such as fasting glucose and the A1C test, repeated to confirm."
    ),
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


def _setup(spec, ffa=False, seed=0):
    model, tok = build_adapted_model(spec, LoraSettings(rank=4, alpha=8, ffa=ffa, init_seed=seed))
    # Move B off zero so gradients reach every LoRA matrix.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    task = task_for(spec.task)
    examples = INTENTS if task.classifies else QA
    return model, task.head.encode(examples, tok, list(spec.labels), 48)


@pytest.mark.parametrize("spec_name", ["tiny_llama_spec", "tiny_bert_spec"])
@pytest.mark.parametrize("ffa", [False, True])
def test_dp_step_without_noise_or_clipping_equals_plain_step(spec_name, ffa, request):
    """Known Opacus/peft breakage guard: DP-SGD at sigma=0 with no effective clipping is plain SGD."""
    spec = request.getfixturevalue(spec_name)
    model, data = _setup(spec, ffa)
    twin = copy.deepcopy(model)
    before = adapter_state(model, ffa=False)
    plan = LocalTrainPlan(steps=3, batch_size=4, lr=0.5, optimizer="sgd", seed=7)
    torch.manual_seed(0)  # same dropout masks in both runs
    train_adapter(model, data, task_for(spec.task), plan)
    torch.manual_seed(0)
    train_adapter(
        twin,
        data,
        task_for(spec.task),
        LocalTrainPlan(**{**plan.__dict__, "noise_multiplier": 0.0, "max_grad_norm": 1e6}),
    )
    plain, private = adapter_state(model, ffa=False), adapter_state(twin, ffa=False)
    moved = [k for k in plain if not torch.allclose(torch.from_numpy(plain[k]), torch.from_numpy(before[k]))]
    assert moved, "the plain step did not move any adapter weight"
    for key in plain:
        torch.testing.assert_close(torch.from_numpy(private[key]), torch.from_numpy(plain[key]), rtol=1e-5, atol=1e-7)
    if ffa:
        assert all("lora_A" not in k for k in moved), "FFA-LoRA must keep every A matrix frozen"
    else:
        assert any("lora_A" in k for k in moved) and any("lora_B" in k for k in moved)


def test_dp_step_clips_each_record_and_adds_calibrated_noise(tiny_bert_spec):
    """With a tiny clip bound the update is bounded by lr*C*B/B; with noise it differs from the noiseless one."""
    model, data = _setup(tiny_bert_spec)
    before = {k: torch.from_numpy(v) for k, v in adapter_state(model, ffa=False).items()}
    clip, lr = 1e-3, 1.0
    plan = LocalTrainPlan(
        steps=1, batch_size=6, lr=lr, optimizer="sgd", noise_multiplier=0.0, max_grad_norm=clip, seed=3
    )
    noisy_model = copy.deepcopy(model)
    train_adapter(model, data, CLASSIFICATION, plan)
    after = {k: torch.from_numpy(v) for k, v in adapter_state(model, ffa=False).items()}
    update = torch.sqrt(sum(((after[k] - before[k]) ** 2).sum() for k in after))
    assert 0 < update <= lr * clip * len(data) / plan.batch_size * (1 + 1e-4)
    train_adapter(noisy_model, data, CLASSIFICATION, LocalTrainPlan(**{**plan.__dict__, "noise_multiplier": 1.0}))
    noisy = {k: torch.from_numpy(v) for k, v in adapter_state(noisy_model, ffa=False).items()}
    assert any(not torch.allclose(noisy[k], after[k]) for k in after)


def test_training_touches_only_adapter_parameters(tiny_llama_spec):
    model, data = _setup(tiny_llama_spec)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    train_adapter(
        model, data, QUESTION_ANSWER, LocalTrainPlan(steps=2, batch_size=3, lr=0.1, noise_multiplier=1.0, seed=1)
    )
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name
        assert not hasattr(p, "grad_sample"), "Opacus state must not leak out of a round"


def test_class_weights_scale_each_record_loss_in_private_and_plain_steps(tiny_bert_spec):
    """Uniform weight 2 doubles an SGD step exactly; weights act on the loss, before DP clipping."""
    model, data = _setup(tiny_bert_spec)
    before = {k: torch.from_numpy(v) for k, v in adapter_state(model, ffa=False).items()}
    plan = LocalTrainPlan(steps=1, batch_size=6, lr=0.1, optimizer="sgd", seed=5)
    for private in (None, 0.0):
        moved = []
        for weights in ((), (2.0, 2.0, 2.0)):
            twin = copy.deepcopy(model)
            torch.manual_seed(0)  # same dropout masks in every run
            train_adapter(
                twin,
                data,
                CLASSIFICATION,
                LocalTrainPlan(
                    **{**plan.__dict__, "class_weights": weights, "noise_multiplier": private, "max_grad_norm": 1e6}
                ),
            )
            moved.append({k: torch.from_numpy(v) - before[k] for k, v in adapter_state(twin, ffa=False).items()})
        for key in before:
            torch.testing.assert_close(moved[1][key], 2 * moved[0][key], rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="classification only"):
        train_adapter(model, data, QUESTION_ANSWER, LocalTrainPlan(**{**plan.__dict__, "class_weights": (1.0,)}))


def _run(setup, plan, **changes):
    """A copy of the model trained under ``plan`` with ``changes``, as named tensors (same dropout masks every run)."""
    model, data = setup
    twin = copy.deepcopy(model)
    torch.manual_seed(0)
    train_adapter(twin, data, CLASSIFICATION, LocalTrainPlan(**{**plan.__dict__, **changes}))
    return {k: torch.from_numpy(v) for k, v in adapter_state(twin, ffa=False).items()}


def test_fedprox_dp_step_without_noise_or_clipping_equals_the_plain_proximal_step(tiny_bert_spec):
    """mu > 0: DP-SGD at sigma = 0 with no effective clipping moves the weights as plain SGD with the proximal term."""
    setup = _setup(tiny_bert_spec)
    plan = LocalTrainPlan(steps=4, batch_size=4, lr=0.5, optimizer="sgd", seed=7, proximal_mu=1.0)
    plain = _run(setup, plan)
    private = _run(setup, plan, noise_multiplier=0.0, max_grad_norm=1e6)
    without = _run(setup, plan, proximal_mu=0.0)
    for key in plain:
        torch.testing.assert_close(private[key], plain[key], rtol=1e-5, atol=1e-7)
    assert any(not torch.allclose(plain[k], without[k]) for k in plain), "the proximal term changed nothing"


@pytest.mark.parametrize("private", [False, True])
def test_the_proximal_gradient_is_mu_times_the_distance_from_the_global_adapter(tiny_bert_spec, private):
    """Full batches, SGD: step 1 starts at w_global (no proximal pull), so a second step with mu differs from one
    without by exactly -lr * mu * (w1 - w_global). Under DP the clip bound is tiny and the noise large: w1 is far
    from w_global, and the proximal gradient, added after clipping and noise, is not cut down to the clip bound.
    """
    setup = _setup(tiny_bert_spec)
    lr, mu, clip = 0.5, 0.8, 1e-4
    dp = dict(noise_multiplier=1e3, max_grad_norm=clip) if private else {}
    plan = LocalTrainPlan(steps=1, batch_size=len(setup[1]), lr=lr, optimizer="sgd", seed=3, **dp)
    start = {k: torch.from_numpy(v) for k, v in adapter_state(setup[0], ffa=False).items()}
    one, one_without = _run(setup, plan, proximal_mu=mu), _run(setup, plan)
    assert all(torch.equal(one[k], one_without[k]) for k in one), "w1 does not depend on mu"
    two_with, two_without = _run(setup, plan, steps=2, proximal_mu=mu), _run(setup, plan, steps=2)
    pull = {k: -lr * mu * (one[k] - start[k]) for k in start}
    for key in start:
        torch.testing.assert_close(two_with[key] - two_without[key], pull[key], rtol=1e-4, atol=1e-6)
    if private:
        norm = torch.sqrt(sum((v**2).sum() for v in pull.values()))
        assert norm > 100 * lr * clip, "the proximal gradient was clipped with the records' gradients"


def test_secure_noise_keeps_the_calibrated_std_and_draws_other_values(tiny_bert_spec):
    """Opacus' secure_mode sums four draws (then halves): the noise std sigma * C / batch is unchanged, so the
    accountant's epsilon still holds, and the values differ from the plain draw of the same seed."""
    sigma, batch = 1_000.0, 6
    updates = {}
    for secure in (False, True):
        model, data = _setup(tiny_bert_spec)
        before = adapter_state(model, ffa=False)
        plan = LocalTrainPlan(
            steps=1,
            batch_size=batch,
            lr=1.0,
            optimizer="sgd",
            noise_multiplier=sigma,
            max_grad_norm=1.0,
            seed=5,
            secure_noise=secure,
        )
        train_adapter(model, data, CLASSIFICATION, plan)
        after = adapter_state(model, ffa=False)
        updates[secure] = torch.cat([torch.from_numpy(after[k] - before[k]).flatten() for k in after])
    expected = sigma * 1.0 / batch  # the clipped gradients add at most 1 to any value
    for secure, u in updates.items():
        assert u.numel() > 2_000
        assert float(u.std()) == pytest.approx(expected, rel=0.06), f"secure_noise={secure}"
    assert not torch.allclose(updates[True], updates[False])
