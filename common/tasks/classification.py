"""Classification: a text and a label from the federation's agreed set; the model grows a head over those labels."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedtune.common.data.readers import RawRecord
from fedtune.common.data.shapes import (
    BadRecord,
    Columns,
    Example,
    SkipRecord,
    UnknownLabel,
    normalise_text,
    raw_value,
    read_text,
)
from fedtune.common.tasks.base import TaskShape

if TYPE_CHECKING:
    import torch

    from fedtune.common.data.encoding import EncodedSet


class ClassifierHead:
    """LoRA plus a sequence-classification head over the agreed labels, judged by accuracy."""

    classifies = True
    peft_task_type = "SEQ_CLS"
    headline_metric = "accuracy"
    higher_is_better = True

    def encode(self, examples: list[Example], tokenizer: Any, labels: Sequence[str], max_length: int) -> EncodedSet:
        from fedtune.common.data.encoding import encode_classification

        return encode_classification(examples, tokenizer, labels, max_length)

    def per_sample_loss(self, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        from fedtune.common.losses import forward_logits, per_sample_cross_entropy

        return per_sample_cross_entropy(forward_logits(model, batch), batch["labels"])

    def evaluate(self, model: Any, data: EncodedSet, batch_size: int) -> dict[str, float]:
        from fedtune.common.evaluation import evaluate_classifier

        return evaluate_classifier(model, data, batch_size)

    def load_model(self, directory: Path, dtype: Any, labels: Sequence[str], pooling: str) -> Any:
        """AutoModelForSequenceClassification with the agreed labels, mean-pooled where the encoder was trained so."""
        from transformers import AutoModelForSequenceClassification

        from fedtune.common.models.pooling import install_mean_pooling, resolve_pooling

        model = AutoModelForSequenceClassification.from_pretrained(
            directory,
            dtype=dtype,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)},
        )
        if resolve_pooling(pooling, model) == "mean":
            install_mean_pooling(model)
        return model


def resolve_label(value: Any, column: str, labels: Sequence[str]) -> str:
    """A label given by name, or by 0-based index into the agreed label list."""
    if isinstance(value, bool):
        raise BadRecord(f"field {column!r}: expected a label name or index, got a boolean")
    if isinstance(value, str):
        name = normalise_text(value, single_line=True)
        if name in labels:
            return name
        if not name:
            raise SkipRecord
        if re.fullmatch(r"\d+", name):
            value = int(name)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int):
        if 0 <= value < len(labels):
            return labels[value]
        raise UnknownLabel(
            f"field {column!r}: label index {value} is outside the agreed label set (0..{len(labels) - 1})", str(value)
        )
    if value is None:
        raise SkipRecord
    shown = repr(value) if len(repr(value)) < 80 else repr(value)[:77] + "...'"
    raise UnknownLabel(
        f"field {column!r}: label {shown} is not in the agreed label set ({len(labels)} labels, "
        "from data.labels or data.labels_file)",
        normalise_text(value, single_line=True) if isinstance(value, str) else str(value),
    )


def _classification(record: RawRecord, columns: Columns, labels: Sequence[str], group: str) -> Example:
    """Text and label; a simulation without a partition column groups by label (for Dirichlet skew)."""
    text = read_text(record, columns, "text", single_line=True)
    target = resolve_label(raw_value(record, columns, "label"), columns["label"], labels)
    if not text:
        raise SkipRecord
    return Example(text, target, group or target)


CLASSIFIER = ClassifierHead()
CLASSIFICATION = TaskShape("classification", ("text", "label"), _classification, CLASSIFIER)
