"""What travels between server and sites, as Flower records, and how many bytes it weighs.

A train or evaluate request carries exactly two records: ``adapter`` (an ArrayRecord of
adapter tensors, by name) and ``plan`` (a ConfigRecord of scalars). Replies carry
``adapter`` (train only), ``metrics`` (a MetricRecord of aggregate numbers) and
``status`` (a ConfigRecord naming the site and whether it trained).
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict

ADAPTER = "adapter"
PLAN = "plan"
METRICS = "metrics"
STATUS = "status"


def to_array_record(state: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord(array_dict={k: Array(np.ascontiguousarray(v, dtype=np.float32)) for k, v in state.items()})


def from_array_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: a.numpy() for k, a in record.items()}


def array_record_nbytes(record: ArrayRecord) -> int:
    """Bytes of tensor payload (serialised array data) in an ArrayRecord."""
    return sum(len(a.data) for a in record.values())


def payload_nbytes(content: RecordDict) -> int:
    """Tensor bytes in a message's content (configs and metrics are a few hundred bytes on top)."""
    return sum(array_record_nbytes(r) for r in content.array_records.values())
