"""Partitioning is deterministic, complete and disjoint."""

from __future__ import annotations

import pytest

from fedtune.common.data.partition import partition_by_column, partition_dirichlet, partition_iid, split_train_val


def _check_cover(parts, n):
    flat = [i for p in parts for i in p]
    assert sorted(flat) == list(range(n))


def test_iid_is_a_seeded_even_split():
    parts = partition_iid(100, 3, seed=1)
    _check_cover(parts, 100)
    assert sorted(len(p) for p in parts) == [33, 33, 34]
    assert parts == partition_iid(100, 3, seed=1) != partition_iid(100, 3, seed=2)


def test_dirichlet_skews_labels_and_respects_min_size():
    labels = [f"c{i % 5}" for i in range(500)]
    skewed = partition_dirichlet(labels, 4, alpha=0.1, seed=0, min_size=10)
    _check_cover(skewed, 500)
    assert min(len(p) for p in skewed) >= 10

    def top_share(parts):
        shares = []
        for p in parts:
            counts = [sum(labels[i] == c for i in p) for c in set(labels)]
            shares.append(max(counts) / len(p))
        return sum(shares) / len(shares)

    assert top_share(skewed) > top_share(partition_dirichlet(labels, 4, alpha=100.0, seed=0)) + 0.2
    with pytest.raises(ValueError, match="raise partition.alpha"):
        partition_dirichlet(labels[:20], 10, alpha=0.01, seed=0, min_size=5, max_tries=3)


def test_by_column_gives_one_site_per_value():
    values = ["GHR"] * 5 + ["CDC"] * 2 + ["NHLBI"] * 3
    parts = partition_by_column(values, 2)
    assert [sorted({values[i] for i in p}) for p in parts] == [["GHR"], ["NHLBI"]]
    with pytest.raises(ValueError, match="only 3 distinct values"):
        partition_by_column(values, 4)


def test_train_val_split_is_disjoint_and_seeded():
    train, val = split_train_val(list(range(10, 30)), 0.25, seed=3)
    assert len(val) == 5 and not set(train) & set(val) and sorted(train + val) == list(range(10, 30))
    assert (train, val) == split_train_val(list(range(10, 30)), 0.25, seed=3)
