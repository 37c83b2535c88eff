"""FedYogi (Reddi et al. 2021, Algorithm 2), pinned by hand for two rounds on tiny arrays."""

from __future__ import annotations

from functools import partial

import numpy as np

from fedtune.common.config import FederationConfig
from fedtune.server.strategies import build_strategy
from fedtune.server.strategies.fedopt import fedopt_step
from fedtune.server.strategies.fedyogi import FedYogi, yogi_second_moment
from tests.server.strategies.tiny import BETA1, BETA2, DELTAS, LR, TAU, X0, assert_adapter, assert_state, two_rounds


def test_two_rounds_by_hand():
    # lr 0.5, beta1 0.5, beta2 0.75, tau 0.5; m starts at 0, v at tau^2 = 0.25. m as in FedAdam:
    # m1 = w [0.5, -1], b 0.25;  m2 = w [-0.25, -0.25], b 0.375.
    # v_t = v_{t-1} - 0.25 delta_t^2 sign(v_{t-1} - delta_t^2):
    # round 1: w: delta^2 = [1, 4] > 0.25, sign -1: v1 = 0.25 + 0.25 [1, 4] = [0.5, 1.25]
    #          b: delta^2 = 0.25 = v0, sign 0: v1 = 0.25
    # round 2: w: delta^2 = [1, 0.25]; v1 - delta^2 = [-0.5, 1]: v2 = [0.5 + 0.25, 1.25 - 0.0625] = [0.75, 1.1875]
    #          b: sign 0 again: v2 = 0.25
    # x_{t+1} = x_t + 0.5 m_t / (sqrt(v_t) + 0.5)
    # w1 = [0.25 / (0.7071068 + 0.5), 1 - 0.5 / (1.1180340 + 0.5)] = [0.2071068, 0.6909830]
    # w2 = w1 - 0.125 / ([0.8660254, 1.0897247] + 0.5) = [0.2071068 - 0.0915064, 0.6909830 - 0.0786300]
    x1, x2, state = two_rounds(FedYogi(lr=LR, beta1=BETA1, beta2=BETA2, tau=TAU))
    assert_adapter(x1, {"w": [0.2071068, 0.6909830], "b": [2.125]})
    assert_adapter(x2, {"w": [0.1156004, 0.6123530], "b": [2.3125]})
    assert_state(state, {"m/w": [-0.25, -0.25], "m/b": [0.375], "v/w": [0.75, 1.1875], "v/b": [0.25]})


def test_the_pure_step_is_the_strategy():
    step = dict(lr=LR, beta1=BETA1, tau=TAU, second_moment=partial(yogi_second_moment, beta2=BETA2))
    x1, m, v = fedopt_step(X0, DELTAS[0], {}, {}, **step)
    x2, m, v = fedopt_step(x1, DELTAS[1], m, v, **step)
    _, expected, state = two_rounds(FedYogi(lr=LR, beta1=BETA1, beta2=BETA2, tau=TAU))
    for key in X0:
        np.testing.assert_array_equal(x2[key], expected[key])
        np.testing.assert_array_equal(v[key], state[f"v/{key}"])


def test_hyperparameters_come_from_the_config():
    s = build_strategy(FederationConfig(strategy="fedyogi"))
    assert isinstance(s, FedYogi) and (s.lr, s.beta1, s.beta2, s.tau) == (0.01, 0.9, 0.99, 1e-3)  # Flower's defaults
