"""A server that sends a site two share-keys requests at once (a fourth review of issue 15).

Each message runs in its own process on a copy of the site's state, so two requests sent together,
under two lists of members, both found the site's keys not yet shared: its self-mask seed and mask
key went out under both. The site masks once, in A; A's neighbours reveal its seed, and in B, where
it "dropped", B's neighbours reveal its mask key with a signed majority: its update, exactly, with
no colluder. Now the round parameters each set of keys is shared under are pinned on disk, under a
lock, before any ciphertext leaves (``RevealedRounds.shared_parameters``).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict
from flwr.common.serde import context_from_proto, context_to_proto

from fedtune.client import secure_aggregation as site_handlers
from fedtune.client.membership import Membership
from fedtune.client.revealed_rounds import RevealedRounds
from fedtune.common.roster import Roster
from fedtune.common.secure_aggregation.key_agreement import agree
from fedtune.common.secure_aggregation.masks import add_mask
from fedtune.common.secure_aggregation.protocol import ClientRound, ServerRound, _info
from fedtune.common.secure_aggregation.quantisation import QuantisationGrid, dequantise
from fedtune.common.secure_aggregation.records import (
    ADVERTISE,
    SHARE_KEYS,
    advertisement_from,
    params_record,
    tag_record,
)
from fedtune.common.site_identity import SiteIdentity
from fedtune.common.wire import SECAGG, SiteState, SiteStatus

TAG, D, CLIP = b"fedtune/run/1", 40, 0.1


def test_without_a_record_one_sites_keys_shared_under_two_member_lists_give_its_update_away():
    """Two copies of the site's round state stand for the two processes; nothing on disk."""
    names = [f"h{i:02d}" for i in range(11)]
    ids = {m: SiteIdentity.generate(m) for m in names}
    roster = Roster("hospitals", {m: x.public for m, x in ids.items()})
    sites = {m: ClientRound(100, roster=roster, identity=ids[m]) for m in names}
    ads = {m: s.advertise(TAG) for m, s in sites.items()}
    v, group_a, group_b = names[0], names[1:6], names[6:]
    node = {m: 100 + i for i, m in enumerate(names)}
    proc_a, proc_b = sites[v], copy.deepcopy(sites[v])  # two processes, each on a copy of the NEXT state

    def set_up(group, victim_state):
        states = {m: (victim_state if m == v else sites[m]) for m in [v, *group]}
        server = ServerRound(TAG, {node[m]: ads[m] for m in states}, CLIP, 3, D, threshold_fraction=0.67)
        params = server.share_keys_requests()
        by_node = {node[m]: s for m, s in states.items()}
        inboxes = server.route_shares({n: by_node[n].share_keys(p) for n, p in params.items()})
        return server, by_node, inboxes

    server_a, a, inbox_a = set_up(group_a, proc_a)
    server_b, b, inbox_b = set_up(group_b, proc_b)  # accepted: proc_b's copy never saw proc_a's

    rng = np.random.default_rng(0)
    updates = {n: rng.uniform(-CLIP / 4, CLIP / 4, D) for n in a}
    masked_a = {n: s.masked_input(inbox_a[n], updates[n]) for n, s in a.items()}  # victim masks once, in A
    masked_b = {n: s.masked_input(inbox_b[n], np.zeros(D)) for n, s in b.items() if n != node[v]}

    # A: everyone finished, no signatures needed; neighbours hand over b-shares of the victim.
    req_a = server_a.receive_masked(masked_a)
    ans_a = {n: a[n].unmask(*req_a[n]) for n in req_a}
    # B: the victim "dropped"; survivors sign B's list, then reveal s-shares of the victim.
    req_b = server_b.receive_masked(masked_b)
    sigs = server_b.signatures_by_index({n: b[n].sign_survivors(*req_b[n]) for n in req_b})
    ans_b = {n: b[n].unmask(*req_b[n], sigs) for n in req_b}

    ia, ib = server_a.index[node[v]], server_b.index[node[v]]
    b_v = server_a._combine(ia, 0, {server_a.index[n]: r for n, r in ans_a.items()})
    s_v = server_b._combine(ib, 1, {server_b.index[n]: r for n, r in ans_b.items()})
    vec = masked_a[node[v]].copy()
    add_mask(vec, b_v, -1)
    for j in server_a.graph[ia]:
        seed = agree(s_v, server_a.ads[j].s_public, _info("mask", server_a.bound_tag, ia, j))
        add_mask(vec, seed, -1 if ia < j else +1)
    grid = QuantisationGrid(CLIP, server_a.total_examples)
    recovered = dequantise(vec[:-1], grid, 100)
    err = np.max(np.abs(recovered - updates[node[v]]))
    assert err < 10 * grid.step  # the victim update, alone


@pytest.mark.usefixtures("server_identity")
def test_a_second_share_keys_request_under_other_parameters_is_refused(tmp_path):
    names = [f"h{i:02d}" for i in range(11)]
    ids = {m: SiteIdentity.generate(m) for m in names}
    roster = Roster("hospitals", {m: x.public for m, x in ids.items()})
    v, node = names[0], {m: 100 + i for i, m in enumerate(names)}
    membership = Membership(roster, ids[v])
    context = Context(run_id=1, node_id=node[v], node_config={}, state=RecordDict(), run_config={})
    revealed = RevealedRounds(tmp_path / "secagg_revealed.json")
    request = Message(RecordDict({SECAGG: tag_record(TAG)}), message_type=ADVERTISE, dst_node_id=node[v])
    reply = site_handlers.advertise_step(request, context, v, lambda c: (100, 3), lambda c: membership)
    ads = {v: advertisement_from(reply.content.config_records[SECAGG], TAG)}
    ads |= {m: ClientRound(100, roster=roster, identity=ids[m]).advertise(TAG) for m in names[1:]}

    def share(group, task):
        server = ServerRound(TAG, {node[m]: ads[m] for m in [v, *group]}, CLIP, 3, D, threshold_fraction=0.67)
        params = params_record(server.share_keys_requests()[node[v]])
        message = Message(RecordDict({SECAGG: params}), message_type=SHARE_KEYS, dst_node_id=node[v])
        return SiteStatus.from_content(site_handlers.share_keys(message, task, v, membership, revealed).content)

    first, second = (context_from_proto(context_to_proto(context)) for _ in range(2))  # both pulled at once
    assert share(names[1:6], first).state is SiteState.OK
    status = share(names[6:], second)
    assert status.state is SiteState.REFUSED
    assert "already shared these keys under other round parameters" in status.reason
    assert share(names[1:6], context_from_proto(context_to_proto(context))).state is SiteState.OK  # a retry
