"""FedAvg (McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized
Data", AISTATS 2017): the next global adapter is the example-weighted mean of the sites' adapters,
i.e. the current one plus the mean delta, a server learning rate of 1 and no state."""

from __future__ import annotations

import numpy as np

from fedtune.server.strategies.base import AdapterState, Strategy


class FedAvg(Strategy):
    name = "fedavg"

    def apply(self, current: AdapterState, mean_delta: AdapterState, round_: int) -> dict[str, np.ndarray]:
        return {k: (np.asarray(current[k], np.float64) + mean_delta[k]).astype(np.float32) for k in current}
