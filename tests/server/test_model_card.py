"""Every exported model and adapter carries a model card with the facts a reader needs before using it."""

from __future__ import annotations

import math

import pytest
from huggingface_hub import ModelCard

from fedtune.common.config import config_from_dict
from fedtune.server.model_card import card_facts, render_card, site_privacy
from tests.trained_runs import DATA_DESCRIPTION, LABELS, build_run


def _records():
    def train(eps):
        return {"num-examples": 10, "steps": 2, "epsilon": eps, "noise-multiplier": 1.1, "sample-rate": 0.5}

    return [
        {"round": 0, "server": {"accuracy": 0.1}},
        {"round": 1, "server": {"accuracy": 0.6, "macro-f1": 0.5}, "train": {"a": train(1.0), "b": train(2.0)}},
        {"round": 2, "server": {"accuracy": 0.7}, "train": {"a": train(1.5)}, "site-level-epsilon": 9.0},
        {"round": 3, "server": {"accuracy": 0.65}, "train": {"a": train(2.5), "b": train(3.5)}},
    ]


def test_epsilon_per_site_by_the_card_round_and_by_the_whole_run():
    sites = {s.site: s for s in site_privacy(_records(), through=2, delta=1e-5)}
    assert (sites["a"].epsilon, sites["a"].epsilon_run, sites["a"].rounds_trained) == (1.5, 2.5, 2)
    assert (sites["b"].epsilon, sites["b"].epsilon_run, sites["b"].rounds_trained) == (2.0, 3.5, 1)
    assert sites["a"].delta == 1e-5


def _cfg(tmp_path, **run):
    data = tmp_path / "d.csv"
    data.write_text("text,label\nhi,x\n", encoding="utf-8")
    raw = {
        "run": {"name": "bank", **run},
        "model": {"name": "minilm-l6"},
        "data": {"path": str(data), "task": "classification", "labels": ["x", "y"]},
        "partition": {"num_clients": 2},
    }
    return config_from_dict(raw, "test", tmp_path)


def test_the_card_states_base_model_data_rounds_sites_privacy_and_metrics(tmp_path):
    cfg = _cfg(tmp_path, data_description="Queries of two banks, 2020.")
    facts = card_facts(cfg, _records(), round_=2, kind="merged", labels=("x", "y"), remote_code=True)
    assert (facts.round, facts.rounds_run, len(facts.sites), facts.site_level_epsilon) == (2, 3, 2, 9.0)
    assert facts.metrics == {"accuracy": 0.7}
    text = render_card(facts)
    card = ModelCard(text)
    assert card.data.base_model == "sentence-transformers/all-MiniLM-L6-v2"
    assert card.data.pipeline_tag == "text-classification" and "differential-privacy" in card.data.tags
    for fact in (
        "Queries of two banks, 2020.",
        "round 2 of the 3",
        "Sites that trained: 2",
        "| a | 2 | 1.5 | 1e-05 | 2.5 |",
        "| b | 1 | 2 | 1e-05 | 3.5 |",
        "Site-level DP (a whole site's participation): ε = 9",
        "| accuracy | 0.7 |",
        "trust_remote_code=True",
        f"fedtune {facts.fedtune_version}",
    ):
        assert fact in text, fact


def test_a_head_started_from_the_label_names_is_stated(tmp_path):
    cfg = _cfg(tmp_path)
    assert "label names" not in render_card(card_facts(cfg, _records(), 2, "merged", labels=("x", "y")))
    prior = cfg.model_copy(update={"model": cfg.model.model_copy(update={"head_init": "label_names"})})
    text = render_card(card_facts(prior, _records(), 2, "merged", labels=("x", "y")))
    assert "Head: started from the base model's features of the label names" in text and "no ε" in text


def test_without_dp_or_description_the_card_says_so(tmp_path):
    cfg = _cfg(tmp_path).model_copy(update={"privacy": _cfg(tmp_path).privacy.model_copy(update={"enabled": False})})
    records = [{"round": 1, "train": {"a": {"epsilon": math.inf}}, "server": {}}]
    text = render_card(card_facts(cfg, records, 1, "adapter"))
    assert "set `run.data_description`" in text and "∞ (no DP)" in text and "DP was off" in text
    assert ModelCard(text).data.library_name == "peft"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return build_run(tmp_path_factory.mktemp("card"))


def test_a_finished_run_writes_a_card_beside_the_merged_model_and_each_adapter(trained):
    merged = (trained.run_dir / "merged" / "README.md").read_text(encoding="utf-8")
    assert "merged model" in merged and "round 1 of the 2" in merged and DATA_DESCRIPTION in merged
    assert ", ".join(LABELS) in merged
    for round_ in (1, 2):
        card = (trained.run_dir / "checkpoints" / f"round-{round_:04d}" / "README.md").read_text(encoding="utf-8")
        assert f"LoRA adapter, round {round_}" in card and "PeftModel.from_pretrained" in card


def test_sites_that_joined_after_the_card_round_are_told_apart(tmp_path):
    records = [r for r in _records() if r["round"] != 1]  # site b first trains in round 3
    text = render_card(card_facts(_cfg(tmp_path), records, round_=2, kind="merged"))
    assert "Sites that trained: 1 by round 2, 2 in all" in text
    assert "| b | 0 | 0 | 1e-05 | 3.5 |" in text
