"""A site's part in site-level DP (``client.site_level``), alone and through the real SecAgg+ handlers:
each update is clipped, weighted 1 and noised before masking, so the unmasked mean is the uniform
mean of the clipped updates plus noise of std z * S on the sum, whatever minimum the server states."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import Context, Message, MessageType, RecordDict

from fedtune.client import secure_aggregation
from fedtune.client.app import build_client_app
from fedtune.client.policy import PolicyViolation, SitePolicy
from fedtune.client.revealed_rounds import MaskedRounds, RevealedRounds
from fedtune.client.site import SiteRefusal
from fedtune.client.site_level import adapter_with_update, protect_update, share_std_for_round
from fedtune.common.secure_aggregation.protocol import ClientRound, ProtocolViolation, RoundParameters
from fedtune.common.wire import (
    ADAPTER,
    PLAN,
    SiteNoise,
    SiteState,
    SiteStatus,
    flatten_adapter,
    from_array_record,
    to_array_record,
)
from fedtune.server.secure_rounds import finish_round, set_up_round
from tests import secure_sites
from tests.plans import train_plan
from tests.secure_sites import NODES, SETTINGS, Sites, random_updates

S, Z = 0.01, 0.5  # fits SETTINGS.clip_range = 0.05 with the noise headroom of 2 sites' shares


def _plan(noise: SiteNoise = SiteNoise.DISTRIBUTED, z: float = Z, **changes):
    fields = {"site_noise": noise, "site_clip_norm": S, "site_noise_multiplier": z, "secure_aggregation": True}
    return train_plan(**{**fields, **changes})


def _params(min_survivors: int = 2, clip_range: float = 1.0, participants: int = 3, total: int = 3):
    neighbours = {j: (bytes([j]) * 32, bytes([j + 100]) * 32) for j in (2, 3)}
    return RoundParameters(b"tag", 1, neighbours, 2, min_survivors, clip_range, participants, total)


def _big(seed: int = 0, d: int = 20_000) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=d) * 0.1  # norm about 14, far above S


# --- the site's decision, alone ----------------------------------------------------------------


def test_with_site_level_dp_off_the_update_leaves_untouched():
    update = _big()
    assert protect_update(update, train_plan(), _params(), 2, "north") is update


def test_server_noise_clips_only():
    update = _big()
    sent = protect_update(update, _plan(SiteNoise.SERVER, secure_aggregation=False), None, 2, "north")
    np.testing.assert_allclose(sent, update * S / np.linalg.norm(update), rtol=1e-12)


def test_a_distributed_share_is_sized_by_the_sites_unmasking_floor():
    update, rng = _big(), np.random.default_rng(3)
    sent = protect_update(update, _plan(), _params(min_survivors=2), 4, "north", rng)
    clipped = update * S / np.linalg.norm(update)
    noise = sent - clipped
    assert noise.std() == pytest.approx(Z * S / math.sqrt(4), rel=0.03), "site floor 4 > the server's 2"
    assert share_std_for_round(_plan(), _params(min_survivors=9), 4) == pytest.approx(Z * S / 3)


def test_a_round_that_cannot_protect_the_site_is_refused_before_anything_is_sent():
    update = _big()
    with pytest.raises(SiteRefusal, match="distributed noise needs secure aggregation"):
        protect_update(update, _plan(secure_aggregation=False), None, 2, "north")
    with pytest.raises(SiteRefusal, match="weighs every site 1, but the round's total weight is 750 over 3 sites"):
        protect_update(update, _plan(), _params(total=750), 2, "north")
    with pytest.raises(SiteRefusal, match="clip_range = 0.01 would clip the noised update"):
        protect_update(update, _plan(), _params(clip_range=S), 2, "north")


def test_an_adapter_in_the_clear_is_the_global_one_plus_the_clipped_update():
    global_adapter = {"b": np.ones((2, 3), np.float32), "a": np.zeros(4, np.float32)}
    update = np.arange(10, dtype=np.float64) / 100
    sent = adapter_with_update(global_adapter, update)
    assert {k: v.shape for k, v in sent.items()} == {"a": (4,), "b": (2, 3)}
    np.testing.assert_allclose(flatten_adapter(sent) - flatten_adapter(global_adapter), update, atol=1e-7)


def test_a_policy_floor_refuses_weaker_or_server_added_noise():
    policy = SitePolicy(min_site_noise_multiplier=1.0)
    policy.check_site_level("distributed", 1.2)
    for noise, z in (("distributed", 0.8), ("server", 5.0), ("off", 0.0)):
        with pytest.raises(PolicyViolation, match="requires distributed noise with at least min_site_noise_multiplier"):
            policy.check_site_level(noise, z)
    SitePolicy().check_site_level("off", 0.0)


# --- through the real SecAgg+ handlers ---------------------------------------------------------


@pytest.fixture
def uniform_sites(tmp_path, monkeypatch):
    """Three sites that declare weight 1, as ``Site.aggregation_weight`` does under site-level DP."""
    for node in NODES:
        monkeypatch.setitem(secure_sites.EXAMPLES, node, 1)
    return Sites(tmp_path)


def _updates() -> dict[int, np.ndarray]:
    updates = {n: u.astype(np.float64) for n, u in random_updates(7).items()}
    updates[NODES[0]] *= 0.5 * S / np.linalg.norm(updates[NODES[0]])  # one site within the bound: untouched
    return updates


def _revealed_mean(sites: Sites, tag: bytes, plan, updates, floor: int = 2, rng=None) -> np.ndarray:
    exchange = sites.exchange()
    prepared = set_up_round(exchange, tag, sites.nodes, SETTINGS)
    masked = {}
    for n in sites.nodes:
        state = secure_aggregation.open_inbox(sites.contexts[n], tag, prepared.inboxes[n], sites.masked_for(n))
        sent = protect_update(updates[n], plan, state.params, floor, f"site-{n}", rng)
        masked[n] = secure_aggregation.mask_opened(sites.contexts[n], state, sent, f"site-{n}", sites.masked_for(n))
    result, _ = finish_round(exchange, prepared, masked, SETTINGS)
    assert result.clipped_values == 0
    return result.mean_update


def _uniform_clipped_mean(updates) -> np.ndarray:
    clipped = [u * min(1.0, S / np.linalg.norm(u)) for u in updates.values()]
    return np.mean(clipped, axis=0)


@pytest.mark.usefixtures("server_identity")
def test_without_noise_the_unmasked_mean_is_the_uniform_mean_of_clipped_updates(uniform_sites):
    updates = _updates()
    mean = _revealed_mean(uniform_sites, b"fedtune/site-level/1", _plan(z=0.0), updates)
    np.testing.assert_allclose(mean, _uniform_clipped_mean(updates), atol=1e-9)
    assert np.linalg.norm(mean) <= S * (1 + 1e-9), "a mean of updates within S is within S"


@pytest.mark.usefixtures("server_identity")
def test_the_unmasked_sum_carries_noise_of_std_z_times_s(uniform_sites):
    updates = _updates()
    mean = _revealed_mean(uniform_sites, b"fedtune/site-level/2", _plan(), updates, rng=np.random.default_rng(5))
    noise_in_sum = (mean - _uniform_clipped_mean(updates)) * len(NODES)
    # Three shares sized for sums of m = 2 sites: std z * S * sqrt(3 / 2), at least z * S.
    assert noise_in_sum.std() == pytest.approx(Z * S * math.sqrt(3 / 2), rel=0.1)  # DIM = 500 values


@pytest.mark.usefixtures("server_identity")
def test_sites_weighted_by_examples_refuse_to_add_shares_that_would_not_add_up(tmp_path):
    sites = Sites(tmp_path)  # EXAMPLES: 100, 250, 400
    prepared = set_up_round(sites.exchange(), b"fedtune/site-level/3", sites.nodes, SETTINGS)
    n = NODES[0]
    state = secure_aggregation.open_inbox(sites.contexts[n], b"fedtune/site-level/3", prepared.inboxes[n])
    with pytest.raises(SiteRefusal, match="total weight is 750 over 3 sites"):
        protect_update(_updates()[n], _plan(), state.params, 2, f"site-{n}")


# --- a server that states another minimum ------------------------------------------------------


def _opened_round(min_survivors: int, floor: int) -> ClientRound:
    """A site's round as if the server had stated ``min_survivors`` (bypassing the set-up's own check)."""
    state = ClientRound(num_examples=1, min_survivors_floor=floor)
    state.params = _params(min_survivors=min_survivors, clip_range=1.0)
    state.alive, state.sent_masked = (2, 3), True
    state.held_shares = {j: (b"b" * 44, b"s" * 44) for j in (1, 2, 3)}
    return state


@pytest.mark.parametrize(("stated", "floor"), [(1, 3), (2, 2), (3, 2), (10, 2)])
def test_whatever_minimum_the_server_states_every_sum_the_site_unmasks_has_noise_z_times_s(stated, floor):
    """A server that states a large minimum gets smaller shares, but the site then refuses to unmask a
    sum over fewer sites than that; one that states a small minimum cannot go below the site's floor."""
    state = _opened_round(stated, floor)
    std = share_std_for_round(_plan(), state.params, floor)
    m = max(2, stated, floor)
    assert std == pytest.approx(Z * S / math.sqrt(m))
    survivors = list(range(1, m + 1))
    with pytest.raises(ProtocolViolation, match="unmasking would reveal a sum"):
        _opened_round(stated, floor).unmask(survivors[:-1], [])
    state.unmask(survivors, [])  # the smallest sum the site helps reveal ...
    assert math.sqrt(len(survivors)) * std >= Z * S * (1 - 1e-12)  # ... carries noise of std >= z * S


