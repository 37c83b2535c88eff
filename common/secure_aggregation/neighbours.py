"""The sparse neighbour graph of SecAgg+ and the reconstruction threshold.

Each site shares its secrets only with its neighbours (and itself), and masks only with its
neighbours: communication and computation grow with ``k`` instead of ``n``. The graph is
a Harary graph over a random ordering of the sites (Bell et al., 2020): every site gets
``k`` neighbours, ``k/2`` on each side of a ring.
"""

from __future__ import annotations

import hashlib
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
    return ring_graph(order, k)


def ring_graph(order: Sequence[int], k: int) -> dict[int, tuple[int, ...]]:
    """Each site's neighbours on the ring ``order``: the k/2 on either side (all, when k >= n - 1)."""
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


def public_graph(num_sites: int, k: int, round_seed: bytes) -> dict[int, tuple[int, ...]]:
    """The graph over indices 1..n that every site can recompute from the round's public data.

    A shuffle seeded by ``round_seed``; rounds with a roster place members by their own signatures
    instead (``protocol.round_ring``).
    """
    return neighbour_graph(list(range(1, num_sites + 1)), k, _public_seed(round_seed))


def public_ring(num_sites: int, round_seed: bytes) -> list[int]:
    """The ring order of :func:`public_graph`: each site's neighbours are the k/2 on either side."""
    order = list(range(1, num_sites + 1))
    random.Random(_public_seed(round_seed)).shuffle(order)
    return order


def _public_seed(round_seed: bytes) -> int:
    return int.from_bytes(hashlib.sha256(b"fedtune secagg graph v1\x00" + round_seed).digest()[:8], "big")


def smallest_group(graph: dict[int, tuple[int, ...]], survivors: Sequence[int]) -> int:
    """Size of the smallest connected group of ``survivors`` once every other site is removed.

    After unmasking, the server holds the survivors' self-mask seeds and the dropped sites' mask
    keys: the only masks left are those between two survivors, so the sum over any such group
    comes out on its own.
    """
    alive, seen, smallest = set(survivors), set(), len(survivors)
    for start in alive:
        if start in seen:
            continue
        group, stack = 0, [start]
        seen.add(start)
        while stack:
            node = stack.pop()
            group += 1
            for other in graph.get(node, ()):
                if other in alive and other not in seen:
                    seen.add(other)
                    stack.append(other)
        smallest = min(smallest, group)
    return smallest
