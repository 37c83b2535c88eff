"""A server that passes a site only some of its neighbours' shares (a review of issue 15 on sparse graphs).

Found by a red-team review after the roster, the public graph, the group check and the signed
survivor lists were in place; no site colludes. A site masked with the neighbours whose share
ciphertexts the server passed on (at least ``threshold - 1`` of them), while every check at the
unmask step reads the public graph. So the server passes the victim V the shares of only a set A
of k/2 neighbours, taken from both ends of V's stretch of the public ring (so that A's members are
seldom each other's neighbours), and tells everyone one consistent list: "A dropped". In the public
graph V still has neighbours, so every check passes; every site but V and A signs and unmasks with
a neighbourhood majority of signatures, which gives the server the mask key of each site in A and
k/2 shares of V's self-mask seed; one site of A, told that nobody dropped, gives the last seed
share. With V's seed and the keys of everyone V masked with, V's update comes out.

Now a site masks with every neighbour of the public graph or not at all (the server sets the round
up again without a site that did not share its keys), and a site that signed a list unmasks under
no other.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pytest

from fedtune.common.roster import Roster
from fedtune.common.secure_aggregation.key_agreement import agree
from fedtune.common.secure_aggregation.masks import add_mask
from fedtune.common.secure_aggregation.neighbours import smallest_group
from fedtune.common.secure_aggregation.protocol import (
    ClientRound,
    ProtocolViolation,
    ServerRound,
    _info,
    bound_tag_of,
    round_ring,
)
from fedtune.common.secure_aggregation.quantisation import QuantisationGrid, dequantise
from fedtune.common.secure_aggregation.share_transport import associated_data, open_sealed
from fedtune.common.site_identity import SiteIdentity

TAG = b"fedtune/withheld/1"
D, CLIP = 200, 0.1


def _receive_some_shares(self: ClientRound, ciphertexts: Mapping[int, bytes]) -> None:
    """ClientRound.receive_shares before the fix: any ``threshold - 1`` neighbours' shares would do,
    and the site masked with those."""
    p = self.params
    assert p is not None
    if len(ciphertexts) + 1 < p.threshold:
        raise ProtocolViolation("threshold could never be met")
    tag = bound_tag_of(p)
    for j, blob in ciphertexts.items():
        key = agree(self.c_keys.private, p.neighbours[j][0], _info("share", tag, j, p.index))
        plaintext = open_sealed(key, blob, associated_data(tag, j, p.index))
        self.held_shares[j] = (plaintext[: len(plaintext) // 2], plaintext[len(plaintext) // 2 :])
    self.alive = tuple(sorted(ciphertexts))


def _federation(n: int, k: int, floor: int):
    ids = {i: SiteIdentity.generate(f"h{i}") for i in range(1, n + 1)}
    roster = Roster("hospitals", {x.member: x.public for x in ids.values()}, min_aggregation_sites=floor)
    sites = {i: ClientRound(100, roster=roster, identity=ids[i]) for i in range(1, n + 1)}
    server = ServerRound(TAG, {i: s.advertise(TAG) for i, s in sites.items()}, CLIP, floor, D, neighbours=k)
    params = server.share_keys_requests()
    assert len(params[1].neighbours) == k < n - 1, "a sparse graph"
    inboxes = server.route_shares({i: sites[i].share_keys(p) for i, p in params.items()})
    ring = round_ring(TAG, k, n, server.members)
    victim, h = ring[0], k // 2
    # A: h neighbours from the two far ends of the victim's window on the ring.
    left = h // 2
    withheld_from = {ring[(-h + i) % n] for i in range(left)} | {ring[(h - i) % n] for i in range(h - left)}
    assert len(withheld_from) == h and withheld_from <= set(server.graph[victim])
    return sites, server, inboxes, victim, withheld_from


def _attack(n: int, k: int, floor: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Run the attack; returns (what the server recovers of the victim's update, the update, the grid step)."""
    sites, server, inboxes, victim, a = _federation(n, k, floor)
    inboxes[victim] = {j: c for j, c in inboxes[victim].items() if j in a}
    rng = np.random.default_rng(5)
    updates = {i: rng.normal(0, 0.02, D) for i in sites}
    masked = {i: sites[i].masked_input(inboxes[i], updates[i]) for i in sites}
    server.receive_masked(masked)
    everyone = list(range(1, n + 1))
    story = (sorted(set(everyone) - a), sorted(a))
    assert smallest_group(server.graph, story[0]) >= floor, "in the public graph the victim is not cut off"
    signers = [i for i in everyone if i != victim and i not in a]
    signatures = {i: sites[i].sign_survivors(*story) for i in signers}
    answers = {i: sites[i].unmask(*story, signatures) for i in signers}
    answers[min(a)] = sites[min(a)].unmask(everyone, [])  # self-mask seed shares only: no signature asked
    vector = masked[victim].copy()
    add_mask(vector, server._combine(victim, 0, answers), -1)
    for j in sorted(a):
        seed = agree(
            server._combine(j, 1, answers), server.ads[victim].s_public, _info("mask", server.bound_tag, victim, j)
        )
        add_mask(vector, seed, -1 if victim < j else +1)
    grid = QuantisationGrid(CLIP, server.total_examples)
    return dequantise(vector[:-1], grid, server.ads[victim].num_examples), updates[victim], grid.step


@pytest.mark.parametrize(("n", "k", "floor"), [(7, 4, 2), (40, 14, 8)])
def test_with_shares_held_back_the_server_read_one_sites_update_before_the_fix(monkeypatch, n, k, floor):
    monkeypatch.setattr(ClientRound, "receive_shares", _receive_some_shares)
    recovered, truth, step = _attack(n, k, floor)
    assert np.max(np.abs(recovered - truth)) <= 2 * step
    assert np.max(np.abs(truth)) > 100 * step


@pytest.mark.parametrize(("n", "k", "floor"), [(7, 4, 2), (40, 14, 8)])
def test_a_site_refuses_to_mask_without_every_neighbours_shares(n, k, floor):
    with pytest.raises(ProtocolViolation, match=r"shares arrived from \d+ of this site's \d+ neighbours"):
        _attack(n, k, floor)


def test_a_site_that_signed_a_list_unmasks_under_no_other():
    """The last seed share of the attack came from a site told "nobody dropped"; had it signed "A
    dropped" first (as the others did), it now refuses."""
    sites, server, inboxes, victim, a = _federation(20, 4, 3)
    rng = np.random.default_rng(6)
    server.receive_masked({i: sites[i].masked_input(inboxes[i], rng.normal(0, 0.02, D)) for i in sites})
    everyone = list(range(1, 21))
    signer = min(a)
    sites[signer].sign_survivors(sorted(set(everyone) - {victim}), [victim])
    with pytest.raises(ProtocolViolation, match="other than the one this site signed"):
        sites[signer].unmask(everyone, [])
    assert not sites[signer].unmasked
