"""Fixed-point encoding of weighted updates into the ring of 32-bit integers.

A site clips each coordinate of its update to ``[-clip_range, clip_range]``, scales it by
its aggregation weight (its share of the round's examples, so the weights sum to at most
one) and rounds it stochastically onto a grid of ``levels`` steps per ``clip_range``. The
sum of all sites' integers then stays inside the signed 32-bit range, so it survives
arithmetic modulo 2**32 exactly; the only error is the rounding, unbiased and at most one
grid step per site, i.e. ``clip_range / 2**31`` per site, whatever the example counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MODULUS_BITS = 32


@dataclass(frozen=True)
class QuantisationGrid:
    """The grid shared by every site of a round."""

    clip_range: float
    max_participants: int

    def __post_init__(self) -> None:
        if not (np.isfinite(self.clip_range) and self.clip_range > 0):
            raise ValueError(f"clip_range must be positive and finite, got {self.clip_range}")
        if not 1 <= self.max_participants < 2**20:
            raise ValueError(f"max_participants must be in [1, 2**20), got {self.max_participants}")

    @property
    def levels(self) -> int:
        """Grid steps per ``clip_range``; the headroom absorbs each site's rounding up by one."""
        return 2 ** (MODULUS_BITS - 1) - 1 - self.max_participants

    @property
    def step(self) -> float:
        return self.clip_range / self.levels


def quantise(
    update: np.ndarray, weight: float, grid: QuantisationGrid, rng: np.random.Generator, out: np.ndarray | None = None
) -> tuple[np.ndarray, int]:
    """``update * weight`` on the grid, as uint32 (two's complement), and how many coordinates were clipped.

    This runs on every site in every secure round, so it makes few passes over one float64
    buffer and writes into ``out`` (uint32, the update's length) when given. Shifting by
    2**31 before the cast turns the cast's truncation into the floor of stochastic rounding
    and the shift back (the top bit flipped) into two's complement modulo 2**32.
    """
    if not 0.0 < weight <= 1.0:
        raise ValueError(f"aggregation weight must be in (0, 1], got {weight}")
    x = np.asarray(update).ravel()
    if not np.isfinite(x.sum()) and not np.all(np.isfinite(x)):
        raise ValueError("the update contains NaN or infinity; it cannot be aggregated")
    c = grid.clip_range
    clipped = int(np.count_nonzero(x > c)) + int(np.count_nonzero(x < -c))
    y = np.empty(x.shape[0], dtype=np.float64)
    np.clip(x, -c, c, out=y)
    y *= weight * grid.levels / c
    # float32 draws: a rounding probability off by at most 2**-24 of one grid step.
    y += rng.random(x.shape[0], dtype=np.float32)
    y += 2.0 ** (MODULUS_BITS - 1)
    out = np.empty(x.shape[0], dtype=np.uint32) if out is None else out
    out[...] = y  # |y - 2**31| < 2**31: in range of uint32, truncation is the floor
    out ^= np.uint32(1 << (MODULUS_BITS - 1))
    return out, clipped


def dequantise(total: np.ndarray, grid: QuantisationGrid) -> np.ndarray:
    """The real-valued sum encoded by ``total`` (a sum modulo 2**32 of quantised updates)."""
    return np.asarray(total, dtype=np.uint32).view(np.int32).astype(np.float64) * grid.step


def auto_clip_range(optimizer: str, lr: float, local_steps: int, max_grad_norm: float) -> float:
    """A per-coordinate bound on one round's update, from the local optimiser's step bound.

    Adam moves each coordinate by at most about ``lr * (1 - beta1) / sqrt(1 - beta2)`` per
    step (Kingma & Ba, 2015, section 2.1), 3.2 lr for the default betas: 4 lr a step is a
    true bound. SGD's step is the clipped, noised gradient times lr, which has no hard
    bound; ``2 * lr * max_grad_norm`` a step covers it with margin, and any coordinate past
    the range is clipped and counted, so an operator sees when to raise it.
    """
    per_step = 4.0 * lr if optimizer == "adam" else 2.0 * lr * max_grad_norm
    return per_step * local_steps
