"""The pure checks behind site- and server-side update checks (``common.update_checks``)."""

from __future__ import annotations

import numpy as np

from fedtune.common.update_checks import (
    NORM_SLACK,
    adapter_update_problem,
    l2_norm,
    update_problem,
    vector_problem,
)

LIKE = {"a": np.zeros((2, 3), dtype=np.float32), "b": np.zeros(4, dtype=np.float32)}


def test_a_finite_update_of_the_right_shape_within_the_bound_passes():
    update = {"a": np.full((2, 3), 0.1), "b": np.full(4, 0.1)}
    assert l2_norm(update) == np.sqrt(10 * 0.01)
    assert update_problem(update, LIKE, max_norm=1.0) is None
    assert update_problem(update, LIKE, max_norm=0.0) is None, "0: no norm bound"


def test_names_shapes_and_non_finite_values_are_named():
    assert "names differ" in str(update_problem({"a": LIKE["a"]}, LIKE, 0.0))
    assert "'b' has shape (5,)" in str(update_problem({"a": LIKE["a"], "b": np.zeros(5)}, LIKE, 0.0))
    nan = {"a": LIKE["a"], "b": np.array([0.0, np.nan, 0.0, 0.0])}
    assert "'b' contains NaN" in str(update_problem(nan, LIKE, 0.0))
    assert "NaN or infinity" in str(vector_problem(np.array([np.inf, 0.0]), 2, 0.0))
    assert "shape (3,)" in str(vector_problem(np.zeros(3), 2, 0.0))


def test_the_norm_bound_allows_only_rounding_slack():
    vector = np.array([3.0, 4.0])  # norm 5
    assert vector_problem(vector, 2, 5.0) is None
    assert vector_problem(vector * (1 + NORM_SLACK / 2), 2, 5.0) is None
    assert "exceeds train.max_update_norm = 5" in str(vector_problem(vector * 1.01, 2, 5.0))
    assert vector_problem(vector * 1.01, 2, 5.0, slack=0.1) is None


def test_the_update_is_the_adapter_minus_the_global_adapter():
    base = {"a": np.ones((2, 3), dtype=np.float32), "b": np.ones(4, dtype=np.float32)}
    trained = {k: v + 0.5 for k, v in base.items()}  # update norm 0.5 * sqrt(10) ~ 1.58, adapter norm ~ 4.7
    assert adapter_update_problem(trained, base, 2.0) is None
    assert "exceeds" in str(adapter_update_problem(trained, base, 1.0))
    assert "NaN" in str(adapter_update_problem({**trained, "b": np.full(4, np.nan)}, base, 0.0))


def test_a_mean_of_updates_within_the_bound_is_within_it():
    rng = np.random.default_rng(0)
    updates = [rng.normal(size=50) for _ in range(7)]
    updates = [u / np.linalg.norm(u) * 2.0 for u in updates]  # each exactly on the bound
    weights = rng.uniform(1, 100, size=7)
    mean = np.tensordot(weights / weights.sum(), np.stack(updates), axes=1)
    assert vector_problem(mean, 50, 2.0) is None
