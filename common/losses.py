"""Per-sample losses: the quantity DP-SGD clips must be one number per record.

Hugging Face's built-in causal-LM loss averages over all tokens in the batch, which ties
records together (a long record weighs more, and each record's gradient depends on the
others' lengths). DP-SGD needs each record's own loss: the mean over its own response
tokens. The batch loss is the mean of these, matching Opacus' ``loss_reduction="mean"``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from fedtune.common.data.encoding import IGNORE_INDEX


def per_sample_causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean token loss of each record over its own target tokens; also returns the token counts."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    token_loss = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(shift_labels.shape)
    counts = (shift_labels != IGNORE_INDEX).sum(dim=1)
    return token_loss.sum(dim=1) / counts.clamp(min=1), counts


def forward_logits(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits without Hugging Face's own loss (labels are not passed): that loss would average across records."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def per_sample_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Classification: each record's cross-entropy against its class id."""
    return F.cross_entropy(logits.float(), labels, reduction="none")
