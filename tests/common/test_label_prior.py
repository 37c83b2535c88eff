"""The label-name prior: the head starts as a nearest-label-name classifier, built from the label list alone."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fedtune.common.config import ConfigError, LoraSettings, load_config, preset_path
from fedtune.common.models.label_prior import install_label_prior, label_text
from fedtune.common.models.lora import adapter_state, build_adapted_model

LABELS = (
    "card_arrival",
    "card_linking",
    "exchange_rate",
    "lost_or_stolen_card",
    "age_limit",
    "pin_blocked",
    "top-up by bank transfer",
    "cash_withdrawal_charge",
)


def _predict(model, tokenizer, texts: list[str]) -> list[int]:
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits.argmax(dim=1).tolist()


def test_label_names_read_as_words():
    assert label_text("lost_or_stolen_card") == "lost or stolen card"
    assert label_text("top-up  by_bank") == "top up by bank"
    assert label_text("___") == "___"  # nothing but separators: kept as given rather than emptied


def test_the_prior_classifies_each_label_name_as_its_own_label(tiny_bert_spec):
    spec = dataclasses.replace(tiny_bert_spec, labels=LABELS, head_init="label_names", head_init_scale=2.5)
    model, tokenizer = build_adapted_model(spec, LoraSettings(rank=2))
    model.eval()
    names = [label_text(label) for label in LABELS]
    assert _predict(model, tokenizer, names) == list(range(len(LABELS)))
    head = model.base_model.model.classifier.modules_to_save["default"]
    assert torch.allclose(head.weight.norm(dim=1), torch.full((len(LABELS),), 2.5))
    assert not head.bias.any()
    # the same model with the architecture's random head does not: the test can fail
    random_model, _ = build_adapted_model(dataclasses.replace(spec, head_init="random"), LoraSettings(rank=2))
    assert _predict(random_model.eval(), tokenizer, names) != list(range(len(LABELS)))


def test_the_prior_is_in_the_adapter_the_server_sends_and_the_same_in_every_process(tiny_bert_spec):
    spec = dataclasses.replace(tiny_bert_spec, labels=LABELS, head_init="label_names")
    first = adapter_state(build_adapted_model(spec, LoraSettings(rank=2))[0], ffa=False)
    again = adapter_state(build_adapted_model(spec, LoraSettings(rank=2))[0], ffa=False)
    random_head = adapter_state(
        build_adapted_model(dataclasses.replace(spec, head_init="random"), LoraSettings(rank=2))[0], ffa=False
    )
    heads = [key for key in first if "classifier" in key and key.endswith("weight")]
    assert heads
    for key in heads:
        assert (first[key] == again[key]).all()
        assert not (first[key] == random_head[key]).all()


def test_the_prior_leaves_the_model_in_the_mode_it_found(tiny_bert_spec):
    from fedtune.common.models.loading import load_base_model, load_tokenizer

    spec = dataclasses.replace(tiny_bert_spec, labels=LABELS)
    model, tokenizer = load_base_model(spec), load_tokenizer(spec)
    model.train()
    install_label_prior(model, tokenizer, LABELS, 1.0, 16)
    assert model.training


def test_a_head_over_token_states_is_refused_naming_the_model(tiny_llama_spec):
    spec = dataclasses.replace(tiny_llama_spec, task="classification", labels=LABELS, head_init="label_names")
    with pytest.raises(ConfigError, match=r"model.head_init = 'label_names'.*llama.*set model.head_init = 'random'"):
        build_adapted_model(spec, LoraSettings(rank=2))


def test_a_run_on_a_model_whose_head_cannot_take_the_prior_is_refused_before_anything_is_written(tmp_path):
    from fedtune.common.models.lora import checked_model_spec

    overrides = ["model.name='tiny-llama'", "lora.target_modules=['q_proj', 'v_proj']", f"run.output_dir='{tmp_path}'"]
    cfg = load_config(preset_path("banking77-minilm"), [*overrides, "model.head_init='label_names'"])
    with pytest.raises(ConfigError, match=r"needs a single linear head.*LlamaForSequenceClassification \(llama\)"):
        checked_model_spec(cfg)
    assert list(tmp_path.iterdir()) == []
    assert checked_model_spec(load_config(preset_path("banking77-minilm"), overrides)).head_init == "random"
    encoder = load_config(preset_path("banking77-minilm"), ["model.name='tiny-bert'", "model.head_init='label_names'"])
    assert checked_model_spec(encoder).head_init == "label_names"


def test_a_generative_task_with_a_label_prior_is_refused_at_the_config():
    with pytest.raises(ConfigError, match=r"model.head_init = 'label_names' starts a classification head"):
        load_config(preset_path("medquad-smollm2"), ["model.head_init='label_names'"])


def test_minilm_with_the_prior_reads_banking_intents_before_any_training():
    """On the shipped Banking77 sample the real encoder's prior is far above chance (1/77) before any step."""
    from fedtune.common.data.encoding import encode_classification
    from fedtune.common.data.federation_data import load_test_set
    from fedtune.common.models.loading import model_spec

    cfg = load_config(preset_path("banking77-minilm"), ["model.head_init='label_names'", "data.max_eval_examples=200"])
    spec = model_spec(cfg)
    data = encode_classification(load_test_set(cfg), *_tokenizer_and_labels(spec), cfg.model.max_length)
    prior, _ = build_adapted_model(spec, cfg.lora)
    random_head, _ = build_adapted_model(dataclasses.replace(spec, head_init="random"), cfg.lora)
    with_prior = cfg.task.head.evaluate(prior.eval(), data, 64)["accuracy"]
    without = cfg.task.head.evaluate(random_head.eval(), data, 64)["accuracy"]
    assert with_prior > 0.4 > 0.1 > without


def _tokenizer_and_labels(spec):
    from fedtune.common.models.loading import load_tokenizer

    return load_tokenizer(spec), list(spec.labels)
