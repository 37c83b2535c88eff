"""The server's part in site-level DP (``server.site_level_privacy``): the plan it sends, the SecAgg range
it widens for the sites' shares, uniform weights, the fallback noise it adds, and the epsilon it records."""

from __future__ import annotations

import numpy as np
import pytest

from fedtune.common.config import load_config, preset_path
from fedtune.common.privacy.site_level import site_level_epsilon
from fedtune.common.privacy.site_noise import masking_range_problem, noise_share_std
from fedtune.common.wire import SiteNoise, TrainPlan
from fedtune.server import site_level_privacy
from fedtune.server.federation import training_plan
from fedtune.server.report import summary_table
from fedtune.server.strategies.mean_delta import mean_delta

S, Z = 0.2, 1.5


def _cfg(noise: str = "distributed", enabled: bool = True):
    overrides = [
        f"privacy.site_level.enabled={str(enabled).lower()}",
        f"privacy.site_level.noise='{noise}'",
        f"privacy.site_level.clip_norm={S}",
        f"privacy.site_level.noise_multiplier={Z}",
    ]
    if noise == "server":
        overrides.append("secure_aggregation.enabled=false")
    return load_config(preset_path("banking77-minilm"), overrides)


def test_the_plan_tells_sites_what_site_level_dp_asks():
    plan = TrainPlan.from_record(training_plan(_cfg(), "run-1", 1, ""))
    assert (plan.site_noise, plan.site_clip_norm, plan.site_noise_multiplier) == (SiteNoise.DISTRIBUTED, S, Z)
    assert TrainPlan.from_record(training_plan(_cfg("server"), "run-1", 1, "")).site_noise is SiteNoise.SERVER
    off = TrainPlan.from_record(training_plan(_cfg(enabled=False), "run-1", 1, ""))
    assert (off.site_noise, off.site_clip_norm, off.site_noise_multiplier) == (SiteNoise.OFF, 0.0, 0.0)


def test_the_masking_range_is_widened_to_fit_every_honest_sites_share():
    cfg = _cfg()
    widened = site_level_privacy.masking_clip_range(cfg, 0.01)
    for floor in (2, 3, 10):  # a site with a higher floor adds a smaller share: the range fits it too
        assert masking_range_problem(widened, S, noise_share_std(Z, S, max(2, floor))) is None
    assert site_level_privacy.masking_clip_range(cfg, 50.0) == 50.0, "never narrowed"
    assert site_level_privacy.masking_clip_range(_cfg("server"), 0.01) == 0.01
    assert site_level_privacy.masking_clip_range(_cfg(enabled=False), 0.01) == 0.01


def test_site_level_dp_weighs_every_site_one():
    updates = [({"w": np.array([1.0])}, 100.0), ({"w": np.array([3.0])}, 300.0)]
    current = {"w": np.array([0.0])}
    assert mean_delta(site_level_privacy.uniform_weights(_cfg(), updates), current)["w"][0] == pytest.approx(2.0)
    example_weighted = site_level_privacy.uniform_weights(_cfg(enabled=False), updates)
    assert mean_delta(example_weighted, current)["w"][0] == pytest.approx(2.5)


def test_the_mean_has_a_fixed_denominator_and_server_noise_of_std_z_times_s_on_the_sum():
    """The preset has 3 sites; with q = 1 the denominator is 3 whoever contributed (McMahan et al. 2018)."""
    contributors, d = 2, 40_000
    mean = {"a": np.full(d // 2, 3.0), "b": np.full((100, d // 200), 3.0)}
    rng = np.random.default_rng(0)
    noised = site_level_privacy.site_level_mean(_cfg("server"), mean, contributors, 1.0, rng)
    expected = 3.0 * contributors / 3  # the sum of the 2 contributors' updates over the 3 sites expected
    noise_in_sum = (np.concatenate([v.ravel() for v in noised.values()]) - expected) * 3
    assert noise_in_sum.std() == pytest.approx(Z * S, rel=0.02)
    assert noised["b"].shape == (100, d // 200)
    # Distributed noise (the sites added it): only the fixed denominator; site-level DP off: unchanged.
    fixed = site_level_privacy.site_level_mean(_cfg(), {"m": np.ones(5)}, contributors, 1.0, rng)["m"]
    np.testing.assert_allclose(fixed, np.full(5, 2 / 3))
    off = site_level_privacy.site_level_mean(_cfg(enabled=False), {"m": np.ones(5)}, contributors, 1.0, rng)["m"]
    np.testing.assert_array_equal(off, np.ones(5))


def test_a_round_run_again_releases_the_same_server_noise_not_a_second_draw(tmp_path):
    from fedtune.server.site_sampling import round_generator, sampling_key

    key, mean = sampling_key(tmp_path), {"m": np.zeros(50)}
    first = site_level_privacy.site_level_mean(_cfg("server"), mean, 3, 1.0, round_generator(key, "server noise", 4))
    again = site_level_privacy.site_level_mean(_cfg("server"), mean, 3, 1.0, round_generator(key, "server noise", 4))
    other = site_level_privacy.site_level_mean(_cfg("server"), mean, 3, 1.0, round_generator(key, "server noise", 5))
    np.testing.assert_array_equal(first["m"], again["m"])
    assert not np.array_equal(first["m"], other["m"])


def test_each_round_records_the_site_level_epsilon_beside_its_delta():
    cfg = _cfg()
    records = [site_level_privacy.epsilon_record(cfg, r) for r in (1, 2, 3)]
    eps = [r["site-level-epsilon"] for r in records]
    assert eps == sorted(eps) and eps[0] == pytest.approx(site_level_epsilon(Z, 1, 1e-3))
    assert records[0]["site-level-delta"] == 1e-3 and records[0]["site-level-noise"] == "distributed"
    sampled = site_level_privacy.epsilon_record(cfg, 3, sampling_rate=0.5)
    assert sampled["site-level-epsilon"] < sampled["site-level-epsilon-without-sampling"] == eps[2]
    assert site_level_privacy.epsilon_record(_cfg(enabled=False), 3) == {}


def test_the_summary_shows_the_site_level_epsilon_only_when_it_is_on():
    from fedtune.common.tasks.registry import task_for

    task = task_for("classification")
    base = {"round": 1, "server": {"accuracy": 0.5, "loss": 1.0}, "train": {}, "status": "aggregated 3 sites"}
    with_site = summary_table([base | {"site-level-epsilon": 1.234}], task)
    assert "site eps" in with_site.splitlines()[0] and "1.234" in with_site.splitlines()[2]
    without = summary_table([base], task)
    assert "site eps" not in without
