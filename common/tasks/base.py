"""What a task is: a record shape (the fields a site brings) and a head (what the model learns from them).

Shapes that learn the same way share one head object: the four generative shapes differ only
in how a record becomes an :class:`Example`, so they share the encoder, loss, metrics and model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from fedtune.common.data.readers import RawRecord, RecordProblem
from fedtune.common.data.shapes import BadRecord, Columns, Example, SkipRecord, UnknownLabel

if TYPE_CHECKING:
    import torch

    from fedtune.common.data.encoding import EncodedSet

#: A shape's record reader: (record, columns, agreed labels, group) -> Example; raises SkipRecord or BadRecord.
Builder = Callable[[RawRecord, Columns, Sequence[str], str], Example]


class Head(Protocol):
    """What the model learns. Implementations import torch and transformers lazily: the config names tasks too."""

    classifies: bool  # a head over the agreed labels, or next-token generation
    peft_task_type: str  # a peft ``TaskType`` value
    headline_metric: str  # what a summary leads with
    higher_is_better: bool

    def encode(self, examples: list[Example], tokenizer: Any, labels: Sequence[str], max_length: int) -> EncodedSet:
        """Token ids and training targets."""
        ...

    def per_sample_loss(self, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """One loss per record: what DP-SGD clips."""
        ...

    def evaluate(self, model: Any, data: EncodedSet, batch_size: int) -> dict[str, float]:
        """Held-out metrics, ``headline_metric`` among them."""
        ...

    def load_model(self, directory: Path, dtype: Any, labels: Sequence[str], pooling: str) -> Any:
        """The base model class this head trains on, from a Hugging Face directory."""
        ...


@dataclass(frozen=True)
class TaskShape:
    """One task: its name (``data.task``), the FieldMap roles it requires, how a record becomes an Example, its head."""

    name: str
    roles: tuple[str, ...]
    build: Builder
    head: Head

    @property
    def classifies(self) -> bool:
        return self.head.classifies

    def example(
        self, record: RawRecord, columns: Columns, labels: Sequence[str], group_field: str = ""
    ) -> Example | RecordProblem | None:
        """The example in ``record``, None if it is empty after cleaning, or a RecordProblem if malformed."""
        try:
            group = str(record.fields.get(group_field, "")) if group_field else ""
            return self.build(record, columns, labels, group)
        except SkipRecord:
            return None
        except BadRecord as exc:
            return RecordProblem(f"{record.where}, {exc}", exc.label if isinstance(exc, UnknownLabel) else None)
