"""Sites that collude with a deviating operator: the threshold's margin (a review of issue 15).

With c colluding neighbours, a server that tells some of the victim's neighbours "nobody dropped"
and the others "the victim dropped" (one consistent, signed list) collects t shares of the victim's
self-mask seed and t of its mask key whenever 2t <= k + 1 + c. At the default bare-majority
threshold one colluder is enough; a threshold of two thirds withstands it.
"""

from __future__ import annotations

import numpy as np
import pytest

from fedtune.common.roster import Roster
from fedtune.common.secure_aggregation.key_agreement import agree
from fedtune.common.secure_aggregation.masks import add_mask
from fedtune.common.secure_aggregation.protocol import (
    ClientRound,
    SecureAggregationError,
    ServerRound,
    _info,
    round_ring,
)
from fedtune.common.secure_aggregation.quantisation import QuantisationGrid, dequantise
from fedtune.common.secure_aggregation.signed_keys import survivors_message
from fedtune.common.site_identity import SiteIdentity

TAG = b"fedtune/colluders/1"
D, CLIP, N, K = 200, 0.1, 20, 4


def _attack_with_one_colluder(threshold_fraction: float) -> tuple[np.ndarray, np.ndarray, float]:
    ids = {i: SiteIdentity.generate(f"h{i}") for i in range(1, N + 1)}
    roster = Roster("hospitals", {x.member: x.public for x in ids.values()})
    sites = {i: ClientRound(100, roster=roster, identity=ids[i]) for i in range(1, N + 1)}
    ads = {i: s.advertise(TAG) for i, s in sites.items()}
    server = ServerRound(TAG, ads, CLIP, 2, D, neighbours=K, threshold_fraction=threshold_fraction)
    params = server.share_keys_requests()
    ring = round_ring(TAG, K, N, server.members)
    victim, colluder, h = ring[0], ring[-1], K // 2
    inboxes = server.route_shares({i: sites[i].share_keys(p) for i, p in params.items()})
    rng = np.random.default_rng(6)
    updates = {i: rng.normal(0, 0.02, D) for i in sites}
    masked = {i: sites[i].masked_input(inboxes[i], updates[i]) for i in sites}
    server.receive_masked(masked)
    everyone = list(range(1, N + 1))
    victim_dropped = ([i for i in everyone if i != victim], [victim])
    told_nobody_dropped = [victim, *(ring[-p] for p in range(2, h + 1))]
    told_victim_dropped = [ring[p] for p in range(1, h + 1)]
    honest = [i for i in everyone if i not in (colluder, *told_nobody_dropped)]
    signatures = {i: sites[i].sign_survivors(*victim_dropped) for i in honest}
    signatures[colluder] = ids[colluder].sign(survivors_message(server.bound_tag, *victim_dropped))
    answers = {i: sites[i].unmask(everyone, []) for i in told_nobody_dropped}
    answers.update({i: sites[i].unmask(*victim_dropped, signatures) for i in told_victim_dropped})
    seed_share, key_share = sites[colluder].held_shares[victim]
    answers[colluder] = ({victim: seed_share}, {victim: key_share})  # a colluder hands over both

    vector = masked[victim].copy()
    add_mask(vector, server._combine(victim, 0, answers), -1)
    s_victim = server._combine(victim, 1, answers)
    for j in server.graph[victim]:
        seed = agree(s_victim, server.ads[j].s_public, _info("mask", server.bound_tag, victim, j))
        add_mask(vector, seed, -1 if victim < j else +1)
    grid = QuantisationGrid(CLIP, server.total_examples)
    return dequantise(vector[:-1], grid, server.ads[victim].num_examples), updates[victim], grid.step


def test_at_a_bare_majority_one_colluding_neighbour_lets_the_server_read_a_site():
    recovered, truth, step = _attack_with_one_colluder(0.5)  # t = 3 of 5: 2t = 6 = k + 1 + c
    assert np.max(np.abs(recovered - truth)) <= 2 * step
    assert np.max(np.abs(truth)) > 100 * step


def test_a_two_thirds_threshold_withstands_it():
    with pytest.raises(SecureAggregationError, match="shares of site .* came back, 4 are needed"):
        _attack_with_one_colluder(2 / 3)  # t = 4 of 5: 2t = 8 > k + 1 + c = 6
