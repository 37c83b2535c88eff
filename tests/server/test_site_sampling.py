"""Which sites train in a round: sample sizes, uniformity, and the same sample on resume."""

from __future__ import annotations

import math
import re
from collections import Counter

import numpy as np
import pytest

from fedtune.common.config import ConfigError, FederationConfig, load_config, preset_path
from fedtune.server.site_sampling import SAMPLING_KEY_FILE, SiteSampling, round_generator, sampling_key

KEY, KEY_A = b"k" * 32, b"a" * 32


def test_without_sampling_every_connected_site_trains():
    sampling = SiteSampling()
    assert not sampling.samples
    assert sampling.sample([9, 3, 7], KEY, 1) == [3, 7, 9]


@pytest.mark.parametrize(
    ("sampling", "available", "size"),
    [
        (SiteSampling(count=3), 5, 3),
        (SiteSampling(count=3), 2, 2),  # fewer connected than wanted: all of them
        (SiteSampling(fraction=0.5), 5, 3),  # rounded up
        (SiteSampling(fraction=0.3), 10, 3),
        (SiteSampling(fraction=0.1, minimum=2), 5, 2),  # never below min_clients
        (SiteSampling(count=1, minimum=2), 5, 2),
    ],
)
def test_sample_size(sampling, available, size):
    assert sampling.size(available) == size
    assert len(sampling.sample(list(range(available)), KEY, 1)) == size


def test_a_resumed_round_draws_the_same_positions_and_other_rounds_others():
    sampling = SiteSampling(count=3)
    nodes = [11, 22, 33, 44, 55]
    first = sampling.sample(nodes, KEY_A, 4)
    assert sampling.sample(list(reversed(nodes)), KEY_A, 4) == first
    assert len({tuple(sampling.sample(nodes, KEY_A, r)) for r in range(1, 30)}) > 3
    assert set(first) <= set(nodes) and len(set(first)) == 3


def test_the_sample_is_uniform_over_sites():
    sampling = SiteSampling(count=3)
    nodes = list(range(5))
    rounds = 3000
    counts = Counter(n for r in range(rounds) for n in sampling.sample(nodes, KEY, r))
    expected = rounds * 3 / 5
    # Each site is in a sample with probability 3/5: a 5-sigma band around the expectation.
    sigma = math.sqrt(rounds * 0.6 * 0.4)
    assert all(abs(counts[n] - expected) < 5 * sigma for n in nodes), counts


def test_node_ids_of_64_bits_come_back_exactly():
    nodes = [2**64 - 1, 2**63 + 12345, 5084798034784823296, 7]
    sample = SiteSampling(count=2).sample(nodes, KEY, 1)
    assert set(sample) <= set(nodes) and all(type(n) is int for n in sample)


def test_sampling_rate_is_the_share_of_the_federation_asked_each_round():
    assert SiteSampling(count=3).rate(5) == pytest.approx(0.6)
    assert SiteSampling().rate(4) == 1.0
    assert SiteSampling(fraction=0.3, poisson=True).rate(10) == 0.3


def test_the_accountant_gets_a_sampling_rate_only_from_poisson_sampling():
    assert SiteSampling(fraction=0.3, poisson=True).accountant_rate == 0.3
    assert SiteSampling(count=3).accountant_rate == 1.0
    assert SiteSampling(fraction=0.5).accountant_rate == 1.0


def test_poisson_sampling_asks_each_site_independently_and_never_tops_up():
    sampling = SiteSampling(fraction=0.3, minimum=2, poisson=True)
    nodes = list(range(10))
    sizes = [len(sampling.sample(nodes, KEY, r)) for r in range(2000)]
    assert min(sizes) < 2 < max(sizes)  # a round may fall below min_clients: it is skipped, not topped up
    assert np.mean(sizes) == pytest.approx(3.0, abs=0.15)
    counts = Counter(n for r in range(2000) for n in sampling.sample(nodes, KEY, r))
    assert all(abs(counts[n] - 600) < 5 * math.sqrt(2000 * 0.21) for n in nodes), counts


def test_the_sample_comes_from_the_servers_secret_which_stays_in_its_run_directory(tmp_path):
    key = sampling_key(tmp_path)
    assert (tmp_path / SAMPLING_KEY_FILE).exists() and len(key) == 32
    assert sampling_key(tmp_path) == key  # read again on resume
    assert sampling_key(tmp_path / "other") != key
    nodes = list(range(20))
    sampling = SiteSampling(count=5)
    assert [sampling.sample(nodes, key, r) for r in range(1, 6)] != [
        sampling.sample(nodes, KEY, r) for r in range(1, 6)
    ]
    # Purposes and rounds draw apart.
    assert round_generator(key, "site sample", 1).random() != round_generator(key, "server noise", 1).random()


def test_from_config():
    fed = FederationConfig(sites_per_round=3, min_clients=2)
    assert SiteSampling.from_config(fed) == SiteSampling(count=3, fraction=1.0, minimum=2)
    fed = FederationConfig(fraction_per_round=0.4, poisson_sampling=True)
    assert SiteSampling.from_config(fed) == SiteSampling(fraction=0.4, poisson=True)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["federation.sites_per_round=3", "federation.fraction_per_round=0.5"], "set one of them"),
        (["federation.sites_per_round=9"], "federation.sites_per_round (9) exceeds partition.num_clients"),
        (["federation.sites_per_round=1", "federation.min_clients=2"], "asks 1 sites a round, fewer than the 2"),
        (["federation.min_sites_to_start=9"], "federation.min_sites_to_start (9) exceeds"),
        (["simulation.late_joiners=3"], "must leave at least one"),
        (["federation.poisson_sampling=true"], "set fraction_per_round below 1"),
        (
            ["federation.fraction_per_round=0.5", "federation.min_clients=2"],
            "asks 1.5 sites a round, fewer than the 2 every round needs",
        ),
        (
            ["partition.num_clients=6", "federation.sites_per_round=3", "privacy.site_level.enabled=true"],
            "privacy.site_level with a fixed-size sample of sites",
        ),
        (["simulation.late_joiners=1"], "set federation.min_sites_to_start to 2 or fewer"),
        (
            ["simulation.late_joiners=1", "simulation.slow_sites=3", "federation.min_sites_to_start=2"],
            "simulation.late_joiners (1) + simulation.slow_sites (3) exceed partition.num_clients (3)",
        ),
    ],
)
def test_sampling_and_what_if_settings_are_checked_against_the_federation(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(preset_path("banking77-minilm"), ["partition.num_clients=3", *overrides])


def test_krum_counts_the_sites_sampled_a_round_not_the_federation():
    base = ["partition.num_clients=6", "secure_aggregation.enabled=false", "federation.aggregation_rule='krum'"]
    load_config(preset_path("banking77-minilm"), base)  # 6 > 2f + 2 = 4
    with pytest.raises(ConfigError, match=re.escape("only 4 sites are sampled")):
        load_config(preset_path("banking77-minilm"), [*base, "federation.sites_per_round=4"])
