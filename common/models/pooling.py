"""Sentence pooling for encoder classifiers: the mean of the token states over the attention mask.

Sentence-transformer encoders such as all-MiniLM-L6-v2 were trained to be read by their mean
token state. Their checkpoints carry no trained [CLS] pooler, so ``BertForSequenceClassification``
would put a randomly initialised, frozen ``tanh(W h_CLS)`` under the head: features dominated by
one shared direction, on which a linear head learns slowly and DP-SGD's noise costs most (on
Banking77 at epsilon=8 the head-only probe of docs/benchmarks.md goes from 0.37 to 0.81 accuracy).
``MaskedMeanPooler`` takes the pooler's place inside the model, so training, evaluation, Opacus'
per-record gradients and the merged export all see the same network.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

POOLING_KEY = "fedtune_pooling"  # written into config.json of exported models


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


def _encoder_with_pooler(model: Any) -> Any | None:
    encoder = getattr(model, getattr(model, "base_model_prefix", ""), None)
    return encoder if encoder is not None and isinstance(getattr(encoder, "pooler", None), nn.Module) else None


def resolve_pooling(requested: str, model: Any) -> str:
    """``auto`` is ``mean`` for encoders with a BERT-style pooler and the model's own head otherwise."""
    supported = _encoder_with_pooler(model) is not None
    if requested == "auto":
        return "mean" if supported else "model"
    if requested == "mean" and not supported:
        raise ValueError(
            f"model.pooling = 'mean' needs an encoder with a BERT-style pooler; {type(model).__name__} has none: "
            "set model.pooling = 'model' (or 'auto')"
        )
    return requested


def _keep_mask(encoder: nn.Module, args: tuple, kwargs: dict) -> None:
    # The pooler is looked up on the module called, not closed over: a deep copy of the model
    # (a twin for a test, a worker's replica) must feed its own pooler.
    mask = kwargs.get("attention_mask")
    if mask is None and len(args) > 1:
        mask = args[1]
    pooler = encoder.pooler
    if isinstance(pooler, MaskedMeanPooler):  # the pooler installed with this hook, unless replaced since
        pooler.mask = mask


def install_mean_pooling(model: Any) -> None:
    """Replace the encoder's [CLS] pooler by :class:`MaskedMeanPooler`, fed each forward's attention mask."""
    encoder = _encoder_with_pooler(model)
    if encoder is None:
        raise ValueError(f"{type(model).__name__} has no BERT-style pooler to replace")
    encoder.pooler = MaskedMeanPooler()
    encoder.register_forward_pre_hook(_keep_mask, with_kwargs=True)
    model.config.update({POOLING_KEY: "mean"})
