"""The server checks the mean it applies (after unmasking, or in the clear) and, with secure
aggregation off, each site's update: a poisoned sum is discarded with the round's status saying
so and the global adapter kept; a site with a NaN, misshapen or oversized update is dropped from
the round by name. Each defence is shown necessary: with the bound off the same round is applied."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from fedtune.client import secure_aggregation
from fedtune.common.config import load_config, preset_path
from fedtune.common.secure_aggregation.records import round_tag
from fedtune.server.federation import DISCARDED, FederationServer, RoundReplies
from fedtune.server.secure_rounds import set_up_round
from fedtune.server.site_sampling import SiteSampling
from fedtune.server.strategies import build_strategy
from tests.secure_sites import CLIP, DIM, NODES, SETTINGS, Sites, random_updates

TAG = round_tag("run", 1)
BOUND = 0.2  # random_updates: coordinates within +-CLIP/4, norm ~ 0.16 at most


class StubModel:
    """Stands in for ``server.global_model.GlobalModel``: one tensor, zero to start."""

    def __init__(self):
        self.adapter = {"w": np.zeros(DIM, dtype=np.float32)}
        self.updates = 0

    def state(self):
        return {k: v.copy() for k, v in self.adapter.items()}

    def update(self, state):
        self.adapter, self.updates = dict(state), self.updates + 1


def _server(max_update_norm: float, secure: bool = True) -> FederationServer:
    cfg = load_config(
        preset_path("banking77-minilm"),
        [f"train.max_update_norm={max_update_norm}", f"secure_aggregation.enabled={str(secure).lower()}"],
    )
    server = FederationServer.__new__(FederationServer)
    server.cfg, server.model, server.prepared, server.site_names = cfg, StubModel(), None, {}
    server.strategy = build_strategy(cfg.federation)
    server.sampling, server.sampling_key = SiteSampling.from_config(cfg.federation), b"k" * 32
    return server


def _secure_round(server: FederationServer, tmp_path, updates: dict[int, np.ndarray]):
    sites = Sites(tmp_path)
    exchange = sites.exchange()
    prepared = set_up_round(exchange, TAG, NODES, SETTINGS)
    got = RoundReplies()
    for n in NODES:
        vector = secure_aggregation.mask_update(
            sites.contexts[n], TAG, prepared.inboxes[n], updates[n], f"site-{n}", sites.masked_for(n)
        )
        got.masked[n] = (f"site-{n}", vector)
    return server._aggregate_securely(exchange, prepared, got, server.model.state(), 1, SETTINGS, None)


pytestmark = pytest.mark.usefixtures("server_identity")


def poisoned(updates: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    """One site skipped its own check: every coordinate at the clip range (norm CLIP * sqrt(DIM) ~ 1.1)."""
    return {**updates, 13: np.full(DIM, CLIP, dtype=np.float32)}


@pytest.mark.parametrize("bound", [0.0, BOUND])
def test_an_honest_secure_round_is_applied(tmp_path, bound):
    server = _server(bound)
    status, summary = _secure_round(server, tmp_path, random_updates())
    assert status == "aggregated 3 sites securely" and "discarded" not in summary
    assert server.model.updates == 1


def test_a_poisoned_sum_is_discarded_after_unmasking_and_the_adapter_kept(tmp_path, caplog):
    server = _server(BOUND)
    with caplog.at_level(logging.ERROR, logger="fedtune.server"):
        status, summary = _secure_round(server, tmp_path, poisoned(random_updates()))
    assert status.startswith(f"{DISCARDED}: the unmasked mean update of 3 sites its L2 norm")
    assert "exceeds train.max_update_norm = 0.2" in status and status.endswith("the global adapter is unchanged")
    assert summary["discarded"] in status and summary["survivors"] == ["site-11", "site-12", "site-13"]
    assert server.model.updates == 0 and not server.model.adapter["w"].any()
    assert "round 1 discarded" in caplog.text


def test_without_the_bound_the_poisoned_sum_would_have_been_applied(tmp_path):
    server = _server(0.0)
    status, _ = _secure_round(server, tmp_path, poisoned(random_updates()))
    assert status == "aggregated 3 sites securely" and server.model.updates == 1
    assert np.linalg.norm(server.model.adapter["w"]) > BOUND


def _plain(updates: dict[str, np.ndarray]) -> RoundReplies:
    got = RoundReplies()
    for site, w in updates.items():
        got.updates[site] = ({"w": w}, 100.0)
        got.train[site] = {"epsilon": 0.5}
    return got


def test_with_secure_aggregation_off_a_bad_site_is_dropped_by_name_and_the_rest_aggregated(caplog):
    server = _server(BOUND, secure=False)
    good = random_updates()
    got = _plain(
        {
            "site-a": good[11],
            "site-b": good[12],
            "site-nan": np.where(np.arange(DIM) == 0, np.nan, 0.0).astype(np.float32),
            "site-shape": np.zeros(DIM + 1, dtype=np.float32),
            "site-big": np.full(DIM, CLIP, dtype=np.float32),
        }
    )
    with caplog.at_level(logging.ERROR, logger="fedtune.server"):
        server._reject_bad_updates(got, server.model.state(), 1)
    assert sorted(got.updates) == ["site-a", "site-b"] and sorted(got.train) == ["site-a", "site-b"]
    assert "NaN" in got.failed["site-nan"] and got.failed["site-nan"].startswith("update rejected: ")
    assert "shape (501,)" in got.failed["site-shape"]
    assert "exceeds train.max_update_norm = 0.2" in got.failed["site-big"]
    assert "site-big's update rejected" in caplog.text
    assert server._aggregate_plainly(got, server.model.state(), 1) == "aggregated 2 sites"
    np.testing.assert_allclose(server.model.adapter["w"], (good[11] + good[12]) / 2, rtol=1e-5, atol=1e-9)


def test_without_the_per_site_check_the_outlier_would_have_entered_the_mean():
    server = _server(0.0, secure=False)
    got = _plain({"site-a": np.zeros(DIM, dtype=np.float32), "site-big": np.full(DIM, CLIP, dtype=np.float32)})
    server._reject_bad_updates(got, server.model.state(), 1)
    assert sorted(got.updates) == ["site-a", "site-big"] and not got.failed
    assert server._aggregate_plainly(got, server.model.state(), 1) == "aggregated 2 sites"
    assert server.model.adapter["w"][0] == pytest.approx(CLIP / 2)


def test_a_plain_mean_above_the_bound_is_discarded():
    server = _server(BOUND, secure=False)
    # Each site within the bound (norm 0.18), but bypassing the per-site step shows the mean check on its own.
    w = np.full(DIM, 0.008, dtype=np.float32)
    got = _plain({"site-a": w, "site-b": w})
    got.updates["site-b"] = ({"w": w * 3}, 100.0)  # norm 0.54: over the bound; the mean, 0.36, too
    status = server._aggregate_plainly(got, server.model.state(), 1)
    assert status.startswith(f"{DISCARDED}: the mean update of 2 sites its L2 norm") and server.model.updates == 0
