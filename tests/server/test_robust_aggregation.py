"""Robust aggregation with secure aggregation off: the rules against hand-computed cases and Flower's
own functions, and a poisoned site that drags the mean far away but neither the trimmed mean nor Krum.

The poisoned update is finite, well shaped and (with ``train.max_update_norm = 0``) unbounded, so the
per-site checks let it through: only the rule stands between it and the global adapter."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from flwr.server.strategy.aggregate import aggregate_krum, aggregate_trimmed_avg
from scipy import stats

from fedtune.common.config import load_config, preset_path
from fedtune.server.federation import FederationServer, RoundReplies
from fedtune.server.robust_aggregation import (
    RobustSettings,
    TooFewUpdates,
    krum_scores,
    krum_selection,
    robust_delta,
    trimmed_mean,
)
from fedtune.server.site_sampling import SiteSampling
from fedtune.server.strategies import build_strategy
from fedtune.server.strategies.mean_delta import mean_delta


def _updates(*values: list[float], current: float = 0.0) -> list[tuple[dict[str, np.ndarray], float]]:
    """One site per row of ``values``, a tensor ``w`` each, offset by ``current`` (so deltas are ``values``)."""
    return [({"w": np.asarray(v, dtype=np.float32) + current}, 100.0) for v in values]


def test_trimmed_mean_drops_the_extremes_of_each_coordinate():
    # Coordinate 0: drop 1 and 100, mean of 2, 3, 4; coordinate 1: drop -50 and 3, mean of 0, 1, 2.
    updates = _updates([1, -50], [2, 0], [3, 1], [4, 2], [100, 3], current=5.0)
    result = robust_delta(updates, {"w": np.full(2, 5.0)}, "trimmed_mean", RobustSettings(trim_fraction=0.2))
    np.testing.assert_allclose(result.delta["w"], [3.0, 1.0])
    assert result.description == "trimmed mean, 1 trimmed each side" and result.selected == ()


def test_trimmed_mean_is_flowers_and_scipys():
    rng = np.random.default_rng(0)
    stacked = rng.normal(size=(7, 3, 4))
    ours = trimmed_mean(stacked, 0.3)
    np.testing.assert_allclose(ours, stats.trim_mean(stacked, 0.3, axis=0))
    np.testing.assert_allclose(ours, aggregate_trimmed_avg([([s], 1) for s in stacked], 0.3)[0])


def test_a_trimmed_mean_that_trims_nothing_is_refused():
    with pytest.raises(TooFewUpdates, match=r"of 4 updates with federation.trim_fraction = 0.2 trims none"):
        trimmed_mean(np.zeros((4, 2)), 0.2)


def test_krum_scores_by_the_nearest_n_minus_f_minus_2_and_picks_the_lowest():
    # Points 0, 1, 2, 3, 50 with f = 1: each is scored by its 2 nearest others (squared distances).
    flat = np.asarray([[0.0], [1.0], [2.0], [3.0], [50.0]])
    np.testing.assert_allclose(krum_scores(flat, 1), [1 + 4, 1 + 1, 1 + 1, 1 + 4, 47**2 + 48**2])
    assert krum_selection(flat, 1, 1) == (1,)  # the tie between 1 and 2 goes to the lower index
    assert krum_selection(flat, 1, 3) == (1, 2, 0)
    assert krum_selection(flat, 1, 9) == (1, 2, 0, 3)  # at most n - f


def test_krum_chooses_by_all_tensors_together_and_averages_the_chosen():
    # Over "a" alone site 2 would be an outlier; the distance over "a" and "b" together picks site 1.
    current = {"a": np.zeros(1), "b": np.zeros(2)}
    updates = [
        ({"a": np.array([0.0]), "b": np.array([0.0, 0.0])}, 10.0),
        ({"a": np.array([0.1]), "b": np.array([0.1, 0.0])}, 10.0),
        ({"a": np.array([0.3]), "b": np.array([0.0, 0.0])}, 10.0),
        ({"a": np.array([0.0]), "b": np.array([0.0, 0.3])}, 10.0),
        ({"a": np.array([9.0]), "b": np.array([9.0, 9.0])}, 1e9),  # a claimed example count changes nothing
    ]
    krum = robust_delta(updates, current, "krum", RobustSettings(byzantine=1, select=1))
    assert krum.selected == (1,) and krum.description == "Krum, f = 1"
    np.testing.assert_allclose(krum.delta["a"], [0.1])
    np.testing.assert_allclose(krum.delta["b"], [0.1, 0.0])
    multi = robust_delta(updates, current, "krum", RobustSettings(byzantine=1, select=2))
    assert multi.selected == (1, 0) and multi.description == "multi-Krum, 2 selected, f = 1"
    np.testing.assert_allclose(multi.delta["a"], [0.05])  # unweighted mean of the chosen two
    np.testing.assert_allclose(multi.delta["b"], [0.05, 0.0])


@pytest.mark.parametrize("select", [1, 3])
def test_krum_is_flowers_krum(select):
    rng = np.random.default_rng(select)
    deltas = [rng.normal(size=6) for _ in range(7)]
    deltas[4] = deltas[4] + 30.0
    ours = robust_delta(
        [({"w": d}, 1.0) for d in deltas], {"w": np.zeros(6)}, "krum", RobustSettings(byzantine=2, select=select)
    )
    flower = aggregate_krum([([d], 1) for d in deltas], num_malicious=2, to_keep=0 if select == 1 else select)
    np.testing.assert_allclose(ours.delta["w"], flower[0])
    assert 4 not in ours.selected


def test_krum_refuses_too_few_updates():
    with pytest.raises(TooFewUpdates, match="federation.krum_byzantine = 1 needs more than 4 updates, got 4"):
        robust_delta(_updates([0], [1], [2], [3]), {"w": np.zeros(1)}, "krum", RobustSettings(byzantine=1))


def test_robust_delta_refuses_what_mean_delta_refuses():
    current = {"w": np.zeros(2)}
    settings = RobustSettings(trim_fraction=0.2)
    with pytest.raises(ValueError, match="NaN or infinity"):
        robust_delta(_updates([0, 0], [0, 0], [0, 0], [0, 0], [np.nan, 0]), current, "trimmed_mean", settings)
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        robust_delta(_updates([0, 0], [0, 0], [0, 0], [0, 0], [0, 0, 0]), current, "trimmed_mean", settings)


# --- A poisoned site, through the server's plain aggregation -------------------------------------------------

DIM = 64
HONEST = {f"site-{c}": c for c in "abcd"}


class StubModel:
    """Stands in for ``server.global_model.GlobalModel``: one tensor, zero to start."""

    def __init__(self) -> None:
        self.adapter = {"w": np.zeros(DIM, dtype=np.float32)}
        self.updates = 0

    def state(self) -> dict[str, np.ndarray]:
        return {k: v.copy() for k, v in self.adapter.items()}

    def update(self, state: dict[str, np.ndarray]) -> None:
        self.adapter, self.updates = dict(state), self.updates + 1


def _server(rule: str, sites: int = 5) -> FederationServer:
    cfg = load_config(
        preset_path("banking77-minilm"),
        [
            "train.max_update_norm=0",  # no norm bound: the per-site check lets the poisoned update through
            "secure_aggregation.enabled=false",
            f"partition.num_clients={sites}",
            f"federation.aggregation_rule='{rule}'",
        ],
    )
    server = FederationServer.__new__(FederationServer)
    server.cfg, server.model, server.prepared, server.site_names = cfg, StubModel(), None, {}
    server.strategy = build_strategy(cfg.federation)
    server.sampling, server.sampling_key = SiteSampling.from_config(cfg.federation), b"k" * 32
    return server


def _honest_updates() -> dict[str, np.ndarray]:
    """Four honest sites: the same direction (0.01 a coordinate) plus a little noise each."""
    rng = np.random.default_rng(17)
    return {site: (0.01 + 0.001 * rng.standard_normal(DIM)).astype(np.float32) for site in HONEST}


def _round(server: FederationServer, updates: dict[str, np.ndarray]) -> str:
    got = RoundReplies()
    for site, w in updates.items():
        got.updates[site] = ({"w": w}, 100.0)
        got.train[site] = {"epsilon": 0.5}
    server._reject_bad_updates(got, server.model.state(), 1)
    assert not got.failed, "the poisoned update must pass the per-site checks: only the rule can stop it"
    return server._aggregate_plainly(got, server.model.state(), 1)


def _poisoned_round(rule: str) -> tuple[str, float, float]:
    """The round's status, and how far the applied adapter lies from the honest sites' mean and from zero."""
    honest = _honest_updates()
    server = _server(rule)
    poison = np.full(DIM, 1e3, dtype=np.float32)  # huge, but finite and of the right shape
    status = _round(server, {**honest, "site-x": poison})
    honest_mean = np.mean(list(honest.values()), axis=0)
    applied = server.model.adapter["w"]
    return status, float(np.linalg.norm(applied - honest_mean)), float(np.linalg.norm(honest_mean))


def test_a_poisoned_site_drags_the_plain_mean_far_away():
    status, off, scale = _poisoned_round("mean")
    assert status == "aggregated 5 sites"
    assert off > 1000 * scale  # the attack works against the mean: the adapter follows the poisoned site


@pytest.mark.parametrize(
    ("rule", "status"),
    [
        ("trimmed_mean", "aggregated 5 sites (trimmed mean, 1 trimmed each side)"),
        ("krum", "aggregated 5 sites (Krum, f = 1; selected site-"),
    ],
)
def test_trimmed_mean_and_krum_stay_near_the_honest_mean(rule, status, caplog):
    with caplog.at_level(logging.INFO, logger="fedtune.server"):
        got, off, scale = _poisoned_round(rule)
    assert got.startswith(status) and "site-x" not in got
    assert off < 0.2 * scale  # within the honest sites' spread (noise 0.001 a coordinate, mean 0.01)
    if rule == "krum":
        assert "Krum, f = 1 selected site-" in caplog.text


def test_a_round_with_too_few_updates_for_krum_is_skipped_and_the_adapter_kept(caplog):
    server = _server("krum")
    with caplog.at_level(logging.ERROR, logger="fedtune.server"):
        status = _round(server, _honest_updates())  # 4 updates; Krum with f = 1 needs 5
    assert status == "skipped: Krum with federation.krum_byzantine = 1 needs more than 4 updates, got 4"
    assert server.model.updates == 0 and "the global adapter is unchanged" in caplog.text


def test_the_mean_rule_is_unchanged():
    honest = _honest_updates()
    server = _server("mean")
    assert _round(server, honest) == "aggregated 4 sites"
    expected = mean_delta([({"w": w}, 100.0) for w in honest.values()], {"w": np.zeros(DIM)})["w"]
    np.testing.assert_allclose(server.model.adapter["w"], expected, rtol=1e-5)
