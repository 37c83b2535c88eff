"""The sparse neighbour graph of SecAgg+ and the reconstruction threshold.

Each site shares its secrets only with its neighbours (and itself), and masks only with its
neighbours: communication and computation grow with ``k`` instead of ``n``. The graph is
a Harary graph over a random ordering of the sites (Bell et al., 2020): every site gets
``k`` neighbours, ``k/2`` on each side of a ring.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence


def neighbour_count(num_sites: int, requested: int = 0) -> int:
    """``requested`` (0: about 2 log2 n + 2, which Bell et al. show suffices), even and below n."""
    if num_sites < 2:
        raise ValueError(f"secure aggregation needs at least 2 sites, got {num_sites}")
    k = requested or 2 * math.ceil(math.log2(num_sites)) + 2
    if k >= num_sites - 1:
        return num_sites - 1
    return max(2, k - (k % 2))


def neighbour_graph(sites: Sequence[int], k: int, seed: int) -> dict[int, tuple[int, ...]]:
    """Each site's neighbours (a symmetric relation, nobody their own neighbour)."""
    order = sorted(sites)
    random.Random(seed).shuffle(order)
    n = len(order)
    if k >= n - 1:
        return {s: tuple(sorted(t for t in order if t != s)) for s in order}
    half = k // 2
    return {order[p]: tuple(sorted({order[(p + d) % n] for d in range(-half, half + 1) if d != 0})) for p in range(n)}


def reconstruction_threshold(k: int, fraction: float = 0.5) -> int:
    """Shares (of ``k + 1``: the neighbours and the site itself) needed to rebuild a secret.

    Above half by default: then no set of answers the protocol allows can hold both a
    site's self-mask seed and its mask key.
    """
    return min(k + 1, math.floor(fraction * (k + 1)) + 1)
