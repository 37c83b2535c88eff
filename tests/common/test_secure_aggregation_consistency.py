"""A server that tells sites different stories about who dropped (issue 15, attack 2).

Five sites; the server tells each of the victim's neighbours "you and the victim finished, the others
dropped". Each then releases the victim's self-mask share and the others' mask-key shares: enough to
strip every mask off the victim's vector. Without a roster (today's protocol, no consistency step)
the victim's update comes out exactly; with one, a site reveals a dropped neighbour's mask key only
when a majority of its neighbourhood signed the very list it signed, and every site refuses.
"""

from __future__ import annotations

import numpy as np
import pytest

from fedtune.common.roster import Roster
from fedtune.common.secure_aggregation.key_agreement import agree
from fedtune.common.secure_aggregation.masks import add_mask
from fedtune.common.secure_aggregation.protocol import (
    ClientRound,
    ProtocolViolation,
    ServerRound,
    _info,
)
from fedtune.common.secure_aggregation.quantisation import QuantisationGrid, dequantise
from fedtune.common.site_identity import SiteIdentity

TAG = b"fedtune/run/7"
D, CLIP, N = 1_000, 0.1, 5


def _sites(roster: bool) -> dict[int, ClientRound]:
    if not roster:
        return {i: ClientRound(100) for i in range(1, N + 1)}
    ids = {i: SiteIdentity.generate(f"h{i}") for i in range(1, N + 1)}
    r = Roster("hospitals", {x.member: x.public for x in ids.values()})
    return {i: ClientRound(100, roster=r, identity=ids[i]) for i in range(1, N + 1)}


def _masked_round(sites):
    server = ServerRound(TAG, {i: s.advertise(TAG) for i, s in sites.items()}, CLIP, 2, D)
    params = server.share_keys_requests()
    inboxes = server.route_shares({i: sites[i].share_keys(p) for i, p in params.items()})
    rng = np.random.default_rng(3)
    updates = {i: rng.normal(0, 0.01, D) for i in sites}
    masked = {i: sites[i].masked_input(box, updates[i]) for i, box in inboxes.items()}
    server.receive_masked(masked)
    return server, masked, updates


def _strip_victim(server: ServerRound, masked, answers, victim: int) -> np.ndarray:
    """The victim's update from its masked vector, its self-mask seed and its neighbours' mask keys."""
    vector = masked[victim].copy()
    add_mask(vector, server._combine(victim, 0, answers), -1)
    tag = server.bound_tag
    for j in server.graph[victim]:
        seed = agree(server._combine(j, 1, answers), server.ads[victim].s_public, _info("mask", tag, victim, j))
        add_mask(vector, seed, -1 if victim < j else +1)
    return dequantise(vector[:-1], QuantisationGrid(CLIP, server.total_examples), server.ads[victim].num_examples)


def _stories(victim: int) -> dict[int, tuple[list[int], list[int]]]:
    """Each neighbour h is told: h and the victim finished, everyone else dropped."""
    others = [i for i in range(1, N + 1) if i != victim]
    return {h: ([victim, h], [j for j in others if j != h]) for h in others}


def test_without_a_roster_different_stories_reveal_the_victims_update_exactly():
    sites = _sites(roster=False)
    server, masked, updates = _masked_round(sites)
    answers = {h: sites[h].unmask(*story) for h, story in _stories(1).items()}
    np.testing.assert_allclose(_strip_victim(server, masked, answers, 1), updates[1], atol=1e-6)


def test_with_a_roster_no_site_reveals_a_mask_key_for_a_story_its_neighbourhood_did_not_sign():
    sites = _sites(roster=True)
    server, masked, _ = _masked_round(sites)
    stories = _stories(1)
    signatures = {h: sites[h].sign_survivors(*story) for h, story in stories.items()}
    for h, story in stories.items():
        with pytest.raises(ProtocolViolation, match="only 1 of this site's neighbourhood signed the same list"):
            sites[h].unmask(*story, signatures)
        with pytest.raises(ProtocolViolation, match="other than the one this site signed"):
            _unsigned(sites[h], h)
    assert not any(s.unmasked for s in sites.values()), "nothing was revealed"


def _unsigned(site: ClientRound, h: int) -> None:
    survivors = [1, h] + [j for j in range(2, N + 1) if j != h][:1]
    site.unmask(survivors, [j for j in range(2, N + 1) if j not in survivors])


def test_a_site_signs_one_list_a_round():
    sites = _sites(roster=True)
    _masked_round(sites)
    sites[2].sign_survivors([1, 2, 3, 4], [5])
    sites[2].sign_survivors([1, 2, 3, 4], [5])  # the same list again: the same answer
    with pytest.raises(ProtocolViolation, match="already signed another list of survivors"):
        sites[2].sign_survivors([1, 2, 3], [4, 5])


def test_with_a_roster_an_honest_round_with_a_dropout_collects_signatures_and_unmasks_exactly():
    sites = _sites(roster=True)
    server = ServerRound(TAG, {i: s.advertise(TAG) for i, s in sites.items()}, CLIP, 2, D)
    params = server.share_keys_requests()
    inboxes = server.route_shares({i: sites[i].share_keys(p) for i, p in params.items()})
    rng = np.random.default_rng(4)
    updates = {i: rng.normal(0, 0.01, D) for i in sites}
    masked = {i: sites[i].masked_input(box, updates[i]) for i, box in inboxes.items() if i != 5}  # 5 drops
    requests = server.receive_masked(masked)
    assert server.needs_survivor_signatures
    signatures = server.signatures_by_index({i: sites[i].sign_survivors(*req) for i, req in requests.items()})
    result = server.unmask({i: sites[i].unmask(*req, signatures) for i, req in requests.items()})
    truth = sum(updates[i] for i in range(1, 5)) / 4
    np.testing.assert_allclose(result.mean_update, truth, atol=1e-6)
    assert result.dropped == [5]
