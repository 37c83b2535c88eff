"""FedOpt (Reddi et al., "Adaptive Federated Optimization", ICLR 2021, Algorithm 2): what FedAdam,
FedYogi and FedAdagrad share. The mean delta is the pseudo-gradient::

    m_t     = beta1 * m_{t-1} + (1 - beta1) * delta_t       (m_{-1} = 0)
    v_t     = second_moment(v_{t-1}, delta_t^2)           (v_{-1} = tau^2)
    x_{t+1} = x_t + eta * m_t / (sqrt(v_t) + tau)

elementwise; only ``second_moment`` differs between the three (their modules). Algorithm 2
asks for ``v_{-1} >= tau^2``; we start at tau^2. Flower's FedOpt strategies start ``v`` at 0,
and its FedAdam also scales eta by a bias correction that Algorithm 2 does not have; apart
from those two starting details the updates are Flower's. Everything runs in float64; the
adapter returned is float32. This module is a shared base and sets no ``name``, so it is not
selectable itself.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Mapping
from typing import ClassVar, Self

import numpy as np

from fedtune.common.config import FederationConfig
from fedtune.server.strategies.base import AdapterState, Strategy, check_tensors, pack_state, unpack_state

#: ``v_t`` from ``v_{t-1}`` and ``delta_t ** 2``, elementwise.
SecondMoment = Callable[[np.ndarray, np.ndarray], np.ndarray]
Moments = dict[str, np.ndarray]


def fedopt_step(
    current: AdapterState,
    mean_delta: AdapterState,
    m: AdapterState,
    v: AdapterState,
    *,
    lr: float,
    beta1: float,
    tau: float,
    second_moment: SecondMoment,
    name: str = "fedopt",
) -> tuple[dict[str, np.ndarray], Moments, Moments]:
    """(next adapter as float32, m_t, v_t); empty ``m`` / ``v`` are the first round's m_{-1} = 0, v_{-1} = tau^2."""
    check_tensors(current, mean_delta, m, name)
    check_tensors(current, mean_delta, v, name)
    new, m_next, v_next = {}, {}, {}
    for key in sorted(current):
        delta = np.asarray(mean_delta[key], np.float64)
        m_prev = np.asarray(m[key], np.float64) if m else np.zeros_like(delta)
        v_prev = np.asarray(v[key], np.float64) if v else np.full_like(delta, tau * tau)
        m_next[key] = beta1 * m_prev + (1.0 - beta1) * delta
        v_next[key] = second_moment(v_prev, delta * delta)
        step = lr * m_next[key] / (np.sqrt(v_next[key]) + tau)
        new[key] = (np.asarray(current[key], np.float64) + step).astype(np.float32)
    return new, m_next, v_next


class FedOpt(Strategy):
    """A FedOpt strategy: hyperparameters from ``federation.server_optimizer``, moments as its state."""

    #: eta when ``server_optimizer.lr`` is 0 (Flower's default for the same strategy).
    default_lr: ClassVar[float]
    #: Whether it keeps a first moment (FedAdagrad does not: m_t = delta_t).
    keeps_momentum: ClassVar[bool] = True

    def __init__(self, lr: float | None = None, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3) -> None:
        self.lr = self.default_lr if lr is None else lr
        self.beta1 = beta1 if self.keeps_momentum else 0.0
        self.beta2, self.tau = beta2, tau
        self.m: Moments = {}
        self.v: Moments = {}

    @classmethod
    def from_config(cls, federation: FederationConfig) -> Self:
        opt = federation.server_optimizer
        return cls(lr=opt.lr or cls.default_lr, beta1=opt.beta1, beta2=opt.beta2, tau=opt.tau)

    @abstractmethod
    def second_moment(self, v: np.ndarray, delta_squared: np.ndarray) -> np.ndarray:
        """v_t from v_{t-1} and delta_t^2."""

    def apply(self, current: AdapterState, mean_delta: AdapterState, round_: int) -> dict[str, np.ndarray]:
        new, m, self.v = fedopt_step(
            current,
            mean_delta,
            self.m,
            self.v,
            lr=self.lr,
            beta1=self.beta1,
            tau=self.tau,
            second_moment=self.second_moment,
            name=self.name,
        )
        if self.keeps_momentum:
            self.m = m
        return new

    def _groups(self) -> tuple[str, ...]:
        return ("m", "v") if self.keeps_momentum else ("v",)

    def state_dict(self) -> dict[str, np.ndarray]:
        return pack_state(**{"m": self.m, "v": self.v} if self.keeps_momentum else {"v": self.v})

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        groups = unpack_state(state, self._groups(), self.name)
        self.m, self.v = groups.get("m", {}), groups["v"]
