"""The mean delta is an example-weighted mean; with FFA-LoRA it averages the weight updates exactly."""

from __future__ import annotations

import numpy as np
import pytest

from fedtune.server.strategies.mean_delta import mean_delta

ZERO = {"x": np.zeros(2, np.float32), "y": np.zeros((2, 2), np.float32)}


def test_the_mean_delta_is_example_weighted():
    a = {"x": np.array([1.0, 2.0], np.float32), "y": np.ones((2, 2), np.float32)}
    b = {"x": np.array([3.0, 6.0], np.float32), "y": np.zeros((2, 2), np.float32)}
    out = mean_delta([(a, 1), (b, 3)], ZERO)
    np.testing.assert_allclose(out["x"], [2.5, 5.0])
    np.testing.assert_allclose(out["y"], np.full((2, 2), 0.25))
    current = {"x": np.array([1.0, 1.0], np.float32), "y": np.ones((2, 2), np.float32)}
    np.testing.assert_allclose(mean_delta([(a, 1), (b, 3)], current)["x"], [1.5, 4.0])


def test_ffa_lora_average_is_exact_while_plain_lora_is_not():
    rng = np.random.default_rng(0)
    a_shared = rng.normal(size=(4, 16))
    bs = [rng.normal(size=(16, 4)) for _ in range(3)]
    weights = [10, 30, 60]
    true_avg_update = sum(w * b @ a_shared for w, b in zip(weights, bs, strict=False)) / sum(weights)
    ffa = mean_delta([({"B": b}, w) for b, w in zip(bs, weights, strict=False)], {"B": np.zeros((16, 4))})
    np.testing.assert_allclose(ffa["B"] @ a_shared, true_avg_update, rtol=1e-5, atol=1e-5)

    a_local = [rng.normal(size=(4, 16)) for _ in range(3)]
    zero = {"A": np.zeros((4, 16)), "B": np.zeros((16, 4))}
    plain = mean_delta([({"A": a, "B": b}, w) for a, b, w in zip(a_local, bs, weights, strict=False)], zero)
    true_plain = sum(w * b @ a for w, a, b in zip(weights, a_local, bs, strict=False)) / sum(weights)
    assert np.abs(plain["B"] @ plain["A"] - true_plain).max() > 0.1


@pytest.mark.parametrize(
    ("updates", "message"),
    [
        ([], "no updates"),
        ([({"x": np.ones(2)}, 0)], "weights must be positive"),
        ([({"x": np.ones(2)}, 1), ({"z": np.ones(2)}, 1)], "disagree on tensor names"),
        ([({"x": np.ones(2)}, 1), ({"x": np.ones(3)}, 1)], "different shapes"),
        ([({"x": np.array([np.nan, 1.0])}, 1)], "NaN or infinity"),
    ],
)
def test_bad_updates_are_rejected(updates, message):
    with pytest.raises(ValueError, match=message):
        mean_delta(updates, {"x": np.zeros(2)})
