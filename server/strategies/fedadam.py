"""FedAdam (Reddi et al., "Adaptive Federated Optimization", ICLR 2021, Algorithm 2): Adam on the
server over the mean delta, with the second moment ``v_t = beta2 * v_{t-1} + (1 - beta2) * delta_t^2``
(the rest is :mod:`fedopt`'s). Hyperparameters: ``federation.server_optimizer.lr`` (default 0.1),
``.beta1``, ``.beta2``, ``.tau``; state: m and v per tensor, saved with each checkpoint.
"""

from __future__ import annotations

import numpy as np

from fedtune.server.strategies.fedopt import FedOpt


def adam_second_moment(v: np.ndarray, delta_squared: np.ndarray, beta2: float) -> np.ndarray:
    return beta2 * v + (1.0 - beta2) * delta_squared


class FedAdam(FedOpt):
    name = "fedadam"
    default_lr = 0.1

    def second_moment(self, v: np.ndarray, delta_squared: np.ndarray) -> np.ndarray:
        return adam_second_moment(v, delta_squared, self.beta2)
