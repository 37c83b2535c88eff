"""Noise calibration and epsilon accounting, delegated to Opacus' accountants.

A site's privacy loss is a composition of Poisson-subsampled Gaussian steps, one
``(noise_multiplier, sample_rate, steps)`` triple per round. Epsilon is always computed
by the accountant from that full history, never estimated or extrapolated.
"""

from __future__ import annotations

from collections.abc import Sequence

from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

StepGroup = tuple[float, float, int]  # (noise_multiplier, sample_rate, steps)


def epsilon_spent(history: Sequence[StepGroup], delta: float, accountant: str = "rdp") -> float:
    """Epsilon at ``delta`` after every step in ``history``."""
    groups = [(float(s), float(q), int(n)) for s, q, n in history if n > 0]
    if not groups:
        return 0.0
    acc = create_accountant(mechanism=accountant)
    acc.history = groups
    return float(acc.get_epsilon(delta=delta))


def calibrate_noise(
    target_epsilon: float, delta: float, sample_rate: float, total_steps: int, accountant: str = "rdp"
) -> float:
    """Smallest noise multiplier (to 0.01 in epsilon) whose ``total_steps`` stay within the target."""
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample rate must be in (0, 1], got {sample_rate}")
    return float(
        get_noise_multiplier(
            target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
            steps=total_steps, accountant=accountant, epsilon_tolerance=0.01,
        )
    )
