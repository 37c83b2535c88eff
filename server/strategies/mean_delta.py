"""The weighted mean of the sites' updates, as a pure function over named numpy arrays.

Both aggregation paths end here: in the clear the server computes each site's delta from
the adapter it sent back; under secure aggregation the unmasked sum already is the mean
delta. A :class:`~fedtune.server.strategies.base.Strategy` then turns the mean delta into
the next global adapter.

For plain LoRA, averaging A and B separately only approximates averaging the updates B·A;
with FFA-LoRA (A frozen and shared) the mean of the B deltas gives the mean update exactly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

AdapterState = Mapping[str, np.ndarray]


def mean_delta(updates: Sequence[tuple[AdapterState, float]], current: AdapterState) -> dict[str, np.ndarray]:
    """Example-weighted mean of ``update - current`` for each tensor, in float64.

    Weights are the sites' example counts (McMahan et al., 2017). Updates that disagree
    on names or shapes, non-finite values, or non-positive weights are refused.
    """
    if not updates:
        raise ValueError("no updates to aggregate")
    keys = set(current)
    weights = np.asarray([w for _, w in updates], dtype=np.float64)
    if np.any(weights <= 0) or not np.all(np.isfinite(weights)):
        raise ValueError(f"weights must be positive and finite, got {weights.tolist()}")
    for state, _ in updates:
        if set(state) != keys:
            raise ValueError(f"updates disagree on tensor names: {sorted(keys ^ set(state))[:3]}")
    result = {}
    for key in sorted(keys):
        shapes = {np.shape(s[key]) for s, _ in updates} | {np.shape(current[key])}
        if len(shapes) != 1:
            raise ValueError(f"tensor {key!r} has different shapes across updates: {sorted(shapes)}")
        base = np.asarray(current[key], dtype=np.float64)
        stacked = np.stack([np.asarray(s[key], dtype=np.float64) - base for s, _ in updates])
        if not np.all(np.isfinite(stacked)):
            raise ValueError(f"tensor {key!r} contains NaN or infinity in at least one update")
        result[key] = np.tensordot(weights / weights.sum(), stacked, axes=1)
    return result
