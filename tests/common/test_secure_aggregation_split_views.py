"""A server that gives each site its own list of members (a second review of issue 15).

advertise_step answers every request for a round with fresh signed keys (set_up_round runs the
set-up again when a site did not share its keys), so a server can hold several signed
advertisements of each site for one round. Every signature checks, since it covers the round's
tag and the keys; but each choice of advertisements for the members a site does not talk to gives
that site another public graph. The server picks, for each site, the list that gives it the
neighbourhood the server wants, and runs the consistency step among "helpers" only:

  V (victim)   neighbours P = {a, b, c, d}; told "nobody dropped": gives its self-mask seed shares.
  j in P       neighbours {V} + three helpers; told "nobody dropped": gives a share of V's seed.
  helpers W    (6) each sees 2 partners and 2 helpers; all sign "P dropped", so each holds t = 3
               signatures from its neighbourhood, passes the group check in its own graph and
               reveals its partners' mask-key shares.

With V's self-mask seed and the mask key of each of its neighbours the server reads V's update:
11 sites of degree 4, no colluder, every site running the real handlers. Now every participant's
signed keys are bound into the tag each share is sealed and each mask derived under
(``bound_round_tag``): sites holding different lists cannot open each other's shares, so the site
refuses before it trains. The test restores the binding as it was to show the attack.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
from flwr.app import Context, RecordDict

from fedtune.client import secure_aggregation as site_handlers
from fedtune.client.membership import Membership
from fedtune.client.revealed_rounds import MaskedRounds, RevealedRounds
from fedtune.common.roster import Roster
from fedtune.common.secure_aggregation import protocol
from fedtune.common.secure_aggregation.key_agreement import agree, public_key_of
from fedtune.common.secure_aggregation.masks import add_mask
from fedtune.common.secure_aggregation.neighbours import public_graph, smallest_group
from fedtune.common.secure_aggregation.protocol import (
    SEED_BYTES,
    RoundParameters,
    ShareDecryptionError,
    _decode_share,
    _info,
)
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
from fedtune.common.wire import SECAGG
from tests.secure_sites import ok_content, secagg_message

pytestmark = pytest.mark.usefixtures("server_identity")

TAG = b"fedtune/split-views/1"
D, CLIP, K, T, FLOOR = 200, 0.1, 4, 3, 3
V, A, B, C, DD = 1, 2, 3, 4, 5
P = [A, B, C, DD]
W = [6, 7, 8, 9, 10, 11]
ACTIVE = list(range(1, 12))
HELPERS = {A: W[:3], C: W[:3], B: W[3:], DD: W[3:]}
# Each helper's neighbourhood: 2 partners and its 2 neighbours on the cycle W.
WANTED = {V: set(P)}
WANTED.update({j: {V, *HELPERS[j]} for j in P})
for pos, w in enumerate(W):
    WANTED[w] = {j for j in P if w in HELPERS[j]} | {W[pos - 1], W[(pos + 1) % len(W)]}


def _bound_tag_without_members(p: RoundParameters) -> bytes:
    """The binding before this fix: the round's parameters, not the list of members' keys."""
    return protocol.bound_round_tag(
        p.round_tag, p.threshold, p.min_survivors, p.clip_range, p.num_participants, p.total_examples
    )


def _graph_seeded_in_index_order(round_tag: bytes, k: int, n: int, members) -> dict[int, tuple[int, ...]]:
    """The graph before the third review: a shuffle seeded by every signature in index order, so the
    choice of advertisement for any member moves everyone (now each member sits at its own hash)."""
    seed = round_tag + f"|k:{k}|".encode() + b"".join(members[i].signature for i in sorted(members))
    return public_graph(n, k, seed)


def _grind(ads, live, n, generations):
    """For each site, a members list (live keys for itself and its wanted neighbours, any older signed
    advertisement for the others) whose public graph gives it exactly the wanted neighbourhood."""
    rng = random.Random(1)
    views = {}
    for x, wanted in WANTED.items():
        fixed = {x, *wanted}
        free = [i for i in range(1, n + 1) if i not in fixed]
        for _ in range(200_000):
            members = {i: ads[i][live[i]].signed_keys for i in fixed}
            members.update({i: ads[i][rng.randrange(generations)].signed_keys for i in free})
            graph = protocol.round_graph(TAG, K, n, members)
            if set(graph[x]) != wanted:
                continue
            if x in W and smallest_group(graph, [i for i in range(1, n + 1) if i not in P]) < FLOOR:
                continue
            views[x] = members
            break
        else:
            raise AssertionError(f"no view found for site {x}")
    return views


def _attack(tmp_path, n, generations):
    ids = {i: SiteIdentity.generate(f"h{i}") for i in range(1, n + 1)}
    roster = Roster("hospitals", {x.member: x.public for x in ids.values()}, min_aggregation_sites=FLOOR)
    membership = {i: Membership(roster, ids[i]) for i in ids}
    contexts = {i: Context(run_id=1, node_id=i, node_config={}, state=RecordDict(), run_config={}) for i in ids}
    masked_rounds = {i: MaskedRounds(tmp_path / f"{i}-masked.json") for i in ids}
    revealed = {i: RevealedRounds(tmp_path / f"{i}-revealed.json") for i in ids}

    # 1. The server asks every site to advertise GENERATIONS times for the same tag (as set_up_round's
    #    re-run does); it keeps every signed advertisement. The last one is each site's live keys.
    ads = {i: [] for i in ids}
    for _ in range(generations):
        for i in ids:
            reply = site_handlers.advertise_step(
                secagg_message(tag_record(TAG), ADVERTISE, i),
                contexts[i],
                f"h{i}",
                lambda c: (100, FLOOR),
                lambda c, i=i: membership[i],
            )
            ads[i].append(advertisement_from(ok_content(reply).config_records[SECAGG], TAG))
    live = {i: generations - 1 for i in ids}
    total = 100 * n

    # 2. One view per site, then the real share-keys handler.
    views = _grind(ads, live, n, generations)
    out, params_of = {}, {}
    for x, members in views.items():
        params = RoundParameters(
            TAG,
            x,
            {j: (members[j].c_public, members[j].s_public) for j in WANTED[x]},
            T,
            FLOOR,
            CLIP,
            n,
            total,
            members,
        )
        params_of[x] = params
        reply = site_handlers.share_keys(
            secagg_message(params_record(params), SHARE_KEYS, x), contexts[x], f"h{x}", membership[x]
        )
        out[x] = indexed_bytes_from(ok_content(reply).config_records[SECAGG])
        assert set(out[x]) == WANTED[x]

    # 3. Every site opens its inbox (all its view's neighbours' shares, all-or-nothing) and masks once.
    rng = np.random.default_rng(3)
    updates = {i: rng.normal(0, 0.02, D) for i in ids}
    masked = {}
    for x in ACTIVE:
        inbox = {j: out[j][x] for j in WANTED[x]}
        state = site_handlers.open_inbox(contexts[x], TAG, inbox, masked_rounds[x], membership[x])
        masked[x] = site_handlers.mask_opened(contexts[x], state, updates[x], f"h{x}", masked_rounds[x])

    # 4. Helpers sign "the partners dropped" (one consistent list among them) and unmask with it;
    #    V and its partners are told "nobody dropped", which needs no signature.
    everyone = list(range(1, n + 1))  # members that only advertised may be listed too: no site can tell
    star = ([i for i in everyone if i not in P], P)
    signatures = {}
    for w in W:
        reply = site_handlers.sign_survivors(
            secagg_message(unmask_request_record(TAG, *star), SIGN_SURVIVORS, w), contexts[w], f"h{w}", membership[w]
        )
        signatures[w] = signature_from(ok_content(reply).config_records[SECAGG])
    answers = {}
    for x in ACTIVE:
        request = (
            unmask_request_record(TAG, *star, signatures)
            if x in W
            else unmask_request_record(TAG, everyone, [], signatures)
        )
        reply = site_handlers.unmask(
            secagg_message(request, UNMASK, x), contexts[x], f"h{x}", revealed[x], membership[x]
        )
        answers[x] = unmask_reply_from(ok_content(reply).config_records[SECAGG])

    # 5. The server: V's self-mask seed from V and P; each partner's mask key from its 3 helpers.
    def combine(owner, kind):
        holders = sorted(h for h in answers if owner in answers[h][kind])
        rows = np.stack([_decode_share(answers[h][kind][owner]) for h in holders])
        return combine_shares(holders, rows, T, SEED_BYTES)

    vector, bound = masked[V].copy(), protocol.bound_tag_of(params_of[V])
    add_mask(vector, combine(V, 0), -1)
    s_victim_public = ads[V][live[V]].s_public
    for j in P:
        s_j = combine(j, 1)
        assert public_key_of(s_j) == ads[j][live[j]].s_public
        add_mask(vector, agree(s_j, s_victim_public, _info("mask", bound, V, j)), -1 if j > V else +1)
    grid = QuantisationGrid(CLIP, total)
    return dequantise(vector[:-1], grid, 100), updates[V], grid.step


@pytest.mark.parametrize(("n", "generations"), [(11, 4), (20, 2)])
def test_with_the_members_list_unbound_split_views_read_one_sites_update(tmp_path, monkeypatch, n, generations):
    """(11, 4): the smallest federation found; (20, 2): one re-run of the set-up already gives the server
    enough signed advertisements. The binding and the graph as they were before the second review."""
    monkeypatch.setattr(protocol, "bound_tag_of", _bound_tag_without_members)
    monkeypatch.setattr(protocol, "round_graph", _graph_seeded_in_index_order)
    recovered, truth, step = _attack(tmp_path, n, generations)
    assert np.max(np.abs(recovered - truth)) <= 2 * step
    assert np.max(np.abs(truth)) > 100 * step


@pytest.mark.parametrize(("n", "generations"), [(11, 4), (20, 2)])
def test_sites_holding_different_lists_of_members_cannot_open_each_others_shares(tmp_path, monkeypatch, n, generations):
    """The members' keys bound into every share's seal stop the attack even on the old graph, where the
    server can still find a list for each site."""
    monkeypatch.setattr(protocol, "round_graph", _graph_seeded_in_index_order)
    with pytest.raises(ShareDecryptionError):
        _attack(tmp_path, n, generations)
