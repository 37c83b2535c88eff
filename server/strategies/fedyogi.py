"""FedYogi (Reddi et al., "Adaptive Federated Optimization", ICLR 2021, Algorithm 2): Yogi on the
server over the mean delta, with the second moment
``v_t = v_{t-1} - (1 - beta2) * delta_t^2 * sign(v_{t-1} - delta_t^2)``, which moves v by at most
(1 - beta2) * delta_t^2 a round (the rest is :mod:`fedopt`'s). Hyperparameters:
``federation.server_optimizer.lr`` (default 0.01), ``.beta1``, ``.beta2``, ``.tau``; state: m and v
per tensor, saved with each checkpoint.
"""

from __future__ import annotations

import numpy as np

from fedtune.server.strategies.fedopt import FedOpt


def yogi_second_moment(v: np.ndarray, delta_squared: np.ndarray, beta2: float) -> np.ndarray:
    return v - (1.0 - beta2) * delta_squared * np.sign(v - delta_squared)


class FedYogi(FedOpt):
    name = "fedyogi"
    default_lr = 0.01

    def second_moment(self, v: np.ndarray, delta_squared: np.ndarray) -> np.ndarray:
        return yogi_second_moment(v, delta_squared, self.beta2)
