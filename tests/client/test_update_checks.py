"""A site checks its update before it leaves, plain or masked: a site whose training emitted NaN
or an update above ``train.max_update_norm`` refuses the round and sends nothing.

Through the real ClientApp train handler; the site's training is stood in for (its outcome is
what matters here). The sites' SecAgg+ handlers are real ClientApps (tests/secure_sites.py)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import Context, Message, MessageType, RecordDict

from fedtune.client.app import build_client_app
from fedtune.client.revealed_rounds import MaskedRounds, RevealedRounds
from fedtune.common.secure_aggregation.records import inbox_record, round_tag
from fedtune.common.wire import ADAPTER, MASKED, PLAN, SECAGG, SiteState, SiteStatus, to_array_record
from fedtune.server.secure_rounds import set_up_round
from tests.plans import train_plan
from tests.secure_sites import DIM, EXAMPLES, NODES, SETTINGS, Sites

pytestmark = pytest.mark.usefixtures("server_identity")

TAG = round_tag("run", 1)


class FixedOutcomeSite:
    """Stands in for ``client.site.Site``: its training adds ``step`` to the global adapter."""

    site_id, num_examples = "site-11", EXAMPLES[11]
    membership = None  # a federation without a roster
    policy = SimpleNamespace(min_aggregation_sites=2)

    def __init__(self, state_dir, step: np.ndarray, max_update_norm: float):
        self.revealed_rounds = RevealedRounds(state_dir / "secagg_revealed.json")
        self.masked_rounds = MaskedRounds(state_dir / "secagg_masked.json")
        self.step, self.max_update_norm = step, max_update_norm

    def train(self, request, adapter):
        return SimpleNamespace(
            adapter={"w": adapter["w"] + self.step},
            num_examples=self.num_examples,
            steps=1,
            epsilon_spent=0.5,
            noise_multiplier=1.0,
            sample_rate=0.1,
        )


def _request(secure: bool, sites: Sites | None = None) -> Message:
    content = {ADAPTER: to_array_record({"w": np.zeros(DIM, dtype=np.float32)})}
    content[PLAN] = train_plan(secure_aggregation=secure).to_record()
    if secure:
        assert sites is not None
        prepared = set_up_round(sites.exchange(), TAG, NODES, SETTINGS)
        content[SECAGG] = inbox_record(TAG, prepared.inboxes[11])
    request = Message(RecordDict(content), message_type=MessageType.TRAIN, dst_node_id=11)
    request.metadata.__dict__["_message_id"] = request.object_id
    return request


def _context() -> Context:
    return Context(run_id=1, node_id=11, node_config={"partition-id": 11}, state=RecordDict(), run_config={})


NAN = np.where(np.arange(DIM) == 3, np.nan, 0.001).astype(np.float32)
BIG = np.full(DIM, 0.01, dtype=np.float32)  # norm 0.01 * sqrt(500) ~ 0.224


def test_a_site_whose_training_emitted_nan_refuses_the_plain_round_and_sends_nothing(tmp_path, caplog):
    site = FixedOutcomeSite(tmp_path, NAN, max_update_norm=0.0)
    with caplog.at_level(logging.WARNING, logger="fedtune.client"):
        reply = build_client_app(lambda context: site)(_request(secure=False), _context())
    status = SiteStatus.from_content(reply.content)
    assert status.state is SiteState.REFUSED
    assert "update check failed, nothing sent" in status.reason and "NaN" in status.reason
    assert not reply.content.array_records, "no tensors leave the site"
    assert "site-11 refused round: update check failed" in caplog.text


@pytest.mark.parametrize("secure", [False, True])
def test_an_update_above_the_sites_norm_bound_is_stopped_on_the_site(tmp_path, secure):
    sites = Sites(tmp_path / "sites") if secure else None
    site = FixedOutcomeSite(tmp_path / "site", BIG, max_update_norm=0.1)
    reply = build_client_app(lambda context: site)(_request(secure, sites), sites.contexts[11] if sites else _context())
    status = SiteStatus.from_content(reply.content)
    assert status.state is SiteState.REFUSED and "exceeds train.max_update_norm = 0.1" in status.reason
    assert ADAPTER not in reply.content.array_records and MASKED not in reply.content.array_records
    assert site.masked_rounds.tags() == set(), "refused before masking: the round is not recorded as masked"


@pytest.mark.parametrize("secure", [False, True])
def test_without_the_bound_the_same_update_would_have_left(tmp_path, secure):
    sites = Sites(tmp_path / "sites") if secure else None
    site = FixedOutcomeSite(tmp_path / "site", BIG, max_update_norm=0.0)
    reply = build_client_app(lambda context: site)(_request(secure, sites), sites.contexts[11] if sites else _context())
    assert SiteStatus.from_content(reply.content).state is SiteState.TRAINED
    assert (MASKED if secure else ADAPTER) in reply.content.array_records
