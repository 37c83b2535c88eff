"""Which connected sites train in a round: a sample of a fixed size, or each site by a coin flip.

Sampling a subset of the sites each round is how cross-device federated learning scales
(McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized
Data", AISTATS 2017, the fraction C); in a cross-silo federation it spares sites that
need not train every round their compute and their privacy budget. A site that is not
sampled is not asked to train, so its ledger is not charged for that round.

Two ways to draw: a fixed number of sites (as Flower's strategies do), or Poisson sampling,
where every connected site is asked independently with probability q. Only the second is
what the subsampled Gaussian accountant of site-level DP analyses (McMahan et al., "Learning
Differentially Private Recurrent Language Models", ICLR 2018): with a fixed-size sample, one
hospital joining displaces another, which that analysis does not cover.

The draws come from a generator keyed by a secret the server keeps in its run directory and
by the round, so a resumed run draws the same positions again, and nobody else can predict
who will be asked (amplification by sampling needs a sample the adversary cannot foresee).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedtune.common.atomic_files import atomic_write_bytes
from fedtune.common.config import FederationConfig

#: The run directory's file holding the server's sampling secret (hex); it never leaves the server.
SAMPLING_KEY_FILE = "sampling.key"


def sampling_key(run_dir: Path) -> bytes:
    """The run's sampling secret: created once (32 random bytes), read again on resume."""
    path = Path(run_dir) / SAMPLING_KEY_FILE
    if not path.exists():
        atomic_write_bytes(path, secrets.token_hex(32).encode())
    return bytes.fromhex(path.read_text().strip())


def round_generator(key: bytes, purpose: str, round_: int) -> np.random.Generator:
    """A generator for ``purpose`` in ``round_``, fixed by the server's secret ``key``."""
    digest = hmac.new(key, f"fedtune {purpose}\0{round_}".encode(), hashlib.sha256).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "big"))


@dataclass(frozen=True)
class SiteSampling:
    """How sites are picked each round: ``count`` of them, else ``fraction`` of those connected
    (rounded up), or with ``poisson`` each connected site with probability ``fraction``.

    ``minimum`` (the fewest sites a round can be aggregated from) is a floor on a fixed-size
    sample; a Poisson sample is never topped up (that would change what the accountant assumes).
    """

    count: int = 0
    fraction: float = 1.0
    minimum: int = 1
    poisson: bool = False

    @classmethod
    def from_config(cls, fed: FederationConfig) -> SiteSampling:
        return cls(
            count=fed.sites_per_round,
            fraction=fed.fraction_per_round,
            minimum=fed.min_clients,
            poisson=fed.poisson_sampling,
        )

    @property
    def samples(self) -> bool:
        """Whether some connected sites may sit a round out."""
        return self.count > 0 or self.fraction < 1

    def size(self, available: int) -> int:
        """Sites asked from ``available`` connected ones (the expected number under Poisson sampling)."""
        if self.poisson:
            return round(self.fraction * available)
        wanted = self.count if self.count else math.ceil(self.fraction * available - 1e-9)
        return min(available, max(wanted, self.minimum))

    def rate(self, federation_size: int) -> float:
        """The share of the federation's sites asked in a round once all have connected (on average)."""
        return self.fraction if self.poisson else self.size(federation_size) / federation_size

    @property
    def accountant_rate(self) -> float:
        """The site-sampling rate q site-level DP's accountant may use: the Poisson probability, else 1
        (a fixed-size sample is not what the subsampled Gaussian analysis covers; the config refuses it)."""
        return self.fraction if self.poisson else 1.0

    def sample(self, available: Sequence[int], key: bytes, round_: int) -> list[int]:
        """The node ids asked in ``round_``, sorted; fixed by the key, the round and the sorted nodes."""
        nodes = sorted(available)
        rng = round_generator(key, "site sample", round_)
        if self.poisson:
            picked = rng.random(len(nodes)) < self.fraction
            return [n for n, keep in zip(nodes, picked, strict=True) if keep]
        k = self.size(len(nodes))
        if k >= len(nodes):
            return nodes
        # Positions, not the ids themselves: node ids are 64-bit unsigned, which numpy would not keep exact.
        return sorted(nodes[int(i)] for i in rng.choice(len(nodes), size=k, replace=False))
