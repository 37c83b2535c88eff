"""Noise calibration and epsilon accounting, delegated to Opacus' accountants.

A site's privacy loss is a composition of Poisson-subsampled Gaussian steps, one
``(noise_multiplier, sample_rate, steps)`` triple per round. Epsilon is always computed
by the accountant from that full history, never estimated or extrapolated.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

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
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    total_steps: int,
    accountant: str = "rdp",
    prior: Sequence[StepGroup] = (),
) -> float:
    """Smallest noise multiplier (to 0.01 in epsilon) whose ``total_steps`` stay within the target.

    ``prior`` holds releases planned before training (a DP label histogram, say) that share the budget.
    The search takes seconds and a site repeats it every round with the same arguments, so the
    result is memoised per process (a pure function of its arguments).
    """
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample rate must be in (0, 1], got {sample_rate}")
    return _calibrate(
        float(target_epsilon),
        float(delta),
        float(sample_rate),
        int(total_steps),
        accountant,
        tuple((float(s), float(q), int(n)) for s, q, n in prior),
    )


@lru_cache(maxsize=1024)
def _calibrate(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    total_steps: int,
    accountant: str,
    prior: tuple[StepGroup, ...],
) -> float:
    if prior:
        return _calibrate_after(target_epsilon, delta, sample_rate, total_steps, accountant, list(prior))
    return float(
        get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=total_steps,
            accountant=accountant,
            epsilon_tolerance=0.01,
        )
    )


def _calibrate_after(
    target: float, delta: float, q: float, steps: int, accountant: str, prior: list[StepGroup]
) -> float:
    """Bisection as in Opacus' ``get_noise_multiplier``, with ``prior`` composed in front."""
    if epsilon_spent(prior, delta, accountant) >= target:
        raise ValueError(f"the releases before training alone spend epsilon >= {target}; raise their noise")

    def eps(sigma: float) -> float:
        return epsilon_spent([*prior, (sigma, q, steps)], delta, accountant)

    low, high = 0.0, 10.0
    while eps(high) > target:
        low, high = high, 2 * high
        if high > 1e6:
            raise ValueError(f"no noise multiplier reaches epsilon={target} for {steps} steps at q={q}")
    while target - eps(high) > 0.01:
        mid = (low + high) / 2
        low, high = (mid, high) if eps(mid) > target else (low, mid)
    return high
