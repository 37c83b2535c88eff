"""Which sites train in a round: sample sizes, uniformity, and the same sample on resume."""

from __future__ import annotations

import math
import re
from collections import Counter

import pytest

from fedtune.common.config import ConfigError, FederationConfig, load_config, preset_path
from fedtune.server.site_sampling import SiteSampling


def test_without_sampling_every_connected_site_trains():
    sampling = SiteSampling()
    assert not sampling.samples
    assert sampling.sample([9, 3, 7], "run", 1) == [3, 7, 9]


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
    assert len(sampling.sample(list(range(available)), "run", 1)) == size


def test_a_resumed_round_asks_the_same_sites_and_other_rounds_others():
    sampling = SiteSampling(count=3)
    nodes = [11, 22, 33, 44, 55]
    first = sampling.sample(nodes, "run-a", 4)
    assert sampling.sample(list(reversed(nodes)), "run-a", 4) == first
    assert len({tuple(sampling.sample(nodes, "run-a", r)) for r in range(1, 30)}) > 3
    assert set(first) <= set(nodes) and len(set(first)) == 3


def test_the_sample_is_uniform_over_sites():
    sampling = SiteSampling(count=3)
    nodes = list(range(5))
    rounds = 3000
    counts = Counter(n for r in range(rounds) for n in sampling.sample(nodes, "uniform", r))
    expected = rounds * 3 / 5
    # Each site is in a sample with probability 3/5: a 5-sigma band around the expectation.
    sigma = math.sqrt(rounds * 0.6 * 0.4)
    assert all(abs(counts[n] - expected) < 5 * sigma for n in nodes), counts


def test_node_ids_of_64_bits_come_back_exactly():
    nodes = [2**64 - 1, 2**63 + 12345, 5084798034784823296, 7]
    sample = SiteSampling(count=2).sample(nodes, "run", 1)
    assert set(sample) <= set(nodes) and all(type(n) is int for n in sample)


def test_sampling_rate_is_the_share_of_the_federation_asked_each_round():
    assert SiteSampling(count=3).rate(5) == pytest.approx(0.6)
    assert SiteSampling().rate(4) == 1.0


def test_from_config():
    fed = FederationConfig(sites_per_round=3, min_clients=2)
    assert SiteSampling.from_config(fed) == SiteSampling(count=3, fraction=1.0, minimum=2)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["federation.sites_per_round=3", "federation.fraction_per_round=0.5"], "set one of them"),
        (["federation.sites_per_round=9"], "federation.sites_per_round (9) exceeds partition.num_clients"),
        (["federation.sites_per_round=1", "federation.min_clients=2"], "below federation.min_clients"),
        (["federation.min_sites_to_start=9"], "federation.min_sites_to_start (9) exceeds"),
        (["simulation.late_joiners=3"], "must leave at least one"),
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
