"""Leakage metrics of a trained model, as empirical_privacy.py measures them (pure numpy, no model).

Canary exposure (Carlini et al., "The Secret Sharer", 2019): log2(#candidates) - log2(rank of
the planted label among all labels by the model's logits). Membership inference by a loss
threshold (Yeom et al., 2018): the ROC curve and AUC of members' against non-members' scores,
and the hit rate at a small false-positive rate.
"""

from __future__ import annotations

import math

import numpy as np


def label_ranks(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """1-based rank of each row's ``labels`` entry among its logits (1 = the model's top choice; ties count against)."""
    logits = np.asarray(logits, dtype=np.float64)
    own = logits[np.arange(len(logits)), np.asarray(labels)]
    return (logits >= own[:, None]).sum(axis=1)


def exposure(ranks: np.ndarray, candidates: int) -> np.ndarray:
    """log2(candidates) - log2(rank): 0 bits for the last rank, log2(candidates) for the top one."""
    ranks = np.asarray(ranks, dtype=np.float64)
    if np.any(ranks < 1) or np.any(ranks > candidates):
        raise ValueError(f"ranks must lie in [1, {candidates}]")
    return math.log2(candidates) - np.log2(ranks)


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-record loss -log softmax(logits)[label], computed stably."""
    logits = np.asarray(logits, dtype=np.float64)
    top = logits.max(axis=1, keepdims=True)
    log_norm = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
    return log_norm - logits[np.arange(len(logits)), np.asarray(labels)]


def roc_auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counting one half (Mann-Whitney U / (n_pos n_neg))."""
    pos, neg = np.asarray(positive, dtype=np.float64), np.asarray(negative, dtype=np.float64)
    if not len(pos) or not len(neg):
        raise ValueError("need at least one positive and one negative score")
    scores = np.concatenate([pos, neg])
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    start = 0
    while start < len(scores):  # average ranks over ties
        end = start
        while end + 1 < len(scores) and sorted_scores[end + 1] == sorted_scores[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2 + 1
        start = end + 1
    u = ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(pos) * len(neg)))


def roc_curve(positive: np.ndarray, negative: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates of every threshold "score >= t", from the strictest down."""
    thresholds = np.unique(np.concatenate([positive, negative]))[::-1]
    pos, neg = np.asarray(positive), np.asarray(negative)
    tpr = np.array([0.0, *[(pos >= t).mean() for t in thresholds]])
    fpr = np.array([0.0, *[(neg >= t).mean() for t in thresholds]])
    return fpr, tpr


def tpr_at_fpr(positive: np.ndarray, negative: np.ndarray, max_fpr: float) -> float:
    """The attack's hit rate when it may wrongly accuse at most ``max_fpr`` of non-members."""
    fpr, tpr = roc_curve(positive, negative)
    return float(tpr[fpr <= max_fpr].max())
