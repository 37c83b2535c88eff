"""A server that sends a site two signing requests at once (a third review of issue 15).

Flower's SuperNode runs each message in its own ``flwr-clientapp`` process on a snapshot of the site's
context, and the last to finish writes it back; so "one list a round", kept in the site's memory
(``ClientRound.signed_view``), let two requests sent together both sign. Then the consistency step
counts nothing: two groups are told two stories, the sites in both neighbourhoods sign both, each
unmasks once, and the server reads one site's update: 10 sites of degree 4, floor 3, a bare-majority
threshold, no colluder, every check passed. Ring positions (0 is the victim V):

  L1: dropped {1, 8};    unmasked under by 2, 3, 6, 7, 9
  L2: dropped {2, 7, 9}; unmasked under by 0, 1, 4, 5, 8
  0, 3, 4, 5, 6 sign both lists (two concurrent tasks).

Now the list is pinned on disk, under a lock, before the signature leaves
(``RevealedRounds.survivor_lists``), and the second task is refused. The first test signs as the
handler did before (no record), the snapshot passed through Flower's own serialisation.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Context, RecordDict
from flwr.common.serde import context_from_proto, context_to_proto

from fedtune.client import secure_aggregation as site_handlers
from fedtune.client.membership import Membership
from fedtune.client.revealed_rounds import MaskedRounds, RevealedRounds
from fedtune.common.roster import Roster
from fedtune.common.secure_aggregation.key_agreement import agree, public_key_of
from fedtune.common.secure_aggregation.masks import add_mask
from fedtune.common.secure_aggregation.protocol import SEED_BYTES, ServerRound, _decode_share, _info, round_ring
from fedtune.common.secure_aggregation.quantisation import QuantisationGrid, dequantise
from fedtune.common.secure_aggregation.records import (
    ADVERTISE,
    SHARE_KEYS,
    SIGN_SURVIVORS,
    UNMASK,
    advertisement_from,
    indexed_bytes_from,
    params_record,
    signature_from,
    tag_record,
    unmask_reply_from,
    unmask_request_record,
)
from fedtune.common.secure_aggregation.shamir import combine_shares
from fedtune.common.site_identity import SiteIdentity
from fedtune.common.wire import SECAGG, SiteState
from tests.secure_sites import ok_content, secagg_message, status_of

pytestmark = pytest.mark.usefixtures("server_identity")

TAG = b"fedtune/race/1"
N, K, T, FLOOR, D, CLIP = 10, 4, 3, 3, 200, 0.1
L1_DROPPED, L1_UNMASK = (1, 8), (2, 3, 6, 7, 9)
L2_DROPPED, L2_UNMASK = (2, 7, 9), (0, 1, 4, 5, 8)
L1_SIGN = (0, 2, 3, 4, 5, 6, 7, 9)
L2_SIGN = (0, 1, 3, 4, 5, 6, 8)


def _snapshot(context: Context) -> Context:
    """What a flwr-clientapp process gets from PullTaskInput: the node's context, through its proto."""
    return context_from_proto(context_to_proto(context))


def _setup(tmp_path):
    ids = {i: SiteIdentity.generate(f"h{i}") for i in range(1, N + 1)}
    roster = Roster("hospitals", {x.member: x.public for x in ids.values()}, min_aggregation_sites=FLOOR)
    membership = {i: Membership(roster, ids[i]) for i in ids}
    contexts = {i: Context(run_id=1, node_id=i, node_config={}, state=RecordDict(), run_config={}) for i in ids}
    masked_rounds = {i: MaskedRounds(tmp_path / f"{i}-masked.json") for i in ids}
    revealed = {i: RevealedRounds(tmp_path / f"{i}-revealed.json") for i in ids}
    ads = {}
    for i in ids:
        reply = site_handlers.advertise_step(
            secagg_message(tag_record(TAG), ADVERTISE, i),
            contexts[i],
            f"h{i}",
            lambda c: (100, FLOOR),
            lambda c, i=i: membership[i],
        )
        ads[i] = advertisement_from(ok_content(reply).config_records[SECAGG], TAG)
    server = ServerRound(TAG, ads, CLIP, FLOOR, D, neighbours=K)  # node i gets index i
    assert server.threshold == T
    shared = {}
    for i, p in server.share_keys_requests().items():
        reply = site_handlers.share_keys(
            secagg_message(params_record(p), SHARE_KEYS, i), contexts[i], f"h{i}", membership[i]
        )
        shared[i] = indexed_bytes_from(ok_content(reply).config_records[SECAGG])
    inboxes = server.route_shares(shared)
    rng = np.random.default_rng(7)
    updates = {i: rng.normal(0, 0.02, D) for i in ids}
    masked = {}
    for i in ids:
        state = site_handlers.open_inbox(contexts[i], TAG, inboxes[i], masked_rounds[i], membership[i])
        masked[i] = site_handlers.mask_opened(contexts[i], state, updates[i], f"h{i}", masked_rounds[i])
    ring = round_ring(TAG, K, N, server.members)
    for p, x in enumerate(ring):  # the public graph is the circulant over the ring order
        assert set(server.graph[x]) == {ring[(p + d) % N] for d in (-2, -1, 1, 2)}
    return ids, membership, contexts, revealed, server, ring, updates, masked


