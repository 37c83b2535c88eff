"""FedAdam (Reddi et al. 2021, Algorithm 2), pinned by hand for two rounds on tiny arrays."""

from __future__ import annotations

from functools import partial

import numpy as np

from fedtune.common.config import FederationConfig, ServerOptimizerConfig
from fedtune.server.strategies import build_strategy
from fedtune.server.strategies.fedadam import FedAdam, adam_second_moment
from fedtune.server.strategies.fedopt import fedopt_step
from tests.server.strategies.tiny import BETA1, BETA2, DELTAS, LR, TAU, X0, assert_adapter, assert_state, two_rounds


def test_two_rounds_by_hand():
    # lr 0.5, beta1 0.5, beta2 0.75, tau 0.5; m starts at 0, v at tau^2 = 0.25.
    # round 1: m1 = 0.5 delta1              = w [0.5, -1],          b 0.25
    #          v1 = 0.75 * 0.25 + 0.25 delta1^2 = 0.1875 + [0.25, 1] = w [0.4375, 1.1875], b 0.1875 + 0.0625 = 0.25
    # round 2: m2 = 0.5 m1 + 0.5 delta2     = w [0.25 - 0.5, -0.5 + 0.25] = [-0.25, -0.25], b 0.125 + 0.25 = 0.375
    #          v2 = 0.75 v1 + 0.25 delta2^2 = w [0.328125 + 0.25, 0.890625 + 0.0625] = [0.578125, 0.953125], b 0.25
    # x_{t+1} = x_t + 0.5 m_t / (sqrt(v_t) + 0.5)
    w1 = [0.0 + 0.5 * 0.5 / (0.4375**0.5 + 0.5), 1.0 + 0.5 * -1.0 / (1.1875**0.5 + 0.5)]
    w2 = [w1[0] + 0.5 * -0.25 / (0.578125**0.5 + 0.5), w1[1] + 0.5 * -0.25 / (0.953125**0.5 + 0.5)]
    x1, x2, state = two_rounds(FedAdam(lr=LR, beta1=BETA1, beta2=BETA2, tau=TAU))
    assert_adapter(x1, {"w": w1, "b": [2.0 + 0.5 * 0.25 / (0.5 + 0.5)]})  # b: 2.125
    assert_adapter(x2, {"w": w2, "b": [2.125 + 0.5 * 0.375 / (0.5 + 0.5)]})  # b: 2.3125
    assert_adapter(x1, {"w": [0.2152504, 0.6854801], "b": [2.125]})  # the same, as decimals
    assert_state(
        state,
        {"m/w": [-0.25, -0.25], "m/b": [0.375], "v/w": [0.578125, 0.953125], "v/b": [0.25]},
    )


def test_the_pure_step_is_the_strategy():
    step = dict(lr=LR, beta1=BETA1, tau=TAU, second_moment=partial(adam_second_moment, beta2=BETA2))
    x1, m, v = fedopt_step(X0, DELTAS[0], {}, {}, **step)
    x2, m, v = fedopt_step(x1, DELTAS[1], m, v, **step)
    _, expected, state = two_rounds(FedAdam(lr=LR, beta1=BETA1, beta2=BETA2, tau=TAU))
    for key in X0:
        np.testing.assert_array_equal(x2[key], expected[key])
        np.testing.assert_array_equal(m[key], state[f"m/{key}"])
        np.testing.assert_array_equal(v[key], state[f"v/{key}"])


def test_hyperparameters_come_from_the_config():
    s = build_strategy(FederationConfig(strategy="fedadam"))
    assert isinstance(s, FedAdam) and (s.lr, s.beta1, s.beta2, s.tau) == (0.1, 0.9, 0.99, 1e-3)  # Flower's defaults
    opt = ServerOptimizerConfig(lr=0.02, beta1=0.8, beta2=0.95, tau=1e-4)
    s = build_strategy(FederationConfig(strategy="fedadam", server_optimizer=opt))
    assert isinstance(s, FedAdam) and (s.lr, s.beta1, s.beta2, s.tau) == (0.02, 0.8, 0.95, 1e-4)
