"""Which connected sites train in a round: a uniform sample of a fixed size.

Sampling a subset of the sites each round is how cross-device federated learning scales
(McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized
Data", AISTATS 2017, the fraction C); in a cross-silo federation it spares sites that
need not train every round their compute and their privacy budget. A site that is not
sampled is not asked to train, so its ledger is not charged for that round.

The sample is drawn from a generator seeded by the run id and the round, so a resumed
run asks the same sites again for the round it lost (they then replay what they sent).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedtune.common.config import FederationConfig


@dataclass(frozen=True)
class SiteSampling:
    """How many sites train each round: ``count`` of them, else ``fraction`` of those connected.

    ``minimum`` (the fewest sites a round can be aggregated from) is a floor on the sample.
    """

    count: int = 0
    fraction: float = 1.0
    minimum: int = 1

    @classmethod
    def from_config(cls, fed: FederationConfig) -> SiteSampling:
        return cls(count=fed.sites_per_round, fraction=fed.fraction_per_round, minimum=fed.min_clients)

    @property
    def samples(self) -> bool:
        """Whether some connected sites may sit a round out."""
        return self.count > 0 or self.fraction < 1

    def size(self, available: int) -> int:
        """Sites to ask from ``available`` connected ones (all of them when fewer)."""
        wanted = self.count if self.count else math.ceil(self.fraction * available - 1e-9)
        return min(available, max(wanted, self.minimum))

    def rate(self, federation_size: int) -> float:
        """The share of the federation's sites asked each round once all have connected: the
        site-sampling rate q of the site-level accountant (exact only if the sample is uniform,
        as it is here, and the operator runs this code)."""
        return self.size(federation_size) / federation_size

    def sample(self, available: Sequence[int], run_id: str, round_: int) -> list[int]:
        """A uniform sample of ``size(len(available))`` node ids, sorted, fixed by (run id, round, nodes)."""
        nodes = sorted(available)
        k = self.size(len(nodes))
        if k >= len(nodes):
            return nodes
        digest = hashlib.sha256(f"fedtune site sample\0{run_id}\0{round_}".encode()).digest()
        rng = np.random.default_rng(int.from_bytes(digest[:16], "big"))
        # Positions, not the ids themselves: node ids are 64-bit unsigned, which numpy would not keep exact.
        return sorted(nodes[int(i)] for i in rng.choice(len(nodes), size=k, replace=False))
