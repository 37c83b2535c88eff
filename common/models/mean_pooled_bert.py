"""fedtune's mean-pooled BERT classifier as code that plain transformers runs (``trust_remote_code=True``).

This file is self-contained on purpose (torch and transformers only): ``export_merged`` copies
it into the merged model's directory as ``modeling_fedtune.py`` and names its classes in
``config.json``'s ``auto_map``, so ``AutoModelForSequenceClassification`` and
``pipeline("text-classification", ..., trust_remote_code=True)`` rebuild the network fedtune
trained: BERT's [CLS] pooler replaced by the mean of the token states over the attention
mask (see ``fedtune.common.models.pooling``). The config has its own ``model_type``, so
loading without ``trust_remote_code`` fails with transformers' own message instead of
silently putting an untrained [CLS] pooler back under the trained head.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

MODEL_TYPE = "fedtune_mean_pooled_bert"


class MaskedMeanPooler(nn.Module):
    """Mean of ``hidden_states`` over the positions the attention mask keeps; no parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.mask: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        mask = self.mask
        if mask is None or tuple(mask.shape) != tuple(hidden_states.shape[:2]):
            mask = torch.ones(hidden_states.shape[:2], dtype=hidden_states.dtype, device=hidden_states.device)
        weights = mask.to(hidden_states.dtype).unsqueeze(-1)
        return (hidden_states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


class FedtuneMeanPooledBertConfig(BertConfig):
    """BERT's config under a model type of its own (see the module docstring)."""

    model_type = MODEL_TYPE


class FedtuneMeanPooledBertForSequenceClassification(BertForSequenceClassification):
    """``BertForSequenceClassification`` reading the masked mean of the token states instead of [CLS]."""

    config_class = FedtuneMeanPooledBertConfig

    def __init__(self, config: BertConfig) -> None:
        super().__init__(config)
        self.bert.pooler = MaskedMeanPooler()  # type: ignore[assignment]

    def forward(self, input_ids: Any = None, attention_mask: Any = None, *args: Any, **kwargs: Any) -> Any:
        pooler = self.bert.pooler
        if not isinstance(pooler, MaskedMeanPooler):
            raise TypeError(f"{type(self).__name__}.bert.pooler was replaced by {type(pooler).__name__}")
        pooler.mask = attention_mask
        try:
            return super().forward(input_ids, attention_mask, *args, **kwargs)
        finally:
            pooler.mask = None
