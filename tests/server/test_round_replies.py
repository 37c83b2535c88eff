"""How a round's replies are classified: who can contribute, and when every site refused."""

from __future__ import annotations

import numpy as np
import pytest

from fedtune.server.federation import RoundReplies
from tests.plans import train_plan


def test_a_site_that_sent_a_masked_vector_counts_as_a_contributor():
    got = RoundReplies(masked={7: ("site-0", np.zeros(5, np.uint64))}, refused={"site-1": "budget", "site-2": "policy"})
    assert got.contributors == 1
    assert not got.every_site_refused, "one site trained: the federation must not stop"


def test_every_site_refused_only_when_nobody_contributed_or_failed():
    assert RoundReplies(refused={"site-0": "budget"}).every_site_refused
    assert not RoundReplies(refused={"site-0": "budget"}, failed={"node-3": "timeout"}).every_site_refused
    plain = RoundReplies(updates={"site-0": ({"w": np.zeros(2)}, 5.0)}, refused={"site-1": "budget"})
    assert plain.contributors == 1 and not plain.every_site_refused
    assert not RoundReplies().every_site_refused


def _msg(message_id: str = "", dst: int = 0, reply_to: str = "", src: int = 0):
    from types import SimpleNamespace

    return SimpleNamespace(
        metadata=SimpleNamespace(message_id=message_id, dst_node_id=dst, reply_to_message_id=reply_to, src_node_id=src)
    )


def test_a_reply_is_attributed_to_the_node_its_request_went_to_not_its_stated_sender():
    from fedtune.server.messaging import by_node

    requests = [_msg("m1", dst=11), _msg("m2", dst=12)]
    # The SuperLink answers for an offline node itself: such an error reply's sender is the SuperLink (node 1).
    replies = [_msg(reply_to="m2", src=1), _msg(reply_to="m1", src=11)]
    assert [node for node, _ in by_node(requests, replies)] == [12, 11]


def _exchange(node: int, reply_records: dict):
    """A train request to ``node`` and the reply it got, built as the Grid would hand them over."""
    from flwr.app import Message, MessageType, RecordDict

    from fedtune.common.wire import ADAPTER, PLAN, to_array_record

    plan = train_plan(total_rounds=1)
    request = Message(
        RecordDict({ADAPTER: to_array_record({"w": np.zeros(4, np.float32)}), PLAN: plan.to_record()}),
        message_type=MessageType.TRAIN,
        dst_node_id=node,
    )
    request.metadata.__dict__["_message_id"] = request.object_id
    return request, Message(RecordDict(reply_records), reply_to=request)


@pytest.mark.usefixtures("server_identity")
def test_train_replies_are_read_through_the_contract_and_a_broken_one_fails_only_its_site():
    from flwr.app import ConfigRecord, MetricRecord

    from fedtune.common.wire import ADAPTER, METRICS, STATUS, SiteState, SiteStatus, TrainReport, to_array_record
    from fedtune.server.federation import collect_train_replies

    report = TrainReport(num_examples=60, steps=3, epsilon_spent=2.5, noise_multiplier=1.1, sample_rate=0.125)
    exchanges = [
        _exchange(
            11,
            {
                ADAPTER: to_array_record({"w": np.ones(4, np.float32)}),
                METRICS: report.to_record(),
                STATUS: SiteStatus("site-0", SiteState.TRAINED).to_record(),
            },
        ),
        _exchange(12, {STATUS: SiteStatus("site-1", SiteState.REFUSED, "privacy budget exhausted").to_record()}),
        _exchange(13, {STATUS: ConfigRecord({"site-id": "site-2", "state": "done", "reason": ""})}),
        _exchange(
            14, {METRICS: MetricRecord({"steps": 3}), STATUS: SiteStatus("site-3", SiteState.TRAINED).to_record()}
        ),
    ]
    got = collect_train_replies([q for q, _ in exchanges], [r for _, r in exchanges])
    assert set(got.updates) == {"site-0"} and got.updates["site-0"][1] == 60.0
    assert got.refused == {"site-1": "privacy budget exhausted"}
    assert set(got.failed) == {"node-13", "site-3"}
    assert "field 'state' is 'done'" in got.failed["node-13"]
    assert "field 'num-examples' is missing" in got.failed["site-3"]
    # metrics.jsonl keeps its keys: ``epsilon`` is what the site spent.
    entry = got.train["site-0"]
    assert {k: entry[k] for k in ("num-examples", "steps", "epsilon", "noise-multiplier", "sample-rate")} == {
        "num-examples": 60,
        "steps": 3,
        "epsilon": 2.5,
        "noise-multiplier": 1.1,
        "sample-rate": 0.125,
    }
    assert entry["bytes-sent"] > 0 and entry["bytes-received"] > 0
