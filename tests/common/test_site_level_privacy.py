"""Site-level DP maths (``common.privacy.site_level`` and ``site_noise``): the accountant is Opacus'
RDP accountant over rounds, bracketed by the exact and the classical bounds for the Gaussian mechanism;
clipping bounds a site's influence; the noise shares of m sites add up to std z * S."""

from __future__ import annotations

import math

import numpy as np
import pytest
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from fedtune.common.config import ConfigError, config_from_dict
from fedtune.common.privacy.site_level import site_level_epsilon, site_level_epsilons, site_level_noise_multiplier
from fedtune.common.privacy.site_noise import (
    NOISE_HEADROOM,
    add_noise,
    clip_update,
    masking_range,
    masking_range_problem,
    noise_share_std,
    sites_in_every_revealed_sum,
)
from tests.conftest import SAMPLES

DELTA = 1e-3


# --- the accountant ---------------------------------------------------------------------------


@pytest.mark.parametrize(("z", "q", "rounds"), [(1.0, 1.0, 10), (0.8, 0.3, 50), (2.5, 0.05, 200)])
def test_epsilon_is_opacus_rdp_over_one_step_a_round(z, q, rounds):
    acc = RDPAccountant()
    for _ in range(rounds):
        acc.step(noise_multiplier=z, sample_rate=q)
    assert site_level_epsilon(z, rounds, DELTA, q) == pytest.approx(acc.get_epsilon(delta=DELTA), rel=1e-12)
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    direct, _ = get_privacy_spent(
        orders=orders, rdp=compute_rdp(q=q, noise_multiplier=z, steps=rounds, orders=orders), delta=DELTA
    )
    assert site_level_epsilon(z, rounds, DELTA, q) == pytest.approx(direct, rel=1e-9)


def _phi(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2))


def _exact_gaussian_delta(epsilon: float, z: float) -> float:
    """delta(epsilon) of one Gaussian mechanism with sensitivity 1 and std z (Balle & Wang, ICML 2018, Thm 8)."""
    return _phi(1 / (2 * z) - epsilon * z) - math.exp(epsilon) * _phi(-1 / (2 * z) - epsilon * z)


def test_one_unsampled_round_is_bracketed_by_the_exact_and_the_classical_gaussian_bounds():
    z = 1.0
    eps = site_level_epsilon(z, 1, DELTA)
    # No valid accountant beats the exact curve: at its epsilon the exact delta is at most DELTA.
    assert _exact_gaussian_delta(eps, z) <= DELTA
    # ... and it is close: the exact epsilon (3.14 here) is within 15 % of it.
    assert _exact_gaussian_delta(eps / 1.15, z) > DELTA
    # ... and it is no worse than the classical RDP-to-DP conversion: min over a of a/(2 z^2) + log(1/d)/(a-1).
    classical = min(a / (2 * z * z) + math.log(1 / DELTA) / (a - 1) for a in np.linspace(1.01, 64, 20000))
    assert eps <= classical


def test_epsilon_grows_with_rounds_and_shrinks_with_noise_and_sampling():
    by_rounds = [site_level_epsilon(1.0, t, DELTA) for t in (1, 2, 5, 10, 50)]
    assert by_rounds == sorted(by_rounds) and len(set(by_rounds)) == len(by_rounds)
    by_noise = [site_level_epsilon(z, 10, DELTA) for z in (0.5, 1.0, 2.0, 4.0)]
    assert by_noise == sorted(by_noise, reverse=True)
    by_rate = [site_level_epsilon(1.0, 10, DELTA, q) for q in (0.1, 0.3, 0.7, 1.0)]
    assert by_rate == sorted(by_rate)


def test_edge_cases_say_what_they_mean():
    assert site_level_epsilon(1.0, 0, DELTA) == 0.0
    assert site_level_epsilon(0.0, 3, DELTA) == math.inf, "clipping without noise hides nothing"
    with pytest.raises(ValueError, match="sampling rate"):
        site_level_epsilon(1.0, 3, DELTA, 0.0)


def test_the_report_gives_epsilon_with_and_without_trusting_the_sampling():
    sampled = site_level_epsilons(1.0, 20, DELTA, 0.25)
    assert sampled.epsilon < sampled.epsilon_without_sampling == site_level_epsilon(1.0, 20, DELTA, 1.0)
    record = sampled.record()
    assert record["site-level-epsilon"] == sampled.epsilon and record["site-level-delta"] == DELTA
    unsampled = site_level_epsilons(1.0, 20, DELTA)
    assert unsampled.epsilon == unsampled.epsilon_without_sampling


def test_calibration_finds_the_smallest_noise_within_the_target():
    z = site_level_noise_multiplier(4.0, 30, DELTA)
    assert 3.9 <= site_level_epsilon(z, 30, DELTA) <= 4.0
    assert site_level_epsilon(z * 0.97, 30, DELTA) > 4.0