# --- through the ClientApp's train handler ------------------------------------------------------


class SteppingSite:
    """Stands in for ``client.site.Site``: its training adds ``step`` to the global adapter."""

    site_id, num_examples, max_update_norm = "site-11", 100, 0.0
    policy = SitePolicy()

    def __init__(self, state_dir, step: np.ndarray):
        self.revealed_rounds = RevealedRounds(state_dir / "secagg_revealed.json")
        self.masked_rounds = MaskedRounds(state_dir / "secagg_masked.json")
        self.step = step

    def train(self, request, adapter):
        return SimpleNamespace(
            adapter={"w": adapter["w"] + self.step},
            num_examples=self.num_examples,
            steps=1,
            epsilon_spent=0.5,
            noise_multiplier=1.0,
            sample_rate=0.1,
        )


def _train_request(plan, global_w: np.ndarray) -> Message:
    content = RecordDict({ADAPTER: to_array_record({"w": global_w}), PLAN: plan.to_record()})
    request = Message(content, message_type=MessageType.TRAIN, dst_node_id=11)
    request.metadata.__dict__["_message_id"] = request.object_id
    return request


@pytest.mark.usefixtures("server_identity")
def test_in_the_clear_a_site_sends_the_global_adapter_plus_its_clipped_update(tmp_path):
    global_w = np.linspace(-1, 1, 300).astype(np.float32)
    step = np.full(300, 0.01, np.float32)  # norm about 0.17, above S
    site = SteppingSite(tmp_path, step)
    context = Context(run_id=1, node_id=11, node_config={"partition-id": 11}, state=RecordDict(), run_config={})
    plan = _plan(SiteNoise.SERVER, secure_aggregation=False)
    reply = build_client_app(lambda context: site)(_train_request(plan, global_w), context)
    assert SiteStatus.from_content(reply.content).state is SiteState.TRAINED
    sent = from_array_record(reply.content.array_records[ADAPTER])["w"]
    np.testing.assert_allclose(sent - global_w, step * S / np.linalg.norm(step), atol=1e-6)
    off = build_client_app(lambda context: site)(_train_request(train_plan(), global_w), context)
    np.testing.assert_array_equal(from_array_record(off.content.array_records[ADAPTER])["w"], global_w + step)