def _view(ring, dropped_positions):
    dropped = sorted(ring[p] for p in dropped_positions)
    return [x for x in sorted(ring) if x not in dropped], dropped


def _sign(context, view, i, membership, revealed=None):
    request = secagg_message(unmask_request_record(TAG, *view), SIGN_SURVIVORS, i)
    return site_handlers.sign_survivors(request, context, f"h{i}", membership, revealed)


def test_without_a_record_on_disk_two_concurrent_sign_requests_read_one_update(tmp_path):
    ids, membership, contexts, revealed, server, ring, updates, masked = _setup(tmp_path)
    views = {1: _view(ring, L1_DROPPED), 2: _view(ring, L2_DROPPED)}
    signers = {1: [ring[p] for p in L1_SIGN], 2: [ring[p] for p in L2_SIGN]}
    unmaskers = {1: [ring[p] for p in L1_UNMASK], 2: [ring[p] for p in L2_UNMASK]}
    own = {x: c for c in (1, 2) for x in unmaskers[c]}
    signatures = {1: {}, 2: {}}
    for x in ids:
        lists = [c for c in (1, 2) if x in signers[c]]
        # Both tasks pull the context before either pushes; the task of the list x will unmask under is
        # sent second, so it finishes (and pushes) last.
        tasks = {c: _snapshot(contexts[x]) for c in lists}
        for c in sorted(lists, key=lambda c: c == own[x]):
            reply = _sign(tasks[c], views[c], x, membership[x])
            signatures[c][x] = signature_from(ok_content(reply).config_records[SECAGG])
            contexts[x].state = tasks[c].state  # push_task_output: set_run_series_context, last writer wins
    answers = {}
    for x in ids:
        c = own[x]
        request = unmask_request_record(TAG, *views[c], server.signatures_by_index(signatures[c]))
        reply = site_handlers.unmask(
            secagg_message(request, UNMASK, x), contexts[x], f"h{x}", revealed[x], membership[x]
        )
        answers[x] = unmask_reply_from(ok_content(reply).config_records[SECAGG])

    def combine(owner, kind):
        holders = sorted(h for h in answers if owner in answers[h][kind])
        assert len(holders) >= T
        rows = np.stack([_decode_share(answers[h][kind][owner]) for h in holders])
        return combine_shares(holders, rows, T, SEED_BYTES)

    victim = ring[0]
    vector = masked[victim].copy()
    add_mask(vector, combine(victim, 0), -1)
    for j in server.graph[victim]:
        s_j = combine(j, 1)
        assert public_key_of(s_j) == server.ads[j].s_public
        seed = agree(s_j, server.ads[victim].s_public, _info("mask", server.bound_tag, victim, j))
        add_mask(vector, seed, -1 if victim < j else +1)
    grid = QuantisationGrid(CLIP, server.total_examples)
    recovered = dequantise(vector[:-1], grid, 100)
    assert np.max(np.abs(recovered - updates[victim])) <= 2 * grid.step
    assert np.max(np.abs(updates[victim])) > 100 * grid.step


def test_with_the_list_pinned_on_disk_the_second_concurrent_request_is_refused(tmp_path):
    ids, membership, contexts, revealed, server, ring, updates, masked = _setup(tmp_path)
    x = ring[0]
    first, second = _snapshot(contexts[x]), _snapshot(contexts[x])  # both pulled before either finished
    ok_content(_sign(first, _view(ring, L1_DROPPED), x, membership[x], revealed[x]))
    status = status_of(_sign(second, _view(ring, L2_DROPPED), x, membership[x], revealed[x]))
    assert status.state is SiteState.REFUSED
    assert "already signed or unmasked under another list of survivors" in status.reason
    # Nor may it unmask under the other list, whichever process the request reaches.
    request = unmask_request_record(TAG, *_view(ring, L2_DROPPED))
    status = status_of(
        site_handlers.unmask(secagg_message(request, UNMASK, x), second, f"h{x}", revealed[x], membership[x])
    )
    assert status.state is SiteState.REFUSED
    assert not revealed[x].tags(), "nothing was revealed"


def test_the_same_list_signed_twice_is_no_conflict(tmp_path):
    ids, membership, contexts, revealed, server, ring, updates, masked = _setup(tmp_path)
    x = ring[0]
    for task in (_snapshot(contexts[x]), _snapshot(contexts[x])):
        ok_content(_sign(task, _view(ring, L1_DROPPED), x, membership[x], revealed[x]))
