"""A site helps reveal each secure round at most once, across restarts (``client.revealed_rounds``).

A server that resumes after a crash runs a round again, and the sites replay the very updates
they sent the first time. The first test shows why that is dangerous on its own: two sums
of the same updates over different survivors give away the missing site's update. The
others show the sites' on-disk record stopping it, without getting in the way of other rounds.
The sites are three real ClientApps' SecAgg+ handlers served in this process (tests/secure_sites.py).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from fedtune.client import secure_aggregation
from fedtune.client.revealed_rounds import MaskedRounds, RevealedRounds
from fedtune.common.secure_aggregation.protocol import ProtocolViolation, SecureAggregationError, SecureSum
from fedtune.common.secure_aggregation.records import round_tag
from fedtune.common.secure_aggregation.share_transport import ShareDecryptionError
from fedtune.server.secure_rounds import set_up_round
from tests.plans import train_plan
from tests.secure_sites import EXAMPLES, NODES, SETTINGS, Sites, random_updates, secure_round, weighted_mean

pytestmark = pytest.mark.usefixtures("server_identity")


@pytest.fixture
def updates():
    return random_updates()


def weighted_sum(result: SecureSum) -> np.ndarray:
    """What the server can compute from a round's result and the example counts it is told."""
    return result.mean_update * sum(EXAMPLES[n] for n in result.survivors)


def test_without_the_record_a_replayed_round_gives_one_update_away(tmp_path, updates):
    sites = Sites(tmp_path, keep_record=False, mask_once=False)
    tag = round_tag("run", 3)
    first = secure_round(sites, tag, updates, NODES)
    sites.restart()  # the server crashed before its checkpoint; it resumes and runs round 3 again
    replay = secure_round(sites, tag, updates, [11, 12])  # site-13's reply is lost this time
    leaked = (weighted_sum(first) - weighted_sum(replay)) / EXAMPLES[13]
    assert np.max(np.abs(leaked - updates[13])) < 1e-6, "the difference of the two sums is site-13's update"


def test_a_site_refuses_to_unmask_a_replayed_round_so_it_fails(tmp_path, updates):
    """The second line of defence alone: sites that did mask the round again (no masked-rounds
    record, tests/client/test_masked_rounds.py) still never reveal it twice."""
    sites = Sites(tmp_path, keep_record=True, mask_once=False)
    tag = round_tag("run", 3)
    first = secure_round(sites, tag, updates, NODES)
    assert first.survivors == NODES
    assert all(r.tags() == {tag.hex()} for r in sites.revealed.values()), "claimed before the shares left"

    sites.restart()
    exchange = sites.exchange()
    with pytest.raises(SecureAggregationError, match="came back"):
        secure_round(sites, tag, updates, [11, 12], exchange)
    for site in ("site-11", "site-12"):  # the survivors said why, and revealed nothing of the second sum
        assert "already released its unmasking shares" in exchange.dropped[site]

    # The next round is a new round: the record does not get in its way, even with a dropout.
    after = secure_round(sites, round_tag("run", 4), updates, [11, 12])
    assert after.survivors == [11, 12]
    assert np.max(np.abs(after.mean_update - weighted_mean(updates, [11, 12]))) < 1e-6


def test_an_unreadable_record_refuses_to_unmask_naming_the_file(tmp_path, updates):
    sites = Sites(tmp_path, keep_record=True)
    sites.revealed[11].path.parent.mkdir(parents=True)
    sites.revealed[11].path.write_text("{not json")
    exchange = sites.exchange()
    result = secure_round(sites, round_tag("run", 1), updates, NODES, exchange)  # two of three answer: enough
    assert str(sites.revealed[11].path) in exchange.dropped["site-11"]
    assert result.survivors == NODES


def test_shares_are_opened_before_training_and_a_round_is_masked_once(tmp_path, updates):
    sites = Sites(tmp_path, keep_record=True)
    tag = round_tag("run", 1)
    prepared = set_up_round(sites.exchange(), tag, NODES, SETTINGS)
    inbox = dict(prepared.inboxes[11])
    sender = next(iter(inbox))
    tampered = {**inbox, sender: inbox[sender][:-1] + bytes([inbox[sender][-1] ^ 1])}
    with pytest.raises(ShareDecryptionError):
        secure_aggregation.open_inbox(sites.contexts[11], tag, tampered)  # no update exists yet
    with pytest.raises(ProtocolViolation, match="not neighbours"):
        secure_aggregation.open_inbox(sites.contexts[11], tag, {**inbox, 99: inbox[sender]})
    opened = secure_aggregation.open_inbox(sites.contexts[11], tag, inbox)
    secure_aggregation.mask_opened(sites.contexts[11], opened, updates[11], "site-11")
    with pytest.raises(ProtocolViolation, match="out of order"):
        opened.masked_input(None, updates[11] * 2)  # a second vector under the same masks


class SiteThatMustNotTrain:
    """Stands in for ``client.site.Site``: any training (and privacy spending) fails the test."""

    site_id, num_examples = "site-11", EXAMPLES[11]
    membership = None  # a federation without a roster
    policy = SimpleNamespace(min_aggregation_sites=2)

    def __init__(self, state_dir):
        self.revealed_rounds = RevealedRounds(state_dir / "secagg_revealed.json")
        self.masked_rounds = MaskedRounds(state_dir / "secagg_masked.json")
        self.trained = 0

    def train(self, request, adapter):
        self.trained += 1
        raise AssertionError("the site trained on a request whose shares do not open")


def test_a_train_request_with_unusable_shares_is_refused_before_any_training(tmp_path):
    from flwr.app import Message, MessageType, RecordDict

    from fedtune.client.app import build_client_app
    from fedtune.common.secure_aggregation.records import inbox_record
    from fedtune.common.wire import ADAPTER, PLAN, SECAGG, SiteState, SiteStatus, to_array_record

    sites = Sites(tmp_path)
    tag = round_tag("run", 1)
    prepared = set_up_round(sites.exchange(), tag, NODES, SETTINGS)
    inbox = dict(prepared.inboxes[11])
    sender = next(iter(inbox))
    inbox[sender] = inbox[sender][:-1] + bytes([inbox[sender][-1] ^ 1])  # tampered in transit
    site = SiteThatMustNotTrain(tmp_path)
    app = build_client_app(lambda context: site)
    plan = train_plan(secure_aggregation=True).to_record()
    request = Message(
        RecordDict(
            {
                ADAPTER: to_array_record({"w": np.zeros(4, dtype=np.float32)}),
                PLAN: plan,
                SECAGG: inbox_record(tag, inbox),
            }
        ),
        message_type=MessageType.TRAIN,
        dst_node_id=11,
    )
    request.metadata.__dict__["_message_id"] = request.object_id
    reply = app(request, sites.contexts[11])  # the site's context holds round 1, set up
    status = SiteStatus.from_content(reply.content)
    assert status.state is SiteState.REFUSED
    assert "failed authentication" in status.reason
    assert site.trained == 0
