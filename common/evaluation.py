"""Held-out metrics: loss and perplexity for generation, accuracy and macro-F1 for classification.

Which one a run uses is its task's head (``common/tasks``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from fedtune.common.data.encoding import EncodedSet
from fedtune.common.losses import forward_logits, per_sample_causal_lm_loss


def macro_f1(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    """Unweighted mean F1 over the classes that occur in truth or prediction (as scikit-learn)."""
    truth, pred = np.asarray(y_true), np.asarray(y_pred)
    scores = []
    for c in np.union1d(truth, pred):
        tp = np.sum((pred == c) & (truth == c))
        fp = np.sum((pred == c) & (truth != c))
        fn = np.sum((pred != c) & (truth == c))
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores)) if scores else 0.0


def _logits(model: Any, data: EncodedSet, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Each batch's logits and labels, in eval mode without gradients; the model's mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(data), batch_size):
            batch = data.batch(list(range(start, min(start + batch_size, len(data)))))
            with torch.no_grad():
                logits = forward_logits(model, batch)
            yield logits, batch["labels"]
    finally:
        model.train(was_training)


def evaluate_generator(model: Any, data: EncodedSet, batch_size: int) -> dict[str, float]:
    """Loss (the token-weighted mean over response tokens) and perplexity."""
    total_loss, total_tokens = 0.0, 0
    for logits, labels in _logits(model, data, batch_size):
        per_sample, counts = per_sample_causal_lm_loss(logits, labels)
        total_loss += float((per_sample * counts).sum())
        total_tokens += int(counts.sum())
    loss = total_loss / max(total_tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "num-examples": float(len(data))}


def evaluate_classifier(model: Any, data: EncodedSet, batch_size: int) -> dict[str, float]:
    """Loss, accuracy and macro-F1 over the agreed labels."""
    total_loss, preds, trues = 0.0, [], []
    for logits, labels in _logits(model, data, batch_size):
        total_loss += float(torch.nn.functional.cross_entropy(logits.float(), labels, reduction="sum"))
        preds.extend(logits.argmax(dim=-1).tolist())
        trues.extend(labels.tolist())
    n = max(len(trues), 1)
    return {
        "loss": total_loss / n,
        "accuracy": float(np.mean(np.asarray(preds) == np.asarray(trues))) if trues else 0.0,
        "macro-f1": macro_f1(trues, preds),
        "num-examples": float(len(data)),
    }
