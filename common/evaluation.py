"""Held-out metrics: loss and perplexity for causal LM, accuracy and macro-F1 for classification."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from fedtune.common.data.encoding import EncodedSet
from fedtune.common.losses import per_sample_causal_lm_loss


def macro_f1(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    """Unweighted mean F1 over the classes that occur in truth or prediction (as scikit-learn)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    scores = []
    for c in np.union1d(y_true, y_pred):
        tp = np.sum((y_pred == c) & (y_true == c))
        fp = np.sum((y_pred == c) & (y_true != c))
        fn = np.sum((y_pred != c) & (y_true == c))
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores)) if scores else 0.0


@torch.no_grad()
def evaluate_model(model: Any, data: EncodedSet, task: str, batch_size: int) -> dict[str, float]:
    """Metrics over ``data``; causal-LM loss is the token-weighted mean over response tokens."""
    was_training = model.training
    model.eval()
    total_loss, total_tokens, preds, trues = 0.0, 0, [], []
    for start in range(0, len(data), batch_size):
        batch = data.batch(list(range(start, min(start + batch_size, len(data)))))
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        if task == "causal-lm":
            per_sample, counts = per_sample_causal_lm_loss(logits, batch["labels"])
            total_loss += float((per_sample * counts).sum())
            total_tokens += int(counts.sum())
        else:
            total_loss += float(torch.nn.functional.cross_entropy(logits.float(), batch["labels"], reduction="sum"))
            preds.extend(logits.argmax(dim=-1).tolist())
            trues.extend(batch["labels"].tolist())
    model.train(was_training)
    if task == "causal-lm":
        loss = total_loss / max(total_tokens, 1)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "num-examples": float(len(data))}
    n = max(len(trues), 1)
    return {
        "loss": total_loss / n,
        "accuracy": float(np.mean(np.asarray(preds) == np.asarray(trues))) if trues else 0.0,
        "macro-f1": macro_f1(trues, preds),
        "num-examples": float(len(data)),
    }


def headline_metric(task: str) -> tuple[str, bool]:
    """The metric a summary leads with, and whether higher is better."""
    return ("accuracy", True) if task == "classification" else ("loss", False)
