"""A site's local optimiser state across rounds (train.keep_optimizer_state).

Privacy: the kept state is Adam's moments of the clipped, noised gradients the DP optimiser hands
its wrapped optimiser, recomputed here from those gradients alone; the file holds nothing else,
and the ledger charges a run the same with and without it. Persistence: round 2 starts from round
1's moments; off, every round starts fresh. A round asked again starts from where its first
attempt started; a replayed round leaves the state alone; another run id or shape starts fresh.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from fedtune.client import dp_training
from fedtune.client.dp_training import LocalTrainPlan, train_adapter
from fedtune.client.optimizer_state import STATE_KEYS, OptimizerStateStore
from fedtune.common.config import LoraSettings, load_config
from fedtune.common.data.federation_data import SiteSplit
from fedtune.common.data.shapes import Example
from fedtune.common.models.lora import adapter_state, build_adapted_model
from fedtune.common.tasks.registry import task_for
from tests.client.test_site import SAMPLES
from tests.plans import train_plan

INTENTS = [
    Example("my card has not arrived yet", "card_arrival"),
    Example("how do I link my new card", "card_linking"),
    Example("what rate do you use for euros", "exchange_rate"),
    Example("still waiting for the card", "card_arrival"),
    Example("add a card to the app", "card_linking"),
    Example("is the exchange rate fixed", "exchange_rate"),
]


def _noised_gradients(monkeypatch) -> list[list[torch.Tensor]]:
    """Every gradient the wrapped Adam steps on, as it sees it (after Opacus clipped, noised and averaged)."""
    seen: list[list[torch.Tensor]] = []
    original = torch.optim.Adam.step

    def step(self, *args, **kwargs):
        seen.append([p.grad.detach().clone() for group in self.param_groups for p in group["params"]])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    return seen


def _adam_moments(grads: list[list[torch.Tensor]], start=None, betas=(0.9, 0.999)):
    """Adam's exp_avg, exp_avg_sq and step recomputed from the gradients alone (Kingma & Ba 2015, Alg. 1)."""
    m = [torch.zeros_like(g) for g in grads[0]] if start is None else [torch.tensor(s["exp_avg"]) for s in start]
    v = [torch.zeros_like(g) for g in grads[0]] if start is None else [torch.tensor(s["exp_avg_sq"]) for s in start]
    steps = 0 if start is None else float(start[0]["step"])
    for step in grads:
        m = [betas[0] * a + (1 - betas[0]) * g for a, g in zip(m, step, strict=True)]
        v = [betas[1] * b + (1 - betas[1]) * g * g for b, g in zip(v, step, strict=True)]
        steps += 1
    return m, v, steps


