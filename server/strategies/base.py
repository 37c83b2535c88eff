"""The strategy seam: how the server turns the sites' mean delta into the next global adapter.

Every aggregation path (in the clear, or secure aggregation, where the server only ever
sees the sum) produces the same thing, the example-weighted mean of the sites' deltas.
A strategy is a server-side optimiser over that pseudo-gradient (Reddi et al., "Adaptive
Federated Optimization", ICLR 2021): it keeps its own state (momenta, say), which is
saved with every round's checkpoint and restored on resume, so a resumed run continues
exactly.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import ClassVar

import numpy as np

AdapterState = Mapping[str, np.ndarray]


class Strategy(ABC):
    """Next global adapter = f(current adapter, mean delta, own state)."""

    #: The name ``federation.strategy`` selects it by.
    name: ClassVar[str]

    @abstractmethod
    def apply(self, current: AdapterState, mean_delta: AdapterState, round_: int) -> dict[str, np.ndarray]:
        """The next global adapter (float32 tensors with the names and shapes of ``current``)."""

    def state_dict(self) -> dict[str, np.ndarray]:
        """What must survive a restart, as named arrays (saved in each round's checkpoint)."""
        return {}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore what :meth:`state_dict` returned; a stateless strategy accepts only nothing."""
        if state:
            raise ValueError(f"strategy {self.name!r} keeps no state, but the checkpoint holds {sorted(state)[:3]}")
