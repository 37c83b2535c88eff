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
from collections.abc import Mapping, Sequence
from typing import ClassVar, Self

import numpy as np

from fedtune.common.config import FederationConfig

AdapterState = Mapping[str, np.ndarray]


class Strategy(ABC):
    """Next global adapter = f(current adapter, mean delta, own state)."""

    #: The name ``federation.strategy`` selects it by. Only a class that sets it itself is selectable
    #: (a shared base such as ``fedopt.FedOpt`` sets none).
    name: ClassVar[str]

    @classmethod
    def from_config(cls, federation: FederationConfig) -> Self:
        """The strategy with its hyperparameters read from ``federation`` (its ``server_optimizer``)."""
        return cls()

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


def pack_state(**groups: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-tensor state (``m``, ``v``, ...) as flat named arrays, ``group/tensor``, as ``strategy.npz`` keeps them."""
    return {
        f"{group}/{key}": np.array(value, copy=True)
        for group, arrays in groups.items()
        for key, value in arrays.items()
    }


def unpack_state(
    state: Mapping[str, np.ndarray], groups: Sequence[str], strategy: str
) -> dict[str, dict[str, np.ndarray]]:
    """The inverse of :func:`pack_state`; a key of another group, or groups over different tensors, are refused."""
    out: dict[str, dict[str, np.ndarray]] = {group: {} for group in groups}
    for key, value in state.items():
        group, sep, tensor = key.partition("/")
        if not sep or group not in out:
            raise ValueError(
                f"strategy {strategy!r} keeps {', '.join(groups)} per tensor, but the checkpoint holds {key!r}"
            )
        out[group][tensor] = np.array(value, copy=True)
    names = [sorted(arrays) for arrays in out.values()]
    if state and any(n != names[0] for n in names):
        raise ValueError(f"strategy {strategy!r}: the checkpoint's {', '.join(groups)} cover different tensors")
    return out


def check_tensors(current: AdapterState, mean_delta: AdapterState, state: AdapterState, strategy: str) -> None:
    """The mean delta, and the state once it exists, must name exactly the adapter's tensors, in its shapes."""
    for what, arrays in (("mean delta", mean_delta), ("state", state)):
        if what == "state" and not arrays:
            continue
        if set(arrays) != set(current):
            raise ValueError(
                f"strategy {strategy!r}: the {what} and the adapter disagree on tensor names: "
                f"{sorted(set(arrays) ^ set(current))[:3]}"
            )
        for key, value in arrays.items():
            if np.shape(value) != np.shape(current[key]):
                raise ValueError(
                    f"strategy {strategy!r}: {what} tensor {key!r} has shape {np.shape(value)}, "
                    f"the adapter's {np.shape(current[key])}"
                )
