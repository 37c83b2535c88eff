"""FedAvgM: FedAvg with server momentum (Hsu, Qi and Brown, "Measuring the Effects of Non-Identical
Data Distribution for Federated Visual Classification", arXiv:1909.06335, 2019).

The server keeps a momentum buffer over the mean delta and steps along it::

    m_t     = beta * m_{t-1} + delta_t        (m_0 = 0)
    x_{t+1} = x_t + eta * m_t

which is Flower's ``FedAvgM`` (SGD with momentum, PyTorch's convention, no Nesterov) written
with the mean delta instead of its pseudo-gradient ``-delta``. With beta = 0 and eta = 1 it is
FedAvg exactly. Hyperparameters: ``federation.server_optimizer.lr`` (default 1.0) and
``.momentum``; state: the momentum per tensor, saved with each checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Self

import numpy as np

from fedtune.common.config import FederationConfig
from fedtune.server.strategies.base import AdapterState, Strategy, check_tensors, pack_state, unpack_state


def fedavgm_step(
    current: AdapterState, mean_delta: AdapterState, momentum: AdapterState, *, lr: float, beta: float
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(next adapter as float32, next momentum as float64); an empty ``momentum`` is the first round's zero."""
    check_tensors(current, mean_delta, momentum, "fedavgm")
    new, moment = {}, {}
    for key in sorted(current):
        delta = np.asarray(mean_delta[key], np.float64)
        moment[key] = beta * np.asarray(momentum[key], np.float64) + delta if momentum else delta.copy()
        new[key] = (np.asarray(current[key], np.float64) + lr * moment[key]).astype(np.float32)
    return new, moment


class FedAvgM(Strategy):
    name = "fedavgm"
    default_lr = 1.0

    def __init__(self, lr: float = default_lr, momentum: float = 0.9) -> None:
        self.lr, self.beta = lr, momentum
        self.momentum: dict[str, np.ndarray] = {}

    @classmethod
    def from_config(cls, federation: FederationConfig) -> Self:
        opt = federation.server_optimizer
        return cls(lr=opt.lr or cls.default_lr, momentum=opt.momentum)

    def apply(self, current: AdapterState, mean_delta: AdapterState, round_: int) -> dict[str, np.ndarray]:
        new, self.momentum = fedavgm_step(current, mean_delta, self.momentum, lr=self.lr, beta=self.beta)
        return new

    def state_dict(self) -> dict[str, np.ndarray]:
        return pack_state(momentum=self.momentum)

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        self.momentum = unpack_state(state, ("momentum",), self.name)["momentum"]
