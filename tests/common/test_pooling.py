"""Mean pooling of encoder classifiers: mask-aware, trained, private and exported as one network."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fedtune.common.config import LoraSettings
from fedtune.common.models.loading import load_base_model, load_exported_classifier
from fedtune.common.models.lora import build_adapted_model
from fedtune.common.models.pooling import POOLING_KEY, MaskedMeanPooler, resolve_pooling


def test_pooler_averages_only_the_kept_positions():
    hidden = torch.randn(2, 5, 3)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    pooler = MaskedMeanPooler()
    pooler.mask = mask
    out = pooler(hidden)
    torch.testing.assert_close(out[0], hidden[0, :3].mean(0))
    torch.testing.assert_close(out[1], hidden[1].mean(0))
    hidden[0, 3:] = 1e6  # what padding positions hold must not matter
    torch.testing.assert_close(pooler(hidden)[0], out[0])


def test_auto_pooling_is_mean_for_bert_and_padding_does_not_change_logits(tiny_bert_spec):
    model = load_base_model(tiny_bert_spec).eval()
    assert getattr(model.config, POOLING_KEY) == "mean"
    ids = torch.tensor([[5, 9, 14, 7]])
    padded = torch.tensor([[5, 9, 14, 7, 0, 0, 0]])
    with torch.no_grad():
        short = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        long = model(input_ids=padded, attention_mask=torch.tensor([[1, 1, 1, 1, 0, 0, 0]])).logits
    torch.testing.assert_close(short, long, rtol=1e-5, atol=1e-5)

    own_head = load_base_model(dataclasses.replace(tiny_bert_spec, pooling="model")).eval()
    assert not hasattr(own_head.config, POOLING_KEY)
    with torch.no_grad():
        assert not torch.allclose(own_head(input_ids=ids).logits, short)


def test_mean_pooling_is_refused_where_the_model_has_no_encoder_pooler(tiny_llama_spec):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_spec.directory)
    assert resolve_pooling("auto", model) == "model"
    with pytest.raises(ValueError, match="model.pooling"):
        resolve_pooling("mean", model)


def test_exported_classifier_keeps_its_pooling(tiny_bert_spec, tmp_path):
    from transformers import AutoModelForSequenceClassification

    model, _ = build_adapted_model(tiny_bert_spec, LoraSettings(rank=2, ffa=True))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    model.eval()
    ids = torch.tensor([[5, 9, 14, 7, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
    model.merge_and_unload().save_pretrained(tmp_path)

    with torch.no_grad():
        loaded = load_exported_classifier(tmp_path)(input_ids=ids, attention_mask=mask).logits
        plain = (
            AutoModelForSequenceClassification.from_pretrained(tmp_path)
            .eval()(input_ids=ids, attention_mask=mask)
            .logits
        )
    torch.testing.assert_close(loaded, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(plain, expected, atol=1e-3), "plain loading drops the pooling: the loader is needed"


def test_a_deep_copy_pools_with_its_own_mask(tiny_bert_spec):
    import copy

    model = load_base_model(tiny_bert_spec).eval()
    twin = copy.deepcopy(model)
    ids = torch.tensor([[5, 9, 14, 7, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    with torch.no_grad():
        copied = twin(input_ids=ids, attention_mask=mask).logits
        assert twin.bert.pooler.mask is mask and model.bert.pooler.mask is None
        torch.testing.assert_close(copied, model(input_ids=ids, attention_mask=mask).logits)
