"""The neighbour graph comes from the round's public data, not from the server (issue 15, attack 3), and a
site reveals nothing when the survivors fall apart into a group below its floor."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from fedtune.common.roster import Roster
from fedtune.common.secure_aggregation import protocol
from fedtune.common.secure_aggregation.neighbours import public_graph, public_ring, smallest_group
from fedtune.common.secure_aggregation.protocol import (
    ClientRound,
    ProtocolViolation,
    ServerRound,
    round_graph,
    round_ring,
)
from fedtune.common.site_identity import SiteIdentity

TAG = b"fedtune/run/1"
D = 50


def _round(n: int, floor: int = 2, min_survivors: int = 2):
    sites = {i: ClientRound(10, min_survivors_floor=floor) for i in range(1, n + 1)}
    server = ServerRound(TAG, {i: s.advertise() for i, s in sites.items()}, 0.1, min_survivors, D)
    return sites, server, server.share_keys_requests()


def test_smallest_group_counts_connected_survivors():
    ring = {1: (2, 4), 2: (1, 3), 3: (2, 4), 4: (3, 1)}
    assert smallest_group(ring, [1, 2, 3, 4]) == 4
    assert smallest_group(ring, [1, 2, 4]) == 3
    assert smallest_group(ring, [1, 3]) == 1  # 2 and 4 gone: 1 and 3 are each alone


def test_every_site_recomputes_the_servers_graph_and_refuses_one_the_server_chose():
    sites, _, params = _round(12)
    k = len(params[1].neighbours)
    assert k < 11, "a sparse graph"
    outsider = min(set(range(2, 13)) - set(params[1].neighbours))
    swapped = sorted(params[1].neighbours)[1:] + [outsider]  # still k neighbours, one of the server's choosing
    forged = dataclasses.replace(
        params[1], neighbours={j: (sites[j].c_keys.public, sites[j].s_keys.public) for j in swapped}
    )
    with pytest.raises(ProtocolViolation, match="not those of the round's public graph"):
        sites[1].share_keys(forged)
    for i, s in sites.items():
        s.share_keys(params[i])  # the server's own graph is the public one: every site accepts it


def test_a_site_refuses_to_unmask_when_dropouts_cut_the_survivors_into_a_group_below_its_floor():
    """40 sites, 14 neighbours: dropping the 7 ring positions on each side of 8 sites cuts those 8 off. A site
    in the larger part, which can vouch for plenty of finished neighbours, still refuses at floor 10."""
    n, floor = 40, 10
    sites, server, params = _round(n, floor=floor, min_survivors=floor)
    inboxes = server.route_shares({i: sites[i].share_keys(p) for i, p in params.items()})
    rng = np.random.default_rng(0)
    masked = {i: sites[i].masked_input(box, rng.normal(0, 0.01, D)) for i, box in inboxes.items()}
    p = params[1]
    ring = round_ring(p.round_tag, len(p.neighbours), n, {})
    graph = round_graph(p.round_tag, len(p.neighbours), n, {})
    assert graph == server.graph
    group, dropped = ring[10:18], ring[3:10] + ring[18:25]
    survivors = sorted(set(range(1, n + 1)) - set(dropped))
    assert smallest_group(graph, survivors) == len(group) == 8
    big_side = [i for i in survivors if i not in group]
    site = next(i for i in big_side if len(set(graph[i]) & set(survivors)) + 1 >= floor)
    assert masked[site] is not None
    with pytest.raises(ProtocolViolation, match="the smallest of 8 sites"):
        sites[site].unmask(survivors, sorted(dropped))
    # With every other site finished the same site answers.
    fresh, server2, params2 = _round(n, floor=floor, min_survivors=floor)
    inboxes2 = server2.route_shares({i: fresh[i].share_keys(q) for i, q in params2.items()})
    for i, box in inboxes2.items():
        fresh[i].masked_input(box, np.zeros(D))
    fresh[1].unmask(list(range(1, n + 1)), [])


def test_the_server_cannot_redraw_the_graph_by_nudging_the_clip_range():
    """A second review placed four chosen sites around a victim (20 sites, degree 4) by moving the clip range
    a few units in its last place while the round's bound parameters seeded the graph (the old seed, rebuilt
    here, gives a new graph each time); now the graph stays the same."""
    ids = {i: SiteIdentity.generate(f"h{i}") for i in range(1, 21)}
    roster = Roster("hospitals", {x.member: x.public for x in ids.values()}, min_aggregation_sites=3)
    ads = {i: ClientRound(100, roster=roster, identity=ids[i]).advertise(TAG) for i in ids}
    old, now, clip = set(), set(), 0.1
    for _ in range(20):
        server = ServerRound(TAG, ads, clip, 3, 10, neighbours=4, threshold_fraction=0.67)
        signatures = b"".join(server.members[i].signature for i in sorted(server.members))
        old_seed = protocol.bound_round_tag(TAG, server.threshold, 3, clip, 20, server.total_examples) + signatures
        old.add(tuple(sorted(public_graph(20, 4, old_seed).items())))
        now.add(tuple(sorted(server.graph.items())))
        clip = float(np.nextafter(clip, 1.0))
    assert len(old) == 20 and len(now) == 1


def test_renumbering_or_leaving_out_members_moves_no_one_else_on_the_ring():
    """A third review picked a victim's whole neighbourhood of 12 among 20 members by renumbering them, while
    the signatures were hashed in index order (rebuilt here: every numbering gives another ring). Each member
    now sits at the hash of its own signature: the ring of names is the same whatever the numbering, and
    leaving a member out takes only that member off it."""
    ids = {f"h{i:02d}": SiteIdentity.generate(f"h{i:02d}") for i in range(20)}
    roster = Roster("hospitals", {m: x.public for m, x in ids.items()})
    keys = {m: ClientRound(100, roster=roster, identity=x).advertise(TAG).signed_keys for m, x in ids.items()}

    def ring_of_names(order: list[str], place) -> list[str]:
        members = {i + 1: keys[m] for i, m in enumerate(order)}
        ring = [order[i - 1] for i in place(TAG, 12, len(order), members)]
        start = ring.index(min(ring))
        return ring[start:] + ring[:start]

    def index_order_ring(tag, k, n, members):
        seed = tag + f"|k:{k}|".encode() + b"".join(members[i].signature for i in sorted(members))
        return public_ring(n, seed)

    names = sorted(keys)
    shuffled = names[::-1]
    assert ring_of_names(names, round_ring) == ring_of_names(shuffled, round_ring)
    assert ring_of_names(names, index_order_ring) != ring_of_names(shuffled, index_order_ring)
    without = [m for m in names if m != "h07"]
    assert ring_of_names(without, round_ring) == [m for m in ring_of_names(names, round_ring) if m != "h07"]
