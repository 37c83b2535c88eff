"""Split a data set across simulated sites: IID, Dirichlet over labels, or by a column.

Pure functions of (keys, seed) returning index lists, so they are testable without Flower.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np


def partition_iid(num_items: int, num_parts: int, seed: int) -> list[list[int]]:
    order = np.random.default_rng(seed).permutation(num_items)
    return [sorted(part.tolist()) for part in np.array_split(order, num_parts)]


def partition_dirichlet(
    labels: Sequence[str], num_parts: int, alpha: float, seed: int, min_size: int = 1, max_tries: int = 100
) -> list[list[int]]:
    """Per label, split its items across parts with proportions drawn from Dir(alpha).

    Re-draws (up to ``max_tries``) until every part holds at least ``min_size`` items,
    the usual practice of FL benchmarks (e.g. Flower Datasets' DirichletPartitioner).
    """
    rng = np.random.default_rng(seed)
    by_label: dict[str, list[int]] = defaultdict(list)
    for i, label in enumerate(labels):
        by_label[label].append(i)
    for _ in range(max_tries):
        parts: list[list[int]] = [[] for _ in range(num_parts)]
        for label in sorted(by_label):
            items = rng.permutation(by_label[label])
            shares = rng.dirichlet([alpha] * num_parts)
            cuts = (np.cumsum(shares)[:-1] * len(items)).astype(int)
            for part, chunk in zip(parts, np.split(items, cuts), strict=False):
                part.extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [sorted(p) for p in parts]
    raise ValueError(
        f"Dirichlet(alpha={alpha}) left a site with fewer than {min_size} items after {max_tries} draws; "
        "raise partition.alpha or lower partition.num_clients"
    )


def partition_by_column(values: Sequence[str], num_parts: int) -> list[list[int]]:
    """One part per distinct value (sorted), e.g. one NIH source per hospital.

    With fewer parts than values the largest groups are kept, each as its own site.
    """
    groups: dict[str, list[int]] = defaultdict(list)
    for i, value in enumerate(values):
        groups[value].append(i)
    if num_parts > len(groups):
        raise ValueError(f"asked for {num_parts} sites but the column has only {len(groups)} distinct values")
    chosen = sorted(groups, key=lambda v: (-len(groups[v]), v))[:num_parts]
    return [groups[v] for v in sorted(chosen)]


def split_train_val(indices: Sequence[int], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic train/validation split of one site's items."""
    order = np.random.default_rng(seed).permutation(len(indices))
    n_val = int(round(len(indices) * val_fraction))
    val = sorted(indices[i] for i in order[:n_val])
    train = sorted(indices[i] for i in order[n_val:])
    return train, val