# --- clipping and noise -----------------------------------------------------------------------


def test_clipping_bounds_the_norm_keeps_the_direction_and_leaves_small_updates_alone():
    rng = np.random.default_rng(0)
    big = rng.normal(size=1000) * 3
    clipped, before = clip_update(big, 1.5)
    assert before == pytest.approx(np.linalg.norm(big))
    assert np.linalg.norm(clipped) == pytest.approx(1.5, rel=1e-12)
    assert np.dot(clipped, big) / (np.linalg.norm(clipped) * np.linalg.norm(big)) == pytest.approx(1.0, abs=1e-12)
    small = big / np.linalg.norm(big) * 0.7
    kept, _ = clip_update(small, 1.5)
    np.testing.assert_array_equal(kept, small)  # never scaled up
    with pytest.raises(ValueError, match="NaN or infinity"):
        clip_update(np.array([1.0, np.nan]), 1.0)


def test_a_share_has_the_planned_std_and_m_shares_add_up_to_z_times_s():
    z, s, m, d = 1.3, 0.2, 4, 50_000
    std = noise_share_std(z, s, m)
    assert std == pytest.approx(z * s / 2)
    rng = np.random.default_rng(1)
    one = add_noise(np.zeros(d), std, rng)
    assert one.std() == pytest.approx(std, rel=0.02) and abs(one.mean()) < 4 * std / math.sqrt(d)
    total = sum(add_noise(np.zeros(d), std, rng) for _ in range(m))
    assert total.std() == pytest.approx(z * s, rel=0.02)
    np.testing.assert_array_equal(add_noise(np.ones(3), 0.0), np.ones(3))


def test_without_an_rng_the_noise_is_fresh_every_time():
    a, b = add_noise(np.zeros(100), 1.0), add_noise(np.zeros(100), 1.0)
    assert not np.array_equal(a, b)


def test_the_share_is_sized_by_the_sites_own_floor_only():
    assert sites_in_every_revealed_sum(2) == 2
    assert sites_in_every_revealed_sum(5) == 5
    assert sites_in_every_revealed_sum(0) == 2, "never below 2"


def test_the_masking_range_fits_a_clipped_noised_update():
    s, std = 0.5, 0.1
    assert masking_range(s, std) == pytest.approx(s + NOISE_HEADROOM * std)
    assert masking_range_problem(masking_range(s, std), s, std) is None
    problem = masking_range_problem(s, s, std)
    assert problem is not None and "secure_aggregation.clip_range" in problem and "would clip" in problem


# --- configuration ----------------------------------------------------------------------------


def _config(**site_level) -> dict:
    return {
        "model": {"name": "tiny-llama"},
        "data": {"task": "question-answer", "path": str(SAMPLES / "medquad" / "medquad_sample.jsonl")},
        "partition": {"num_clients": 4},
        "privacy": {"site_level": {"enabled": True, **site_level}},
    }


def test_distributed_noise_needs_secure_aggregation_and_says_what_to_do():
    raw = _config()
    raw["secure_aggregation"] = {"enabled": False}
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw, "c.toml", SAMPLES)
    message = str(err.value)
    assert "privacy.site_level.noise" in message and "secure_aggregation.enabled" in message
    assert 'noise = "server"' in message
    cfg = config_from_dict({**raw, "privacy": {"site_level": {"enabled": True, "noise": "server"}}}, "c", SAMPLES)
    assert cfg.privacy.site_level.noise == "server"


def test_site_level_delta_must_be_below_one_over_the_number_of_sites():
    with pytest.raises(ConfigError, match=r"privacy.site_level.delta = 0.3 is not below 1 / partition.num_clients"):
        config_from_dict(_config(delta=0.3), "c.toml", SAMPLES)
    assert config_from_dict(_config(), "c.toml", SAMPLES).privacy.site_level.delta == 1e-3


def test_site_level_dp_needs_the_plain_mean():
    raw = _config(noise="server")
    raw["secure_aggregation"] = {"enabled": False}
    raw["federation"] = {"aggregation_rule": "trimmed_mean"}
    with pytest.raises(ConfigError, match="privacy.site_level needs federation.aggregation_rule = 'mean'"):
        config_from_dict(raw, "c.toml", SAMPLES)


def test_site_level_dp_is_off_by_default_and_every_field_is_described():
    from fedtune.common.config import SiteLevelPrivacyConfig

    raw = _config()
    del raw["privacy"]
    assert not config_from_dict(raw, "c.toml", SAMPLES).privacy.site_level.enabled
    assert all(f.description for f in SiteLevelPrivacyConfig.model_fields.values())
