"""Aggregation of adapter updates, as pure functions over named numpy arrays.

Example-weighted FedAvg (McMahan et al., 2017). For plain LoRA, averaging A and B
separately is only an approximation of averaging the updates B·A; with FFA-LoRA (A frozen
and shared) the average of the B matrices gives exactly the average update.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

AdapterState = Mapping[str, np.ndarray]


def aggregate_adapters(updates: Sequence[tuple[AdapterState, float]]) -> dict[str, np.ndarray]:
    """Weighted mean of each tensor over the updates; weights are the sites' example counts."""
    if not updates:
        raise ValueError("no updates to aggregate")
    keys = set(updates[0][0])
    weights = np.asarray([w for _, w in updates], dtype=np.float64)
    if np.any(weights <= 0) or not np.all(np.isfinite(weights)):
        raise ValueError(f"weights must be positive and finite, got {weights.tolist()}")
    for state, _ in updates:
        if set(state) != keys:
            raise ValueError(f"updates disagree on tensor names: {sorted(keys ^ set(state))[:3]}")
    result = {}
    for key in sorted(keys):
        shapes = {np.shape(s[key]) for s, _ in updates}
        if len(shapes) != 1:
            raise ValueError(f"tensor {key!r} has different shapes across updates: {sorted(shapes)}")
        stacked = np.stack([np.asarray(s[key], dtype=np.float64) for s, _ in updates])
        if not np.all(np.isfinite(stacked)):
            raise ValueError(f"tensor {key!r} contains NaN or infinity in at least one update")
        result[key] = np.tensordot(weights / weights.sum(), stacked, axes=1).astype(np.float32)
    return result
