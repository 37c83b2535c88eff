"""A site sends a masked input for each secure round at most once, across restarts
(``client.revealed_rounds.MaskedRounds``, ``secagg_masked.json`` in its state folder).

A resumed server sets a round up again with fresh keys; were the sites to mask their replayed
updates again, a server that kept the first attempt's unmask answers could unmask both
attempts and learn a few sites' updates by difference (tests/server/test_secure_resume.py).
Here: the train handler records the round before the masked vector leaves, refuses a second
request for it before any training, and refuses to mask at all while the record is unreadable.
The sites' SecAgg+ handlers are real ClientApps served in this process (tests/secure_sites.py).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import Message, MessageType, RecordDict

from fedtune.client.app import build_client_app
from fedtune.client.revealed_rounds import MaskedRounds, RevealedRounds
from fedtune.common.secure_aggregation.protocol import ALREADY_MASKED
from fedtune.common.secure_aggregation.records import inbox_record, round_tag
from fedtune.common.wire import ADAPTER, MASKED, PLAN, SECAGG, SiteState, SiteStatus, to_array_record
from fedtune.server.secure_rounds import set_up_round
from tests.plans import train_plan
from tests.secure_sites import DIM, EXAMPLES, NODES, SETTINGS, Sites

pytestmark = pytest.mark.usefixtures("server_identity")

TAG = round_tag("run", 1)


class CountingSite:
    """Stands in for ``client.site.Site``: counts its training runs (each would spend privacy)."""

    site_id, num_examples = "site-11", EXAMPLES[11]
    membership = None  # a federation without a roster
    policy = SimpleNamespace(min_aggregation_sites=2)
    max_update_norm = 0.0

    def __init__(self, state_dir):
        self.revealed_rounds = RevealedRounds(state_dir / "secagg_revealed.json")
        self.masked_rounds = MaskedRounds(state_dir / "secagg_masked.json")
        self.trained = 0

    def train(self, request, adapter):
        self.trained += 1
        return SimpleNamespace(
            adapter={"w": adapter["w"] + 0.001},
            num_examples=self.num_examples,
            steps=1,
            epsilon_spent=0.5,
            noise_multiplier=1.0,
            sample_rate=0.1,
        )


def train_request(sites: Sites) -> Message:
    """Round 1 set up (afresh) with every site; site-11's train request for it."""
    prepared = set_up_round(sites.exchange(), TAG, NODES, SETTINGS)
    request = Message(
        RecordDict(
            {
                ADAPTER: to_array_record({"w": np.zeros(DIM, dtype=np.float32)}),
                PLAN: train_plan(secure_aggregation=True).to_record(),
                SECAGG: inbox_record(TAG, prepared.inboxes[11]),
            }
        ),
        message_type=MessageType.TRAIN,
        dst_node_id=11,
    )
    request.metadata.__dict__["_message_id"] = request.object_id
    return request


def test_a_site_masks_a_round_once_and_refuses_a_resumed_servers_retry_before_training(tmp_path):
    sites, site = Sites(tmp_path / "sites"), CountingSite(tmp_path)
    app = build_client_app(lambda context: site)
    reply = app(train_request(sites), sites.contexts[11])
    assert SiteStatus.from_content(reply.content).state is SiteState.TRAINED and MASKED in reply.content.array_records
    assert site.masked_rounds.tags() == {TAG.hex()}, "recorded on disk before the vector left"

    sites.restart()  # the server crashed; resumed, it sets round 1 up again with fresh keys
    reply = app(train_request(sites), sites.contexts[11])
    status = SiteStatus.from_content(reply.content)
    assert status.state is SiteState.REFUSED
    assert status.reason.startswith(f"{ALREADY_MASKED} for {TAG!r}")
    assert "a second masking under other keys could reveal its update by difference" in status.reason
    assert "the round is abandoned" in status.reason
    assert MASKED not in reply.content.array_records
    assert site.trained == 1, "refused before training or replay spent anything"


def test_an_unreadable_record_refuses_to_mask_naming_the_file(tmp_path):
    sites, site = Sites(tmp_path / "sites"), CountingSite(tmp_path)
    site.masked_rounds.path.write_text("{not json")
    reply = build_client_app(lambda context: site)(train_request(sites), sites.contexts[11])
    status = SiteStatus.from_content(reply.content)
    assert status.state is SiteState.REFUSED
    assert str(site.masked_rounds.path) in status.reason
    assert site.trained == 0
