"""What travels between server and sites, as Flower records, and how many bytes it weighs.

A train or evaluate request carries exactly two records: ``adapter`` (an ArrayRecord of
adapter tensors, by name) and ``plan`` (a ConfigRecord of scalars). Replies carry
``adapter`` (train only), ``metrics`` (a MetricRecord of aggregate numbers) and
``status`` (a ConfigRecord naming the site and whether it trained).

Under secure aggregation a trained reply carries ``secagg`` (two public keys) instead of
``adapter``, and the later steps exchange ``secagg`` records and one ``masked`` ArrayRecord
(see ``common.secure_aggregation.protocol``).
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict

ADAPTER = "adapter"
SECAGG = "secagg"
MASKED = "masked"
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


def flatten_adapter(state: dict[str, np.ndarray]) -> np.ndarray:
    """All tensors as one float32 vector, in sorted name order (the secure-aggregation layout)."""
    return np.concatenate([np.asarray(state[k], dtype=np.float32).ravel() for k in sorted(state)])


def unflatten_adapter(vector: np.ndarray, like: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Inverse of :func:`flatten_adapter`, with names and shapes taken from ``like``."""
    expected = sum(int(np.size(like[k])) for k in like)
    if vector.shape != (expected,):
        raise ValueError(f"vector of shape {vector.shape} does not fit the adapter's {expected} values")
    out, offset = {}, 0
    for k in sorted(like):
        size = int(np.size(like[k]))
        out[k] = vector[offset:offset + size].reshape(np.shape(like[k])).astype(np.float32)
        offset += size
    return out
