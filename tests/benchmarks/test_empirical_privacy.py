"""The leakage metrics of benchmarks/leakage.py (empirical_privacy.py), against hand-worked cases and brute force."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tests.benchmarks.scripts import load_benchmark_module, load_benchmark_script

_script, _leakage = load_benchmark_script("empirical_privacy"), load_benchmark_module("leakage")
Canary, copy_texts = _script.Canary, _script.copy_texts
cross_entropy, exposure, label_ranks = _leakage.cross_entropy, _leakage.exposure, _leakage.label_ranks
roc_auc, tpr_at_fpr = _leakage.roc_auc, _leakage.tpr_at_fpr


def _pairwise_auc(pos, neg) -> float:
    """The definition itself: the share of (member, non-member) pairs ranked right, ties half."""
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def test_auc_hand_worked_cases():
    assert roc_auc([3, 1], [2, 0]) == 0.75  # pairs 3>2, 3>0, 1<2, 1>0
    assert roc_auc([2, 2], [2, 1]) == 0.75  # two ties count one half each
    assert roc_auc([5, 6], [1, 2]) == 1.0
    assert roc_auc([1, 2], [5, 6]) == 0.0
    assert roc_auc([1.0], [1.0]) == 0.5


def test_auc_matches_the_pairwise_definition_with_many_ties():
    rng = np.random.default_rng(3)
    pos, neg = rng.integers(0, 6, 40).astype(float), rng.integers(0, 5, 55).astype(float)
    assert roc_auc(pos, neg) == pytest.approx(_pairwise_auc(pos, neg), abs=1e-12)


def test_auc_needs_both_classes():
    with pytest.raises(ValueError):
        roc_auc([], [1.0])


def test_tpr_at_low_fpr():
    assert tpr_at_fpr([3, 2], [1, 0], 0.01) == 1.0
    assert tpr_at_fpr([3, 0.5], [1, 0], 0.01) == 0.5  # the second member hides below a non-member
    assert tpr_at_fpr([0, 0], [1, 2], 0.01) == 0.0


def test_ranks_and_exposure():
    logits = np.array([[0.1, 2.0, -1.0], [3.0, 2.0, 1.0], [0.0, 0.0, 1.0]])
    np.testing.assert_array_equal(label_ranks(logits, np.array([1, 2, 0])), [1, 3, 3])  # the tie counts against
    assert exposure(np.array([1]), 77)[0] == pytest.approx(math.log2(77))
    assert exposure(np.array([77]), 77)[0] == 0.0
    assert exposure(np.array([1]), 2)[0] == 1.0
    with pytest.raises(ValueError):
        exposure(np.array([0]), 77)
    with pytest.raises(ValueError):
        exposure(np.array([78]), 77)


def test_exposure_of_a_uniformly_random_rank_is_the_chance_level():
    k = 77  # mean over every rank = log2 k - log2(k!) / k, the reference a never-seen canary should show
    chance = math.log2(k) - math.lgamma(k + 1) / math.log(2) / k
    assert exposure(np.arange(1, k + 1), k).mean() == pytest.approx(chance)
    assert 1.3 < chance < 1.5


def test_cross_entropy_is_stable_and_exact():
    np.testing.assert_allclose(cross_entropy(np.array([[0.0, 0.0]]), np.array([0])), [math.log(2)])
    np.testing.assert_allclose(cross_entropy(np.array([[1000.0, 0.0]]), np.array([1])), [1000.0])
    logits = np.random.default_rng(0).normal(size=(5, 7))
    labels = np.arange(5)
    direct = -np.log(np.exp(logits[np.arange(5), labels]) / np.exp(logits).sum(axis=1))
    np.testing.assert_allclose(cross_entropy(logits, labels), direct)


def test_canary_copies_are_distinct_records_with_the_same_lowercase_text():
    canary = Canary("my secret is alpha beta gamma", "card_arrival", 4)
    texts = copy_texts(canary)
    assert len(texts) == 4 and len(set(texts)) == 4
    assert {t.lower() for t in texts} == {canary.text}
    assert copy_texts(Canary("a b", "x", 1)) == ["a b"]
    with pytest.raises(ValueError):
        copy_texts(Canary("a b", "x", 4))
