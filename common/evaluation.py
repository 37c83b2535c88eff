"""Held-out metrics: loss and perplexity for generation; accuracy, macro-F1 and per-class scores for classification.

Which one a run uses is its task's head (``common/tasks``). The classification scores are
scikit-learn's (``sklearn.metrics``), imported when first needed: the command line starts
without paying for SciPy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fedtune.common.data.encoding import EncodedSet
from fedtune.common.losses import forward_logits, per_sample_causal_lm_loss

#: Called with the number of examples a batch held, after each batch (e.g. a progress bar's ``update``).
BatchDone = Callable[[int], Any]


def macro_f1(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    """Unweighted mean F1 over the classes that occur in truth or prediction; a class never predicted scores 0."""
    from sklearn.metrics import f1_score

    if len(y_true) == 0:
        return 0.0
    return float(f1_score(y_true, y_pred, average="macro", zero_division=0))


@dataclass(frozen=True)
class ClassScores:
    """One class's row of the report: how often it was right when predicted, and how often it was found."""

    label: str
    precision: float
    recall: float
    f1: float
    support: int  # held-out records whose true label this is


@dataclass(frozen=True)
class ClassificationReport:
    """Accuracy, macro-F1, per-class scores and the confusion matrix over the agreed labels.

    ``confusion[i][j]`` counts records of true label ``labels[i]`` predicted as ``labels[j]``;
    every agreed label has a row and a column, even one absent from the data. Macro-F1
    averages over the labels present in truth or prediction (scikit-learn's default), so a
    test file holding a few of 77 labels is not scored down for the rest.
    """

    labels: tuple[str, ...]
    accuracy: float
    macro_f1: float
    per_class: tuple[ClassScores, ...]
    confusion: tuple[tuple[int, ...], ...]
    loss: float | None = None
    examples: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "loss": self.loss,
            "accuracy": self.accuracy,
            "macro-f1": self.macro_f1,
            "num-examples": self.examples,
            "per-class": [
                {"label": c.label, "precision": c.precision, "recall": c.recall, "f1": c.f1, "support": c.support}
                for c in self.per_class
            ],
            "labels": list(self.labels),
            "confusion-matrix": [list(row) for row in self.confusion],
        }


def classification_report(
    y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[str], loss: float | None = None
) -> ClassificationReport:
    """Scores of predictions ``y_pred`` against ``y_true`` (indices into ``labels``)."""
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    ids = list(range(len(labels)))
    if len(y_true) == 0:
        zero = tuple(tuple(0 for _ in ids) for _ in ids)
        return ClassificationReport(
            tuple(labels), 0.0, 0.0, tuple(ClassScores(n, 0.0, 0.0, 0.0, 0) for n in labels), zero, loss, 0
        )
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=ids, average=None, zero_division=0
    )
    matrix = confusion_matrix(y_true, y_pred, labels=ids)
    return ClassificationReport(
        labels=tuple(labels),
        accuracy=float(accuracy_score(y_true, y_pred)),
        macro_f1=macro_f1(y_true, y_pred),
        per_class=tuple(
            ClassScores(name, float(p), float(r), float(f), int(s))
            for name, p, r, f, s in zip(labels, precision, recall, f1, support, strict=True)
        ),
        confusion=tuple(tuple(int(v) for v in row) for row in matrix),
        loss=loss,
        examples=len(y_true),
    )


def _logits(
    model: Any, data: EncodedSet, batch_size: int, done: BatchDone | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Each batch's logits and labels, in eval mode without gradients; the model's mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(data), batch_size):
            batch = data.batch(list(range(start, min(start + batch_size, len(data)))))
            with torch.no_grad():
                logits = forward_logits(model, batch)
            yield logits, batch["labels"]
            if done is not None:
                done(len(batch["labels"]))
    finally:
        model.train(was_training)


def evaluate_generator(
    model: Any, data: EncodedSet, batch_size: int, done: BatchDone | None = None
) -> dict[str, float]:
    """Loss (the token-weighted mean over response tokens) and perplexity."""
    total_loss, total_tokens = 0.0, 0
    for logits, labels in _logits(model, data, batch_size, done):
        per_sample, counts = per_sample_causal_lm_loss(logits, labels)
        total_loss += float((per_sample * counts).sum())
        total_tokens += int(counts.sum())
    loss = total_loss / max(total_tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "num-examples": float(len(data))}


@dataclass
class ClassifierOutputs:
    """What a classifier said about each record: true and predicted label ids, class probabilities, summed loss."""

    truth: list[int] = field(default_factory=list)
    predicted: list[int] = field(default_factory=list)
    probabilities: list[list[float]] = field(default_factory=list)
    total_loss: float = 0.0

    @property
    def loss(self) -> float:
        return self.total_loss / max(len(self.truth), 1)


def classifier_outputs(
    model: Any, data: EncodedSet, batch_size: int, done: BatchDone | None = None
) -> ClassifierOutputs:
    out = ClassifierOutputs()
    for logits, labels in _logits(model, data, batch_size, done):
        logits = logits.float()
        out.total_loss += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
        out.predicted.extend(logits.argmax(dim=-1).tolist())
        out.truth.extend(labels.tolist())
        out.probabilities.extend(torch.softmax(logits, dim=-1).tolist())
    return out


def evaluate_classifier(model: Any, data: EncodedSet, batch_size: int) -> dict[str, float]:
    """Loss, accuracy and macro-F1 over the agreed labels (what each round records)."""
    out = classifier_outputs(model, data, batch_size)
    return {
        "loss": out.loss,
        "accuracy": float(np.mean(np.asarray(out.predicted) == np.asarray(out.truth))) if out.truth else 0.0,
        "macro-f1": macro_f1(out.truth, out.predicted),
        "num-examples": float(len(data)),
    }


def top_labels(probabilities: Iterable[float], labels: Sequence[str], k: int = 1) -> list[tuple[str, float]]:
    """The ``k`` most probable labels with their probabilities, most probable first."""
    probs = np.asarray(list(probabilities), dtype=float)
    order = np.argsort(-probs, kind="stable")[:k]
    return [(labels[i], float(probs[i])) for i in order]