def test_the_kept_moments_are_adams_of_the_noised_gradients_alone(tiny_bert_spec, monkeypatch):
    model, tok = build_adapted_model(tiny_bert_spec, LoraSettings(rank=4, alpha=8))
    task = task_for("classification")
    data = task.head.encode(INTENTS, tok, list(tiny_bert_spec.labels), 32)
    plan = LocalTrainPlan(steps=3, batch_size=3, lr=0.01, optimizer="adam", noise_multiplier=1.0, seed=5)
    grads = _noised_gradients(monkeypatch)
    first = train_adapter(model, data, task, plan)
    assert len(grads) == 3 and len(first.optimizer_state) == len(grads[0])
    assert all(set(tensor) == STATE_KEYS for tensor in first.optimizer_state)
    m, v, steps = _adam_moments(grads)
    for saved, a, b in zip(first.optimizer_state, m, v, strict=True):
        np.testing.assert_allclose(saved["exp_avg"], a.numpy(), rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(saved["exp_avg_sq"], b.numpy(), rtol=1e-4, atol=1e-9)
        assert float(saved["step"]) == steps
    # The second round resumes exactly from the first's moments, at its own learning rate.
    grads.clear()
    later = LocalTrainPlan(**{**plan.__dict__, "lr": 0.002, "seed": 6})
    second = train_adapter(model, data, task, later, optimizer_state=first.optimizer_state)
    m, v, steps = _adam_moments(grads, first.optimizer_state)
    np.testing.assert_allclose(second.optimizer_state[0]["exp_avg"], m[0].numpy(), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(second.optimizer_state[0]["exp_avg_sq"], v[0].numpy(), rtol=1e-4, atol=1e-9)
    assert float(second.optimizer_state[0]["step"]) == steps == 6


def test_a_state_of_the_wrong_shape_is_refused_by_the_optimiser(tiny_bert_spec):
    model, _ = build_adapted_model(tiny_bert_spec, LoraSettings(rank=4, alpha=8))
    params = [p for p in model.parameters() if p.requires_grad]
    wrong = tuple({"exp_avg": np.zeros((1, 1), np.float32), "step": np.float32(1)} for _ in params)
    with pytest.raises(ValueError, match="optimizer state 'exp_avg' of shape"):
        dp_training.load_optimizer_state(torch.optim.Adam(params), params, wrong)


@pytest.fixture()
def make_site(tmp_path, tiny_llama_spec):
    from fedtune.client.site import Site

    def make(name: str, keep: bool):
        toml = tmp_path / f"{name}.toml"
        toml.write_text(
            f'[model]\nname = "tiny-llama"\nmax_length = 32\n[data]\ntask = "question-answer"\n'
            f'path = "{SAMPLES / "medquad" / "medquad_sample.jsonl"}"\n'
            f"[train]\nkeep_optimizer_state = {str(keep).lower()}\n"
        )
        split = SiteSplit(train=[Example(f"q {i}?", f"answer {i}.") for i in range(60)], val=[Example("q?", "a.")] * 2)
        return Site(name, load_config(toml), tiny_llama_spec, split, tmp_path / name)

    return make


def _request(round_: int, **kw):
    base = dict(run_id="run-1", round=round_, local_steps=2, lr=0.01, optimizer="adam", target_epsilon=3.0, delta=1e-3)
    return train_plan(**{**base, **kw})


def _spy(monkeypatch) -> list[tuple]:
    """The optimiser state each training started from, and the one it ended with."""
    calls: list[tuple] = []
    real = dp_training.train_adapter

    def spy(*args, **kwargs):
        result = real(*args, **kwargs)
        calls.append((kwargs.get("optimizer_state", ()), result.optimizer_state))
        return result

    monkeypatch.setattr("fedtune.client.site.train_adapter", spy)
    return calls


def _same(a, b) -> bool:
    return len(a) == len(b) and all(
        set(x) == set(y) and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b, strict=True)
    )


def test_round_two_starts_from_round_ones_moments_and_a_replay_leaves_them(make_site, monkeypatch):
    site, calls = make_site("keeps", keep=True), _spy(monkeypatch)
    adapter = adapter_state(site.model, ffa=False)
    first = site.train(_request(1), adapter)
    saved = site.optimizer_states.path.read_bytes()
    site.train(_request(1), adapter)  # the same request again: replayed, no training
    assert len(calls) == 1 and site.optimizer_states.path.read_bytes() == saved
    site.train(_request(2), first.adapter)
    assert calls[0][0] == () and _same(calls[1][0], calls[0][1]), "round 2 did not start from round 1's moments"
    with np.load(site.optimizer_states.path, allow_pickle=False) as npz:
        names = {k.split("/")[-1] for k in npz.files if k != "__meta__"}
        assert names == STATE_KEYS and json.loads(str(npz["__meta__"]))["round"] == 2


def test_a_round_trained_again_starts_where_its_first_attempt_started(make_site, monkeypatch):
    """The site's reply to round 2 was lost before its replay record was written (a crash): asked
    again, it trains round 2 again from round 1's moments, not from the first attempt's end."""
    site = make_site("retrain", keep=True)
    first = site.train(_request(1, total_rounds=3), adapter_state(site.model, ffa=False))
    monkeypatch.setattr(site, "_remember", lambda *a: (_ for _ in ()).throw(OSError("disk gone")))
    with pytest.raises(OSError):
        site.train(_request(2, total_rounds=3), first.adapter)
    monkeypatch.undo()
    calls = _spy(monkeypatch)
    site.train(_request(2, total_rounds=3), first.adapter)
    state = OptimizerStateStore(site.optimizer_states.path)
    shapes = [tuple(p.shape) for p in site.model.parameters() if p.requires_grad]
    assert _same(calls[0][0], state.load("run-1", 2, "adam", shapes)), "round 2 started from its own first attempt"
    assert float(calls[0][0][0]["step"]) == 2.0  # round 1's two steps, not four


def test_off_every_round_starts_fresh_and_nothing_is_kept(make_site, monkeypatch):
    site, calls = make_site("fresh", keep=False), _spy(monkeypatch)
    first = site.train(_request(1), adapter_state(site.model, ffa=False))
    site.train(_request(2), first.adapter)
    assert [c[0] for c in calls] == [(), ()]
    assert not site.optimizer_states.path.exists()


def test_keeping_the_state_costs_no_privacy(make_site):
    ledgers = []
    for name, keep in (("with", True), ("without", False)):
        site = make_site(name, keep)
        first = site.train(_request(1), adapter_state(site.model, ffa=False))
        second = site.train(_request(2), first.adapter)
        entries = json.loads(site.ledger_path.read_text())["entries"]
        ledgers.append(([(e["round"], e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in entries], second))
    (with_state, kept), (without_state, fresh) = ledgers
    assert with_state == without_state and kept.epsilon_spent == fresh.epsilon_spent


def test_another_run_or_shape_starts_fresh_with_a_log_line(tmp_path, caplog):
    store = OptimizerStateStore(tmp_path / "optimizer_state.npz")
    after = (
        {"exp_avg": np.ones((2, 3), np.float32), "exp_avg_sq": np.ones((2, 3), np.float32), "step": np.float32(4)},
    )
    store.save("run-1", 3, "adam", (), after)
    assert _same(store.load("run-1", 4, "adam", [(2, 3)]), after)
    assert store.load("run-1", 3, "adam", [(2, 3)]) == ()  # round 3 again: it started fresh
    with caplog.at_level(logging.WARNING, logger="fedtune.site"):
        assert store.load("run-2", 4, "adam", [(2, 3)]) == ()
        assert store.load("run-1", 4, "adam", [(4, 3)]) == ()
        assert store.load("run-1", 4, "sgd", [(2, 3)]) == ()
        assert store.load("run-1", 2, "adam", [(2, 3)]) == ()
    assert [r.getMessage().split(": ", 1)[1] for r in caplog.records] == [
        "starting a fresh optimiser: the saved state is of run 'run-1', not 'run-2'",
        "starting a fresh optimiser: the saved exp_avg of tensor 0 has shape (2, 3), the adapter's is (4, 3)",
        "starting a fresh optimiser: the saved state is of optimiser 'adam'",
        "starting a fresh optimiser: the saved state is of a later round (3)",
    ]
    with pytest.raises(ValueError, match="holds more than"):
        store.save("run-1", 4, "adam", (), ({"grad": np.zeros(3)},))
