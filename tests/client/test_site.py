"""A site decides for itself: it calibrates its noise, keeps its ledger, and refuses when spent."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedtune.client.site import Site, SiteRefusal
from fedtune.common.config import load_config
from fedtune.common.data.federation_data import SiteSplit
from fedtune.common.data.shapes import Example
from fedtune.common.privacy.accounting import epsilon_spent
from fedtune.common.wire import TrainPlan
from tests.plans import train_plan

SAMPLES = Path(__file__).resolve().parents[2] / "common" / "data" / "samples"


@pytest.fixture()
def site(tmp_path, tiny_llama_spec):
    toml = tmp_path / "c.toml"
    toml.write_text(f"""
[model]
name = "tiny-llama"
max_length = 32
[data]
task = "question-answer"
path = "{SAMPLES / "medquad" / "medquad_sample.jsonl"}"
""")
    cfg = load_config(toml)
    split = SiteSplit(
        train=[Example(f"question {i}?", f"answer number {i}.") for i in range(60)],
        val=[Example("question x?", "answer x.")] * 4,
    )
    return Site("site-0", cfg, tiny_llama_spec, split, tmp_path / "site-0")


def _request(round_: int, **kw) -> TrainPlan:
    base = dict(run_id="run-1", round=round_, local_steps=3, lr=0.01, optimizer="adam", target_epsilon=3.0, delta=1e-3)
    return train_plan(**{**base, **kw})


def test_site_spends_within_budget_then_refuses(site):
    from fedtune.common.models.lora import adapter_state

    adapter = adapter_state(site.model, ffa=False)
    first = site.train(_request(1), adapter)
    second = site.train(_request(2), first.adapter)
    ledger = json.loads(site.ledger_path.read_text())
    assert [e["round"] for e in ledger["entries"]] == [1, 2]
    history = [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in ledger["entries"]]
    assert second.epsilon_spent == pytest.approx(epsilon_spent(history, 1e-3), rel=1e-9)
    assert first.epsilon_spent < second.epsilon_spent <= 3.0
    assert first.sample_rate == pytest.approx(8 / 60)
    before = site.ledger_path.read_bytes()
    with pytest.raises(SiteRefusal, match="privacy budget exhausted"):
        site.train(_request(3), second.adapter)
    assert site.ledger_path.read_bytes() == before


def test_site_refuses_delta_not_below_one_over_n(site):
    from fedtune.common.models.lora import adapter_state

    with pytest.raises(SiteRefusal, match=r"delta=0.05 is not below 1/n = 1/60"):
        site.train(_request(1, delta=0.05), adapter_state(site.model, ffa=False))
    assert not site.ledger_path.exists()


def test_a_repeated_request_replays_the_released_update_without_new_cost(site):
    from fedtune.common.models.lora import adapter_state

    adapter = adapter_state(site.model, ffa=False)
    first = site.train(_request(1), adapter)
    ledger = site.ledger_path.read_bytes()
    again = site.train(_request(1), adapter)
    assert site.ledger_path.read_bytes() == ledger
    assert again.epsilon_spent == first.epsilon_spent
    for key in first.adapter:
        np.testing.assert_array_equal(again.adapter[key], first.adapter[key])


def test_a_round_is_trained_once_a_changed_or_earlier_request_is_refused(site):
    """Budget burning (issue 15): re-asking a trained round with a slightly changed adapter used to make the
    site train and spend again (two ledger entries for round 1); now it is refused and nothing is spent."""
    from fedtune.common.models.lora import adapter_state

    adapter = adapter_state(site.model, ffa=False)
    first = site.train(_request(1), adapter)
    ledger = site.ledger_path.read_bytes()
    changed = {k: v + 1e-3 for k, v in adapter.items()}
    with pytest.raises(SiteRefusal, match="round 1 was already trained from another global adapter"):
        site.train(_request(1), changed)
    assert site.ledger_path.read_bytes() == ledger
    site.train(_request(2), first.adapter)  # the next round trains as usual
    with pytest.raises(SiteRefusal, match="round 1 asked after round 2 of this run was trained"):
        site.train(_request(1), adapter)
    assert [e["round"] for e in json.loads(site.ledger_path.read_text())["entries"]] == [1, 2]


def test_balanced_class_weights_come_from_a_dp_histogram_charged_once(tmp_path, tiny_bert_spec):
    from fedtune.common.models.lora import adapter_state

    labels = list(tiny_bert_spec.labels)
    toml = tmp_path / "c.toml"
    toml.write_text(f"""
[model]
name = "tiny-bert"
max_length = 16
[data]
path = "{SAMPLES / "banking77" / "train.csv"}"
labels = {json.dumps(labels)}
[train]
class_weighting = "balanced"
[privacy]
histogram_noise = 5.0
""")
    cfg = load_config(toml)
    # 90 / 20 / 10 records: the rarest class should weigh most.
    train = [Example(f"text {i}", labels[0 if i < 90 else 1 if i < 110 else 2]) for i in range(120)]
    site = Site("site-0", cfg, tiny_bert_spec, SiteSplit(train=train, val=[]), tmp_path / "site-0")
    first = site.train(_request(1, delta=1e-3), adapter_state(site.model, ffa=False))
    site.train(_request(2, delta=1e-3), first.adapter)
    ledger = json.loads(site.ledger_path.read_text())
    assert [(e["mechanism"], e["round"]) for e in ledger["entries"]] == [
        ("label-histogram", 1),
        ("dp-sgd", 1),
        ("dp-sgd", 2),
    ]
    assert (ledger["entries"][0]["noise_multiplier"], ledger["entries"][0]["sample_rate"]) == (5.0, 1.0)
    history = [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in ledger["entries"]]
    assert 2.9 <= epsilon_spent(history, 1e-3) <= 3.0, "the histogram shares the budget; noise was calibrated for it"
    weights = json.loads((tmp_path / "site-0" / "class_weights.json").read_text())["weights"]
    assert weights[0] < weights[2]


def test_the_plans_proximal_mu_reaches_training_and_w_global_is_the_servers_adapter(site, monkeypatch):
    """FedProx on the site: train_adapter gets the plan's mu while the model holds the adapter the server sent."""
    from fedtune.client import site as site_module
    from fedtune.client.dp_training import LocalTrainResult
    from fedtune.common.models.lora import adapter_state

    seen = {}

    def fake_train(model, data, task, plan, optimizer_state=()):
        seen["plan"], seen["start"] = plan, adapter_state(model, ffa=False)
        return LocalTrainResult(steps=plan.steps, mean_loss=0.0, records_seen=0, sample_rate=0.1)

    monkeypatch.setattr(site_module, "train_adapter", fake_train)
    sent = {k: v + 0.25 for k, v in adapter_state(site.model, ffa=False).items()}
    site.train(_request(1, proximal_mu=0.05), sent)
    assert seen["plan"].proximal_mu == 0.05 and seen["plan"].noise_multiplier is not None
    for key, value in sent.items():
        np.testing.assert_array_equal(seen["start"][key], value)
