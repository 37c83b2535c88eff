"""Robust aggregation rules over the sites' updates, for when secure aggregation is off.

The mean of :func:`~fedtune.server.strategies.mean_delta.mean_delta` follows any one site that
sends a large enough update. Two rules bound what a few byzantine sites can do, at the price of
the server seeing every site's update (so never under secure aggregation, where it sees only the
sum):

- coordinate-wise trimmed mean (Yin et al., "Byzantine-Robust Distributed Learning: Towards
  Optimal Statistical Rates", ICML 2018): for each coordinate, drop the ``floor(beta * n)``
  largest and smallest values and average the rest (Flower's ``trim_mean``);
- (multi-)Krum (Blanchard et al., "Machine Learning with Adversaries: Byzantine Tolerant Gradient
  Descent", NeurIPS 2017): score each update by the summed squared distances to its ``n - f - 2``
  nearest others and average the ``m`` best scored (``m = 1``: Krum). It needs ``n > 2f + 2``.

Both ignore the sites' example counts: a site reports its own count, and a byzantine one would
inflate it. Like the mean, the result is a delta (named float64 tensors) that the configured
:class:`~fedtune.server.strategies.base.Strategy` turns into the next global adapter.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean

from fedtune.common.config import FederationConfig
from fedtune.server.strategies.mean_delta import AdapterState

RobustRule = Literal["trimmed_mean", "krum"]


class TooFewUpdates(ValueError):
    """The round has too few updates for the rule to give its guarantee; the message says why."""


@dataclass(frozen=True)
class RobustSettings:
    """The rules' parameters, as ``federation.trim_fraction``, ``krum_byzantine`` and ``krum_select`` set them."""

    trim_fraction: float = 0.2
    byzantine: int = 1
    select: int = 1

    @classmethod
    def of(cls, federation: FederationConfig) -> RobustSettings:
        return cls(federation.trim_fraction, federation.krum_byzantine, federation.krum_select)


@dataclass(frozen=True)
class RobustDelta:
    """The delta a rule chose, what to say about it in the round's status, and (Krum) whom it chose."""

    delta: dict[str, np.ndarray]
    description: str
    selected: tuple[int, ...] = ()


def trimmed_count(n: int, trim_fraction: float) -> int:
    """How many values the trimmed mean drops at each end of ``n`` (Flower's and scipy's ``int(beta * n)``)."""
    return int(trim_fraction * n)


def trimmed_mean(stacked: np.ndarray, trim_fraction: float) -> np.ndarray:
    """Coordinate-wise trimmed mean over axis 0 (Yin et al. 2018), by Flower's ``trim_mean``.

    Refuses a fraction that trims nothing from ``n`` updates: that would be the plain mean.
    """
    cut = trimmed_count(len(stacked), trim_fraction)
    if cut < 1:
        raise TooFewUpdates(
            f"the trimmed mean of {len(stacked)} updates with federation.trim_fraction = {trim_fraction:g} "
            "trims none (it needs trim_fraction * updates >= 1)"
        )
    return np.asarray(trim_mean(stacked, trim_fraction), dtype=np.float64)


def krum_scores(flat: np.ndarray, byzantine: int) -> np.ndarray:
    """Each row's Krum score: the sum of its squared L2 distances to its ``n - f - 2`` nearest other rows.

    Blanchard et al. (2017), section 4; the same score as Flower's ``aggregate_krum``, computed here
    because the server must know (and log) which sites were chosen, which Flower's function does not return.
    """
    n = len(flat)
    if n <= 2 * byzantine + 2:
        raise TooFewUpdates(
            f"Krum with federation.krum_byzantine = {byzantine} needs more than {2 * byzantine + 2} updates, got {n}"
        )
    distances = np.full((n, n), np.inf)  # a row is not its own neighbour
    for i in range(n):  # pair by pair: memory of one row, where ``flat - row`` would hold n rows again
        for j in range(i + 1, n):
            distances[i, j] = distances[j, i] = np.sum(np.square(flat[i] - flat[j]))
    nearest = np.sort(distances, axis=1)[:, : n - byzantine - 2]
    return np.asarray(nearest.sum(axis=1), dtype=np.float64)


def krum_selection(flat: np.ndarray, byzantine: int, select: int) -> tuple[int, ...]:
    """Indices of the ``select`` best-scored rows, best first (multi-Krum; ``select = 1``: Krum).

    At most ``n - f`` are chosen, the number of honest updates there surely are; ties go to the
    lower index, so a round's choice does not depend on sorting details.
    """
    if select < 1:
        raise ValueError(f"federation.krum_select must be at least 1, got {select}")
    scores = krum_scores(flat, byzantine)
    keep = min(select, len(flat) - byzantine)
    return tuple(int(i) for i in np.argsort(scores, kind="stable")[:keep])


def _stacked_deltas(updates: Sequence[tuple[AdapterState, float]], current: AdapterState) -> dict[str, np.ndarray]:
    """``update - current`` for each tensor, stacked over the updates (axis 0), in float64; refuses what
    :func:`mean_delta` refuses: other names or shapes than ``current``, NaN or infinity."""
    if not updates:
        raise ValueError("no updates to aggregate")
    stacked = {}
    for key in sorted(current):
        base = np.asarray(current[key], dtype=np.float64)
        deltas = []
        for state, _ in updates:
            if set(state) != set(current):
                raise ValueError(f"updates disagree on tensor names: {sorted(set(current) ^ set(state))[:3]}")
            if np.shape(state[key]) != base.shape:
                got = np.shape(state[key])
                raise ValueError(f"tensor {key!r} has shape {got}, the global adapter's is {base.shape}")
            deltas.append(np.asarray(state[key], dtype=np.float64) - base)
        stacked[key] = np.stack(deltas)
        if not np.all(np.isfinite(stacked[key])):
            raise ValueError(f"tensor {key!r} contains NaN or infinity in at least one update")
    return stacked


def robust_delta(
    updates: Sequence[tuple[AdapterState, float]], current: AdapterState, rule: RobustRule, settings: RobustSettings
) -> RobustDelta:
    """The delta ``rule`` makes of the sites' updates, in :func:`mean_delta`'s format (in ``.delta``).

    Raises :class:`TooFewUpdates` when there are too few updates for the rule's guarantee (Krum:
    ``n <= 2f + 2``; trimmed mean: nothing trimmed); the caller then leaves the adapter as it is.
    """
    stacked = _stacked_deltas(updates, current)
    n = len(updates)
    if rule == "trimmed_mean":
        delta = {key: trimmed_mean(values, settings.trim_fraction) for key, values in stacked.items()}
        return RobustDelta(delta, f"trimmed mean, {trimmed_count(n, settings.trim_fraction)} trimmed each side")
    if rule == "krum":
        flat = np.concatenate([values.reshape(n, -1) for values in stacked.values()], axis=1)
        chosen = krum_selection(flat, settings.byzantine, settings.select)
        delta = {key: values[list(chosen)].mean(axis=0) for key, values in stacked.items()}
        name = "Krum" if settings.select == 1 else f"multi-Krum, {len(chosen)} selected"
        return RobustDelta(delta, f"{name}, f = {settings.byzantine}", chosen)
    raise ValueError(f"unknown robust aggregation rule {rule!r}; known: trimmed_mean, krum")
