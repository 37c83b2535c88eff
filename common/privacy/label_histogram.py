"""Class weights for imbalanced labels, from a label histogram released under the Gaussian mechanism.

Balanced weights computed from a site's exact label counts would make every record's loss
depend on every other record's label, which DP-SGD's analysis does not cover. So the
counts are first released with Gaussian noise (adding or removing one record moves one
count by 1: L2 sensitivity 1), that release is charged to the site's ledger as one
``(noise, sample_rate=1, steps=1)`` step, and the weights are post-processing of it.
The histogram itself never leaves the site.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def noisy_label_histogram(
    labels: Sequence[int], num_classes: int, noise: float, rng: np.random.Generator
) -> np.ndarray:
    """Counts per class plus N(0, noise^2) each: the Gaussian mechanism at sensitivity 1."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).astype(np.float64)
    return counts + rng.normal(0.0, noise, size=num_classes)


def balanced_class_weights(counts: np.ndarray, floor: float = 1.0, max_ratio: float = 10.0) -> np.ndarray:
    """``n / (K * count_k)`` per class, counts floored at ``floor`` (the noise level), clipped to
    ``[1/max_ratio, max_ratio]`` and scaled so the count-weighted mean weight is 1."""
    c = np.maximum(np.asarray(counts, dtype=np.float64), floor)
    weights = np.clip(c.sum() / (len(c) * c), 1.0 / max_ratio, max_ratio)
    return weights * c.sum() / float((weights * c).sum())
