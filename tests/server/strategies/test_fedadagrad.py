"""FedAdagrad (Reddi et al. 2021, Algorithm 2; no momentum, as Adagrad), pinned by hand for two rounds."""

from __future__ import annotations

import numpy as np
import pytest

from fedtune.common.config import FederationConfig, ServerOptimizerConfig
from fedtune.server.strategies import build_strategy
from fedtune.server.strategies.fedadagrad import FedAdagrad, adagrad_second_moment
from fedtune.server.strategies.fedopt import fedopt_step
from tests.server.strategies.tiny import DELTAS, LR, TAU, X0, assert_adapter, assert_state, two_rounds


def test_two_rounds_by_hand():
    # lr 0.5, tau 0.5; no momentum (m_t = delta_t); v starts at tau^2 = 0.25 and adds delta_t^2:
    # round 1: v1 = w 0.25 + [1, 4] = [1.25, 4.25], b 0.25 + 0.25 = 0.5
    # round 2: v2 = w [1.25 + 1, 4.25 + 0.25] = [2.25, 4.5], b 0.5 + 0.25 = 0.75
    # x_{t+1} = x_t + 0.5 delta_t / (sqrt(v_t) + 0.5)
    # w1 = [0.5 / (1.1180340 + 0.5), 1 - 1 / (2.0615528 + 0.5)] = [0.3090170, 1 - 0.3903882]
    # b1 = 2 + 0.25 / (0.7071068 + 0.5) = 2.2071068
    # w2 = [0.3090170 - 0.5 / (1.5 + 0.5), 0.6096118 + 0.25 / (2.1213203 + 0.5)] = [0.0590170, 0.6096118 + 0.0953723]
    # b2 = 2.2071068 + 0.25 / (0.8660254 + 0.5) = 2.2071068 + 0.1830127
    x1, x2, state = two_rounds(FedAdagrad(lr=LR, tau=TAU))
    assert_adapter(x1, {"w": [0.3090170, 0.6096118], "b": [2.2071068]})
    assert_adapter(x2, {"w": [0.0590170, 0.7049841], "b": [2.3901195]})
    assert_state(state, {"v/w": [2.25, 4.5], "v/b": [0.75]})  # no first moment is kept


def test_the_pure_step_is_the_strategy():
    step = dict(lr=LR, beta1=0.0, tau=TAU, second_moment=adagrad_second_moment)
    x1, _, v = fedopt_step(X0, DELTAS[0], {}, {}, **step)
    x2, _, v = fedopt_step(x1, DELTAS[1], {}, v, **step)
    _, expected, state = two_rounds(FedAdagrad(lr=LR, tau=TAU))
    for key in X0:
        np.testing.assert_array_equal(x2[key], expected[key])
        np.testing.assert_array_equal(v[key], state[f"v/{key}"])


def test_hyperparameters_come_from_the_config_and_beta1_is_not_used():
    opt = ServerOptimizerConfig(beta1=0.9, tau=0.01)
    s = build_strategy(FederationConfig(strategy="fedadagrad", server_optimizer=opt))
    assert isinstance(s, FedAdagrad) and (s.lr, s.beta1, s.tau) == (0.1, 0.0, 0.01)


def test_a_checkpoint_with_a_first_moment_is_not_fedadagrads():
    with pytest.raises(ValueError, match=r"keeps v per tensor, but the checkpoint holds 'm/w'"):
        FedAdagrad().load_state_dict({"m/w": np.zeros(2), "v/w": np.ones(2)})
