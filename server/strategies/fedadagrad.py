"""FedAdagrad (Reddi et al., "Adaptive Federated Optimization", ICLR 2021, Algorithm 2): Adagrad on
the server over the mean delta, with the second moment ``v_t = v_{t-1} + delta_t^2`` and, like
Adagrad and Flower's FedAdagrad, no momentum (beta1 = 0, so m_t = delta_t); the rest is
:mod:`fedopt`'s. Hyperparameters: ``federation.server_optimizer.lr`` (default 0.1) and ``.tau``;
state: v per tensor, saved with each checkpoint.
"""

from __future__ import annotations

import numpy as np

from fedtune.server.strategies.fedopt import FedOpt


def adagrad_second_moment(v: np.ndarray, delta_squared: np.ndarray) -> np.ndarray:
    return v + delta_squared


class FedAdagrad(FedOpt):
    name = "fedadagrad"
    default_lr = 0.1
    keeps_momentum = False

    def second_moment(self, v: np.ndarray, delta_squared: np.ndarray) -> np.ndarray:
        return adagrad_second_moment(v, delta_squared)
