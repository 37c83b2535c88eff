"""Epsilon comes from the accountant over every step taken; the ledger persists and refuses."""

from __future__ import annotations

import json

import pytest
from opacus.accountants import RDPAccountant

from fedtune.common.privacy.accounting import calibrate_noise, epsilon_spent
from fedtune.common.privacy.ledger import LedgerError, PrivacyBudgetExceeded, PrivacyLedger


def test_epsilon_equals_the_accountants_figure_for_the_steps_taken():
    acc = RDPAccountant()
    history = [(1.1, 0.05, 10), (1.1, 0.05, 10), (0.9, 0.02, 7)]
    for sigma, q, steps in history:
        for _ in range(steps):
            acc.step(noise_multiplier=sigma, sample_rate=q)
    assert epsilon_spent(history, 1e-5) == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-12)
    assert epsilon_spent([], 1e-5) == 0.0


def test_calibrated_noise_meets_the_target_for_the_planned_steps():
    sigma = calibrate_noise(8.0, 1e-5, 0.02, 400)
    eps = epsilon_spent([(sigma, 0.02, 400)], 1e-5)
    assert 7.9 <= eps <= 8.0
    assert epsilon_spent([(sigma, 0.02, 401)], 1e-5) > eps
    assert calibrate_noise(1.0, 1e-5, 0.02, 400) > sigma


def test_ledger_persists_across_restarts_and_reports_accountant_epsilon(tmp_path):
    path = tmp_path / "site" / "privacy_ledger.json"
    ledger = PrivacyLedger.open(path, delta=1e-5)
    ledger.record("run-a", 1, 1.2, 0.05, 20)
    ledger.record("run-a", 2, 1.2, 0.05, 20)
    reopened = PrivacyLedger.open(path, delta=1e-5)
    assert [e.round for e in reopened.entries] == [1, 2]
    assert reopened.steps == 40
    assert reopened.epsilon == pytest.approx(epsilon_spent([(1.2, 0.05, 40)], 1e-5), rel=1e-9)
    stored = json.loads(path.read_text())
    assert stored["entries"][-1]["epsilon"] == pytest.approx(reopened.epsilon)
    assert stored["entries"][0]["epsilon"] < stored["entries"][1]["epsilon"]


def test_ledger_refuses_a_round_that_would_exceed_the_budget(tmp_path):
    path = tmp_path / "ledger.json"
    sigma = calibrate_noise(2.0, 1e-5, 0.05, 30)
    ledger = PrivacyLedger.open(path, delta=1e-5)
    for round_ in (1, 2, 3):
        ledger.check_budget(sigma, 0.05, 10, max_epsilon=2.0)
        ledger.record("r", round_, sigma, 0.05, 10)
    before = path.read_bytes()
    with pytest.raises(PrivacyBudgetExceeded, match=r"privacy budget exhausted.*over this site's limit of 2.0"):
        PrivacyLedger.open(path, delta=1e-5).check_budget(sigma, 0.05, 10, max_epsilon=2.0)
    assert path.read_bytes() == before, "a refused round must not touch the ledger"


def test_ledger_rejects_mixed_delta_and_corrupt_files(tmp_path):
    path = tmp_path / "ledger.json"
    PrivacyLedger.open(path, delta=1e-5).record("r", 1, 1.0, 0.1, 5)
    with pytest.raises(LedgerError, match="budgets cannot be mixed"):
        PrivacyLedger.open(path, delta=1e-4)
    path.write_text("{ not json")
    with pytest.raises(LedgerError, match="unreadable privacy ledger"):
        PrivacyLedger.open(path, delta=1e-5)


def test_calibration_with_a_prior_release_keeps_the_total_within_target():
    plain = calibrate_noise(4.0, 1e-5, 0.05, 200)
    with_prior = calibrate_noise(4.0, 1e-5, 0.05, 200, prior=[(5.0, 1.0, 1)])
    total = epsilon_spent([(5.0, 1.0, 1), (with_prior, 0.05, 200)], 1e-5)
    assert 3.99 - 0.01 <= total <= 4.0
    assert with_prior > plain
    with pytest.raises(ValueError, match="releases before training alone spend"):
        calibrate_noise(0.1, 1e-5, 0.05, 200, prior=[(0.5, 1.0, 1)])


def test_balanced_weights_are_inverse_to_counts_and_average_to_one():
    import numpy as np

    from fedtune.common.privacy.label_histogram import balanced_class_weights, noisy_label_histogram

    counts = np.array([90.0, 20.0, 10.0])
    w = balanced_class_weights(counts)
    np.testing.assert_allclose(w * counts, (w * counts)[0])  # every class carries the same total weight
    assert (w * counts).sum() / counts.sum() == pytest.approx(1.0)
    skewed = balanced_class_weights(np.array([1000.0, 0.0]), floor=5.0)  # empty class floored at the noise level
    assert skewed.max() / skewed.min() == pytest.approx(10 / (1005 / 2000))  # raw weight 100.5 clipped to 10
    noisy = noisy_label_histogram([0] * 90 + [1] * 20 + [2] * 10, 3, 2.0, np.random.default_rng(0))
    assert np.abs(noisy - counts).max() < 10


def test_calibration_is_memoised_per_arguments():
    """Sites calibrate every round with the same arguments; the search runs once per process."""
    from fedtune.common.privacy import accounting

    first = calibrate_noise(6.0, 1e-5, 0.03, 120)
    hits = accounting._calibrate.cache_info().hits
    assert calibrate_noise(6, 1e-5, 0.03, 120.0) == first
    assert accounting._calibrate.cache_info().hits == hits + 1
    misses = accounting._calibrate.cache_info().misses
    assert calibrate_noise(6.0, 1e-5, 0.03, 240) > first  # other arguments: searched anew
    assert accounting._calibrate.cache_info().misses == misses + 1
    assert epsilon_spent([(first, 0.03, 120)], 1e-5) <= 6.0
