"""How a round's replies are classified: who can contribute, and when every site refused."""

from __future__ import annotations

import numpy as np

from fedtune.server.federation import RoundReplies


def test_a_site_that_sent_a_masked_vector_counts_as_a_contributor():
    got = RoundReplies(masked={7: ("site-0", np.zeros(5, np.uint32))}, refused={"site-1": "budget", "site-2": "policy"})
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

    return SimpleNamespace(metadata=SimpleNamespace(message_id=message_id, dst_node_id=dst,
                                                    reply_to_message_id=reply_to, src_node_id=src))


def test_a_reply_is_attributed_to_the_node_its_request_went_to_not_its_stated_sender():
    from fedtune.server.messaging import by_node

    requests = [_msg("m1", dst=11), _msg("m2", dst=12)]
    # The SuperLink answers for an offline node itself: such an error reply's sender is the SuperLink (node 1).
    replies = [_msg(reply_to="m2", src=1), _msg(reply_to="m1", src=11)]
    assert [node for node, _ in by_node(requests, replies)] == [12, 11]
