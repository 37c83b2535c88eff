"""The pooling probe's mechanism is DP-SGD's: per-record clipping, calibrated noise, the accountant's epsilon."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedtune.common.privacy.accounting import epsilon_spent
from tests.benchmarks.scripts import load_benchmark_script

probe = load_benchmark_script("pooling_probe")


def _data(n=40, d=6, labels=4, seed=0):
    rng = np.random.default_rng(seed)
    return probe.with_bias(rng.normal(size=(n, d)) * 3), rng.integers(0, labels, n), rng.normal(size=(labels, d + 1))


def test_clipped_gradient_sum_matches_autograd_per_record():
    x, y, w = _data()
    clip = 0.5
    expected = np.zeros_like(w)
    for xi, yi in zip(x, y, strict=True):
        weights = torch.tensor(w, requires_grad=True)
        torch.nn.functional.cross_entropy((torch.tensor(xi) @ weights.T)[None], torch.tensor([yi])).backward()
        g = weights.grad.numpy()
        expected += g * min(1.0, clip / np.linalg.norm(g))
    np.testing.assert_allclose(probe.clipped_gradient_sum(w, x, y, clip), expected, rtol=1e-9, atol=1e-12)


def test_noise_free_full_batch_training_is_clipped_gradient_descent():
    x, y, w = _data()
    sites = [(x[:25], y[:25]), (x[25:], y[25:])]
    schedule = probe.HeadSchedule(rounds=1, steps=1, sample_rate=1.0, lr=0.3, epsilon=None, clip=0.5)
    curve, eps, sigma = probe.federated_head_training(sites, (x, y), w, schedule)
    step = sum(probe.clipped_gradient_sum(w, sx, sy, 0.5) / len(sy) * len(sy) / len(y) for sx, sy in sites)
    expected = w - 0.3 * step
    assert (eps, sigma) == (None, 0.0)
    assert curve == [float((np.argmax(x @ expected.T, axis=1) == y).mean())]


@pytest.mark.parametrize("target", [1.0, 8.0])
def test_private_training_reports_the_accountants_epsilon(target):
    x, y, w = _data()
    schedule = probe.HeadSchedule(rounds=3, steps=2, sample_rate=0.5, lr=0.1, epsilon=target)
    curve, eps, sigma = probe.federated_head_training([(x, y)], (x, y), w, schedule)
    assert len(curve) == 3 and sigma > 0
    assert eps == epsilon_spent([(sigma, 0.5, 6)], probe.DELTA)
    assert target - 0.02 <= eps <= target
