"""Fixed-point encoding of example-weighted updates into the ring of 64-bit integers.

A site clips each coordinate of its update to ``[-clip_range, clip_range]``, scales it onto
a grid of ``levels`` steps per ``clip_range``, multiplies it by its example count ``n_i``
(its weight, a whole number) and rounds the product stochastically to an integer. The server
unmasks ``sum(round(n_i * y_i))`` over the sites that finished and divides by their
``sum(n_i)``, which it knows from the advertisements. The grid is sized by the round's total
example count ``N`` so that ``N * (levels + 1) < 2**63``: the sum never leaves the signed
64-bit range, whichever sites drop, and arithmetic modulo 2**64 keeps it exact.

Each site's rounding is unbiased and under one unit, so the mean is off by less than
``m / sum(n_i) <= 1`` grid step (``clip_range / levels``; ``clip_range / 2**40`` for rounds
under eight million examples) however many sites drop and however their examples are split.
Pre-weighting by the share ``n_i / N`` in a 32-bit ring, as before, made the server divide
the rounding error by the finished sites' share of ``N`` (issue 15, attack 6: relative error
9e-4 when four 250,000-example sites dropped and six 10-example sites finished).

The product is rounded, not the update before it: ``n_i * round(y_i)`` would make every
site's contribution a multiple of its known count, and a sum whose other terms share a
factor ``g`` would give away the target's ``round(y_t)`` modulo ``g``. Rounding ``n_i * y_i``
needs more precision than float64 holds at ``2**80``, so it is done in two parts: the whole
part of ``y_i`` times ``n_i`` in integers, plus ``n_i`` times its fraction rounded in floats.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MODULUS_BITS = 64
#: Grid steps per clip range at most: far finer than any update needs, and the whole part of a
#: scaled value stays exact in float64.
MAX_LEVELS = 2**40
#: The most examples a round may count (the grid keeps at least 2**23 levels below it).
MAX_TOTAL_EXAMPLES = 2**40


@dataclass(frozen=True)
class QuantisationGrid:
    """The grid shared by every site of a round, sized by the round's total example count."""

    clip_range: float
    total_examples: int

    def __post_init__(self) -> None:
        if not (np.isfinite(self.clip_range) and self.clip_range > 0):
            raise ValueError(f"clip_range must be positive and finite, got {self.clip_range}")
        if not 1 <= self.total_examples < MAX_TOTAL_EXAMPLES:
            raise ValueError(f"total_examples must be in [1, 2**40), got {self.total_examples}")

    @property
    def levels(self) -> int:
        """Grid steps per ``clip_range``: ``total_examples * (levels + 1)`` stays below 2**63."""
        return min(MAX_LEVELS, (2 ** (MODULUS_BITS - 1) - 1) // self.total_examples - 1)

    @property
    def step(self) -> float:
        return self.clip_range / self.levels


def quantise(
    update: np.ndarray, weight: int, grid: QuantisationGrid, rng: np.random.Generator, out: np.ndarray | None = None
) -> tuple[np.ndarray, int]:
    """``weight * update`` on the grid, stochastically rounded, as uint64 (two's complement), and
    how many coordinates were clipped.

    This runs on every site in every secure round, so it makes few passes over two float64
    buffers and writes into ``out`` (uint64, the update's length) when given. The update is
    clipped in float64 (a float32 clip would let ``float32(clip_range)`` through, past the
    bound the ring was sized for).
    """
    if not (isinstance(weight, int | np.integer) and 1 <= weight <= grid.total_examples):
        raise ValueError(f"aggregation weight must be a whole number in [1, {grid.total_examples}], got {weight}")
    x = np.asarray(update).ravel()
    if not np.isfinite(x.sum()) and not np.all(np.isfinite(x)):
        raise ValueError("the update contains NaN or infinity; it cannot be aggregated")
    c, n = grid.clip_range, x.shape[0]
    y = np.empty(n, dtype=np.float64)
    y[...] = x
    clipped = int(np.count_nonzero(y > c)) + int(np.count_nonzero(y < -c))
    np.clip(y, -c, c, out=y)
    y *= grid.levels / c  # |y| <= levels <= 2**40
    out = np.empty(n, dtype=np.uint64) if out is None else out
    scratch = np.floor(y)  # the whole part, exact in float64; its memory is reused twice below
    out.view(np.int64)[...] = scratch
    y -= scratch  # the fraction, in [0, 1)
    y *= weight  # in [0, weight), resolved to 2**-12 or finer since weight < 2**40
    # float32 draws: a rounding probability off by at most 2**-24.
    y += rng.random(n, dtype=np.float32, out=scratch.view(np.float32)[:n])
    part = scratch.view(np.uint64)
    part[...] = y  # y >= 0, so the cast's truncation is the floor: a whole number in [0, weight]
    out *= np.uint64(weight)  # the whole part times weight, modulo 2**64 (two's complement)
    out += part
    return out, clipped


def dequantise(total: np.ndarray, grid: QuantisationGrid, weight: int) -> np.ndarray:
    """The mean encoded by ``total``: a sum modulo 2**64 of quantised updates whose weights add up to ``weight``."""
    if weight < 1:
        raise ValueError(f"the finished sites' weights must add up to at least 1, got {weight}")
    return np.asarray(total, dtype=np.uint64).view(np.int64).astype(np.float64) * (grid.step / weight)


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
