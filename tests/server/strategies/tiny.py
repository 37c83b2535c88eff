"""Two rounds on tiny arrays, with hyperparameters chosen so that the optimisers' values can be worked out by hand."""

from __future__ import annotations

import numpy as np

#: lr, beta1, beta2, tau (tau^2 = 0.25, the adaptive optimisers' starting v).
LR, BETA1, BETA2, TAU = 0.5, 0.5, 0.75, 0.5

X0 = {"w": np.array([0.0, 1.0], np.float32), "b": np.array([[2.0]], np.float32)}
DELTAS = [
    {"w": np.array([1.0, -2.0]), "b": np.array([[0.5]])},
    {"w": np.array([-1.0, 0.5]), "b": np.array([[0.5]])},
]


def two_rounds(strategy):
    """The adapters after round 1 and round 2, and the state after round 2."""
    x1 = strategy.apply(X0, DELTAS[0], round_=1)
    x2 = strategy.apply(x1, DELTAS[1], round_=2)
    return x1, x2, strategy.state_dict()


def assert_adapter(got, expected):
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key].dtype == np.float32
        np.testing.assert_allclose(got[key], np.asarray(value, np.float64).reshape(got[key].shape), rtol=1e-6)


def assert_state(got, expected):
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key].dtype == np.float64
        np.testing.assert_allclose(got[key], np.asarray(value).reshape(got[key].shape), rtol=1e-12)
