"""FedAvgM (Hsu et al. 2019): server momentum over the mean delta, pinned by hand for two rounds."""

from __future__ import annotations

import numpy as np
import pytest

from fedtune.common.config import FederationConfig, ServerOptimizerConfig
from fedtune.server.strategies import build_strategy
from fedtune.server.strategies.fedavg import FedAvg
from fedtune.server.strategies.fedavgm import FedAvgM, fedavgm_step
from tests.server.strategies.tiny import DELTAS, LR, X0, assert_adapter, assert_state, two_rounds


def test_two_rounds_by_hand():
    # m1 = delta1 = w [1, -2], b 0.5;                        x1 = x0 + 0.5 m1
    # m2 = 0.9 m1 + delta2 = w [0.9 - 1, -1.8 + 0.5] = [-0.1, -1.3], b 0.45 + 0.5 = 0.95;  x2 = x1 + 0.5 m2
    x1, x2, state = two_rounds(FedAvgM(lr=LR, momentum=0.9))
    assert_adapter(x1, {"w": [0.5, 0.0], "b": [2.25]})
    assert_adapter(x2, {"w": [0.45, -0.65], "b": [2.725]})
    assert_state(state, {"momentum/w": [-0.1, -1.3], "momentum/b": [0.95]})


def test_the_pure_step_is_the_strategy():
    new, m = fedavgm_step(X0, DELTAS[0], {}, lr=LR, beta=0.9)
    again, m2 = fedavgm_step(new, DELTAS[1], m, lr=LR, beta=0.9)
    _, x2, state = two_rounds(FedAvgM(lr=LR, momentum=0.9))
    for key in X0:
        np.testing.assert_array_equal(again[key], x2[key])
        np.testing.assert_array_equal(m2[key], state[f"momentum/{key}"])


@pytest.mark.parametrize("seed", range(3))
def test_without_momentum_and_at_lr_1_it_is_fedavg_bit_for_bit(seed):
    rng = np.random.default_rng(seed)
    current = {"B": rng.normal(size=(8, 4)).astype(np.float32), "head": rng.normal(size=(3, 8)).astype(np.float32)}
    plain, momentum = FedAvg(), FedAvgM(lr=1.0, momentum=0.0)
    a = b = current
    for round_ in (1, 2, 3):
        delta = {k: rng.normal(scale=0.01, size=v.shape) for k, v in current.items()}
        a, b = plain.apply(a, delta, round_), momentum.apply(b, delta, round_)
        for key in current:
            np.testing.assert_array_equal(a[key], b[key])


def test_hyperparameters_come_from_the_config():
    s = build_strategy(FederationConfig(strategy="fedavgm"))
    assert isinstance(s, FedAvgM) and (s.lr, s.beta) == (1.0, 0.9)  # lr 0: FedAvgM's default, 1.0
    opt = ServerOptimizerConfig(lr=0.3, momentum=0.5)
    s = build_strategy(FederationConfig(strategy="fedavgm", server_optimizer=opt))
    assert isinstance(s, FedAvgM) and (s.lr, s.beta) == (0.3, 0.5)
