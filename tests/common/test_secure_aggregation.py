"""SecAgg+ maths without Flower: quantisation error, Shamir, masks, the four steps, dropouts, refusals, and a
server that lies in the round's parameters or its list of survivors (review 17, H1 and H2)."""

from __future__ import annotations

import dataclasses
import itertools
import os

import numpy as np
import pytest

from fedtune.common.secure_aggregation import protocol
from fedtune.common.secure_aggregation.key_agreement import KeyPair, agree
from fedtune.common.secure_aggregation.masks import CHUNK, add_mask, expand_mask
from fedtune.common.secure_aggregation.neighbours import neighbour_count, neighbour_graph, reconstruction_threshold
from fedtune.common.secure_aggregation.protocol import (
    ClientRound,
    ProtocolViolation,
    SecureAggregationError,
    ServerRound,
)
from fedtune.common.secure_aggregation.quantisation import QuantisationGrid, auto_clip_range, dequantise, quantise
from fedtune.common.secure_aggregation.shamir import ShamirError, combine_shares, split_secret
from fedtune.common.secure_aggregation.share_transport import ShareDecryptionError, open_sealed, seal

TAG = b"fedtune/run/1"


def _relative_rms_error(estimate: np.ndarray, truth: np.ndarray) -> float:
    return float(np.sqrt(np.mean((estimate - truth) ** 2)) / np.sqrt(np.mean(truth**2)))


@pytest.mark.parametrize("counts", [[1, 1, 1], [1, 5000, 20000], [1] + [10_000] * 9, [7] * 50])
def test_dequantised_weighted_mean_is_within_one_grid_step_for_any_example_counts(counts):
    rng = np.random.default_rng(len(counts))
    d = 20_000
    updates = [rng.normal(0, 1e-3, d) * rng.uniform(0.1, 10) for _ in counts]
    n = sum(counts)
    grid = QuantisationGrid(clip_range=0.05, total_examples=n)
    total = np.zeros(d, dtype=np.uint64)
    for u, c in zip(updates, counts, strict=True):
        q, clipped = quantise(u, c, grid, rng)
        assert q.dtype == np.uint64 and clipped == 0
        np.add(total, q, out=total)
    truth = sum(c / n * u for u, c in zip(updates, counts, strict=True))
    mean = dequantise(total, grid, n)
    assert _relative_rms_error(mean, truth) < 1e-9
    # Stochastic rounding moves each site's value by less than one grid step, and the mean is a weighted mean.
    assert np.max(np.abs(mean - truth)) < grid.step


def test_values_beyond_the_clip_range_are_clipped_and_counted():
    grid = QuantisationGrid(clip_range=1.0, total_examples=2)
    update = np.array([0.5, -2.0, 3.0, -0.999, 1.0])
    q, clipped = quantise(update, 1, grid, np.random.default_rng(0))
    assert clipped == 2
    np.testing.assert_allclose(dequantise(q, grid, 1), [0.5, -1.0, 1.0, -0.999, 1.0], atol=2 * grid.step)


def test_the_grid_keeps_any_sum_of_the_round_inside_64_bits():
    """The largest sum a round can make (every site at the clip range, rounded up) is still a signed 64-bit value."""
    for total in (1, 2, 3, 1000, 2**22, 2**30 + 7, 2**40 - 1):
        grid = QuantisationGrid(1.0, total)
        assert total * (grid.levels + 1) < 2**63 and grid.levels >= 2**22
    rng = np.random.default_rng(0)
    grid = QuantisationGrid(1.0, 2**30 + 7)
    q1, _ = quantise(np.full(4, 5.0), 2**30, grid, rng)
    q2, _ = quantise(np.full(4, 5.0), 7, grid, rng)
    np.testing.assert_allclose(dequantise(q1 + q2, grid, 2**30 + 7), 1.0, rtol=1e-9)
    q3, _ = quantise(np.full(4, -5.0), 2**30 + 7, grid, rng)
    np.testing.assert_allclose(dequantise(q3, grid, 2**30 + 7), -1.0, rtol=1e-9)


def test_quantise_rejects_non_finite_updates_and_bad_weights():
    grid = QuantisationGrid(1.0, 2)
    with pytest.raises(ValueError, match="NaN or infinity"):
        quantise(np.array([0.0, np.nan]), 1, grid, np.random.default_rng(0))
    for weight in (0.5, 0, 3):
        with pytest.raises(ValueError, match=r"whole number in \[1, 2\]"):
            quantise(np.zeros(3), weight, grid, np.random.default_rng(0))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"total_examples must be in \[1, 2\*\*40\)"):
        QuantisationGrid(1.0, 2**40)


def test_auto_clip_range_bounds_an_adam_round():
    import torch

    param = torch.nn.Parameter(torch.zeros(1000))
    opt = torch.optim.Adam([param], lr=0.01)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):  # adversarial gradients: huge, sign-flipping, then tiny
        opt.zero_grad()
        param.grad = torch.randn(1000, generator=gen) * torch.logspace(3, -6, 1000)
        opt.step()
    assert float(param.detach().abs().max()) <= auto_clip_range("adam", 0.01, 20, 1.0)


def test_shamir_any_threshold_subset_rebuilds_the_secret_and_fewer_cannot():
    secret = os.urandom(32)
    xs = [3, 5, 8, 9, 12]
    shares = split_secret(secret, xs, threshold=3)
    for subset in itertools.combinations(range(5), 3):
        assert combine_shares([xs[i] for i in subset], shares[list(subset)], 3, 32) == secret
    with pytest.raises(ShamirError, match="2 shares cannot reconstruct a secret shared with threshold 3"):
        combine_shares(xs[:2], shares[:2], 3, 32)
    # Two shares interpolated as if they were enough give something unrelated to the secret.
    try:
        wrong = combine_shares(xs[:2], shares[:2], 2, 32)
    except ShamirError:
        wrong = None
    assert wrong != secret


def test_masks_are_aes_ctr_keystreams_and_pairwise_seeds_agree():
    a, b = KeyPair.generate(), KeyPair.generate()
    assert agree(a.private, b.public, TAG) == agree(b.private, a.public, TAG)
    assert agree(a.private, b.public, TAG) != agree(a.private, b.public, TAG + b"x")
    seed = os.urandom(32)
    long, short = expand_mask(seed, 100_000), expand_mask(seed, 10)
    assert long.dtype == np.uint64 and np.array_equal(long[:10], short)
    assert abs(long.astype(np.float64).mean() / 2**64 - 0.5) < 0.01
    # Added a chunk at a time, the mask is the same keystream, and subtracting it undoes it exactly.
    n = 3 * CHUNK + 5
    vector = np.arange(n, dtype=np.uint64)
    add_mask(vector, seed, +1)
    np.testing.assert_array_equal(vector, np.arange(n, dtype=np.uint64) + expand_mask(seed, n))
    add_mask(vector, seed, -1)
    np.testing.assert_array_equal(vector, np.arange(n, dtype=np.uint64))


def test_share_ciphertexts_are_bound_to_their_round_and_pair():
    key = os.urandom(32)
    blob = seal(key, b"share", b"round-1|1>2")
    assert open_sealed(key, blob, b"round-1|1>2") == b"share"
    for aad in (b"round-2|1>2", b"round-1|1>3"):
        with pytest.raises(ShareDecryptionError):
            open_sealed(key, blob, aad)
    with pytest.raises(ShareDecryptionError):
        open_sealed(key, blob[:-1] + bytes([blob[-1] ^ 1]), b"round-1|1>2")


@pytest.mark.parametrize("n", [3, 5, 20, 50, 100])
def test_neighbour_graph_is_symmetric_regular_and_connected(n):
    k = neighbour_count(n)
    graph = neighbour_graph(list(range(1, n + 1)), k, seed=n)
    assert all(len(v) == k and i not in v for i, v in graph.items())
    assert all(i in graph[j] for i, v in graph.items() for j in v)
    seen, frontier = {1}, [1]
    while frontier:
        frontier = [j for i in frontier for j in graph[i] if j not in seen and not seen.add(j)]
    assert len(seen) == n
    t = reconstruction_threshold(k)
    assert 2 * t > k + 1, "a strict majority of the neighbourhood is needed to rebuild a secret"


def _federation(n: int, d: int = 5_000, counts=None, min_survivors: int = 2, clip: float = 0.1):
    rng = np.random.default_rng(n)
    counts = counts or [int(c) for c in rng.integers(1, 500, n)]
    updates = {100 + i: rng.normal(0, 0.01, d).astype(np.float32) for i in range(n)}
    clients = {node: ClientRound(c) for node, c in zip(updates, counts, strict=False)}
    server = ServerRound(TAG, {node: c.advertise() for node, c in clients.items()}, clip, min_survivors, d)
    return clients, server, updates, dict(zip(updates, counts, strict=False))


def _run(clients, server, updates, drop_before_share=(), drop_before_masked=(), drop_before_unmask=()):
    params = server.share_keys_requests()
    shared = {n: clients[n].share_keys(p) for n, p in params.items() if n not in drop_before_share}
    inboxes = server.route_shares(shared)
    masked = {n: clients[n].masked_input(box, updates[n]) for n, box in inboxes.items() if n not in drop_before_masked}
    requests = server.receive_masked(masked)
    answers = {n: clients[n].unmask(*req) for n, req in requests.items() if n not in drop_before_unmask}
    return server.unmask(answers), masked


def _weighted_mean(updates, counts, nodes):
    w = np.array([counts[n] for n in nodes], dtype=np.float64)
    return sum(wi * updates[n].astype(np.float64) for wi, n in zip(w, nodes, strict=False)) / w.sum()


def test_full_round_reveals_the_weighted_mean_and_masked_vectors_look_random():
    clients, server, updates, counts = _federation(8)
    result, masked = _run(clients, server, updates)
    assert result.survivors == sorted(updates) and result.dropped == [] and result.clipped_values == 0
    assert _relative_rms_error(result.mean_update, _weighted_mean(updates, counts, sorted(updates))) < 1e-6
    for node, vector in masked.items():
        assert vector.dtype == np.uint64 and vector.shape == (5_001,), "64 bits a value, plus the clip count"
        quantised = updates[node].astype(np.float64) * counts[node]
        corr = np.corrcoef(vector[:-1].view(np.int64).astype(np.float64), quantised)[0, 1]
        assert abs(corr) < 5 / np.sqrt(5_000), f"masked vector of {node} correlates with its update ({corr:.3f})"


def test_dropouts_above_the_threshold_are_tolerated_and_named():
    clients, server, updates, counts = _federation(10)
    dropped = [101, 106, 107]
    result, _ = _run(clients, server, updates, drop_before_masked=dropped)
    survivors = [n for n in sorted(updates) if n not in dropped]
    assert result.survivors == survivors
    assert result.dropped == dropped
    assert _relative_rms_error(result.mean_update, _weighted_mean(updates, counts, survivors)) < 1e-6


def test_sites_that_do_not_share_their_keys_are_set_up_again_without():
    """Sites mask with every neighbour or not at all, so a set-up with a silent site is not routed: it
    runs again (fresh keys) among the others, and their mean comes out exact."""
    clients, server, updates, counts = _federation(10)
    dropped = [101, 106, 107]
    params = server.share_keys_requests()
    shared = {n: clients[n].share_keys(p) for n, p in params.items() if n not in dropped}
    assert server.unshared(shared) == dropped
    with pytest.raises(SecureAggregationError, match=r"nodes \[101, 106, 107\] did not share their keys"):
        server.route_shares(shared)
    rest = {n: ClientRound(counts[n]) for n in updates if n not in dropped}
    again = ServerRound(TAG, {n: c.advertise() for n, c in rest.items()}, 0.1, 2, 5_000)
    result, _ = _run(rest, again, updates)
    assert result.survivors == sorted(rest) and result.dropped == []
    assert _relative_rms_error(result.mean_update, _weighted_mean(updates, counts, sorted(rest))) < 1e-6


def test_a_site_that_vanishes_before_unmasking_is_covered_by_its_neighbours():
    clients, server, updates, counts = _federation(10)
    result, _ = _run(clients, server, updates, drop_before_unmask=[103, 104])
    # They sent masked input, so their updates are in the sum; only their share answers are missing.
    assert _relative_rms_error(result.mean_update, _weighted_mean(updates, counts, sorted(updates))) < 1e-6


def test_too_few_survivors_fails_the_round_loudly():
    clients, server, updates, _ = _federation(4, min_survivors=3)
    with pytest.raises(SecureAggregationError, match="masked input: only 2 sites remain, fewer than the 3 needed"):
        _run(clients, server, updates, drop_before_masked=[100, 101])


def test_too_few_share_answers_fails_the_round_loudly():
    clients, server, updates, _ = _federation(5)
    with pytest.raises(SecureAggregationError, match=r"unmask: only \d shares of site 10\d's"):
        _run(clients, server, updates, drop_before_unmask=[100, 101, 102])


def test_clients_refuse_what_would_reveal_an_individual_update():
    clients, server, updates, _ = _federation(4)
    params = server.share_keys_requests()
    shared = {n: clients[n].share_keys(p) for n, p in params.items()}
    inboxes = server.route_shares(shared)
    for n, box in inboxes.items():
        clients[n].masked_input(box, updates[n])
    me = clients[100]
    me_index = params[100].index
    with pytest.raises(ProtocolViolation, match="only 1 sites finished"):
        me.unmask([me_index], [])
    with pytest.raises(ProtocolViolation, match="cannot both finish and drop out"):
        me.unmask([me_index, 2, 3], [2])
    b_shares, s_shares = me.unmask([1, 2, 3, 4], [])
    assert set(b_shares) == {1, 2, 3, 4} and s_shares == {}
    with pytest.raises(ProtocolViolation, match="already released this round"):
        me.unmask([1, 2], [3, 4])


def test_clients_refuse_a_server_that_lowers_the_minimum_or_tampers_with_shares():
    clients, server, updates, _ = _federation(3)
    params = server.share_keys_requests()
    low = {**params[100].__dict__, "min_survivors": 1}
    with pytest.raises(ProtocolViolation, match="sums over 1 sites; this site requires at least 2"):
        clients[100].share_keys(type(params[100])(**low))
    shared = {n: clients[n].share_keys(p) for n, p in params.items()}
    inboxes = server.route_shares(shared)
    sender, blob = next(iter(inboxes[101].items()))
    with pytest.raises(ShareDecryptionError):
        clients[101].masked_input({**inboxes[101], sender: blob[:-1] + bytes([blob[-1] ^ 1])}, updates[101])


def test_server_rejects_a_malformed_masked_vector():
    clients, server, updates, _ = _federation(3, d=10)
    inboxes = server.route_shares({n: clients[n].share_keys(p) for n, p in server.share_keys_requests().items()})
    masked = {n: clients[n].masked_input(box, updates[n]) for n, box in inboxes.items()}
    masked[100] = masked[100].astype(np.int64)
    with pytest.raises(SecureAggregationError, match="node 100 sent a masked vector of int64"):
        server.receive_masked(masked)


# --- a server that lies in the round's parameters (review 17, H1 and H2) -----------------------


def _forge_weights(params, target: int, big: int = protocol.MAX_PARTICIPANTS):
    """H2: the target is told the honest parameters; every other site num_participants = big and
    total_examples = 2**39, which coarsens their grid 2**16 times and so shrinks their contributions as
    much (each site's own check, total >= its count, passes)."""
    return {
        n: p if n == target else dataclasses.replace(p, num_participants=big, total_examples=2**39)
        for n, p in params.items()
    }


@pytest.mark.parametrize("bound", [False, True])
def test_forged_weights_isolate_one_sites_update_only_without_the_parameter_binding(monkeypatch, bound):
    """With the round's parameters bound into every derived key, sites told different weights share no key:
    the target cannot open its neighbours' shares and refuses before masking. With the bare round tag (the
    derivation as it was, restored here) the server reads the target's exact update from the 'sum'."""
    if not bound:
        monkeypatch.setattr(protocol, "bound_round_tag", lambda round_tag, *_: round_tag)
    clients, server, updates, _ = _federation(3, d=2_000, counts=[1, 1, 1])
    if not bound:  # and the graph the server chose, taken on trust, as it was (else sites told n differ on it)
        monkeypatch.setattr(protocol, "round_graph", lambda *_: server.graph)
    target = 100
    params = _forge_weights(server.share_keys_requests(), target)
    if bound:
        # The sites told another n refuse at once (their public graph differs from what they were given);
        # with that check off too, the target could not open the others' shares.
        with pytest.raises(ProtocolViolation, match="not those of the round's public graph"):
            clients[target + 1].share_keys(params[target + 1])
        monkeypatch.setattr(protocol, "round_graph", lambda *_: server.graph)
        inboxes = server.route_shares({n: clients[n].share_keys(p) for n, p in params.items()})
        with pytest.raises(ShareDecryptionError):
            clients[target].masked_input(inboxes[target], updates[target])
        return
    inboxes = server.route_shares({n: clients[n].share_keys(p) for n, p in params.items()})
    masked = {n: clients[n].masked_input(box, updates[n]) for n, box in inboxes.items()}
    requests = server.receive_masked(masked)
    result = server.unmask({n: clients[n].unmask(*req) for n, req in requests.items()})
    estimate = result.mean_update * 3  # the server reads the target's scale, weight 1/3
    # The target's update (values ~1e-2) up to the others' shrunken ones (~1e-7 each).
    assert np.max(np.abs(estimate - updates[target])) < 1e-5, "the target's update"


def _masks_of_a_pair(params_i, params_j, d: int = 1_000) -> np.ndarray:
    """The dequantised sum of two sites' zero updates with only their pairwise masks left (self masks removed)."""
    i, j = ClientRound(1), ClientRound(1)
    pi = dataclasses.replace(params_i, index=1, neighbours={2: (j.c_keys.public, j.s_keys.public)})
    pj = dataclasses.replace(params_j, index=2, neighbours={1: (i.c_keys.public, i.s_keys.public)})
    total = np.zeros(d + 1, dtype=np.uint64)
    for site, p in ((i, pi), (j, pj)):
        site.params, site.alive = p, (3 - p.index,)
        vector = site.masked_input(None, np.zeros(d), np.random.default_rng(0))
        add_mask(vector, site.self_seed, -1)
        np.add(total, vector, out=total)
    return dequantise(total[:-1], QuantisationGrid(params_i.clip_range, params_i.total_examples), 2)


def test_sites_told_different_weights_derive_pairwise_masks_that_do_not_cancel():
    """H2 at the mask itself: the binding is in the seed derivation (once per pair), so whatever a server does
    with the shares, two sites told different totals add masks that leave the sum uniformly random."""
    _, server, _, _ = _federation(2, d=1_000, counts=[1, 1])
    honest = next(iter(server.share_keys_requests().values()))
    np.testing.assert_allclose(_masks_of_a_pair(honest, honest), 0.0, atol=1e-6)
    forged = dataclasses.replace(honest, num_participants=2**20 - 1, total_examples=2**20 - 1)
    garbage = _masks_of_a_pair(honest, forged)
    assert np.mean(np.abs(garbage) > honest.clip_range / 10) > 0.5, "the masks no longer cancel"


def test_clients_refuse_a_round_they_could_never_unmask_or_indices_that_do_not_exist():
    clients, server, updates, _ = _federation(4)
    params = server.share_keys_requests()
    p = params[100]
    with pytest.raises(ProtocolViolation, match="a minimum of 5 sites in a round of 4"):
        ClientRound(1).share_keys(dataclasses.replace(p, min_survivors=5))
    with pytest.raises(ProtocolViolation, match=r"site indices outside 1\.\.4"):
        ClientRound(1).share_keys(dataclasses.replace(p, neighbours={**p.neighbours, 9: (b"x" * 32, b"y" * 32)}))
    with pytest.raises(ProtocolViolation, match="can vouch only for itself and them, fewer than its min_aggreg"):
        ClientRound(1, min_survivors_floor=5).share_keys(dataclasses.replace(p, min_survivors=5, num_participants=9))
    shared = {n: clients[n].share_keys(q) for n, q in params.items()}
    for n, box in server.route_shares(shared).items():
        clients[n].masked_input(box, updates[n])
    with pytest.raises(ProtocolViolation, match=r"listed outside 1\.\.4"):
        clients[100].unmask([1, 2, 3, 4, 5], [])
    with pytest.raises(ProtocolViolation, match=r"listed outside 1\.\.4"):
        clients[100].unmask([1, 2, 3], [0])


def test_on_a_sparse_graph_a_site_vouches_only_for_its_neighbours():
    """40 sites, 14 neighbours each: a site whose floor is its whole neighbourhood (15) unmasks when all finish,
    and refuses when one neighbour is missing from the list, however many other sites are listed."""
    floor = neighbour_count(40) + 1
    clients, server, updates, _ = _federation(40, d=50, min_survivors=floor)
    for c in clients.values():
        c.min_survivors_floor = floor
    result, _ = _run(clients, server, updates)
    assert len(result.survivors) == 40
    clients, server, updates, _ = _federation(40, d=50, min_survivors=floor)
    params = server.share_keys_requests()
    me = clients[100]
    me.min_survivors_floor = floor
    shared = {n: clients[n].share_keys(q) for n, q in params.items()}
    for n, box in server.route_shares(shared).items():
        clients[n].masked_input(box, updates[n])
    neighbour = sorted(params[100].neighbours)[0]
    others = [i for i in range(1, 41) if i != neighbour]  # one neighbour listed as neither finished nor dropped
    with pytest.raises(ProtocolViolation, match=f"only {floor - 1} sites finished among those this site can vouch"):
        me.unmask(others, [])
    with pytest.raises(ProtocolViolation, match="it would never unmask. Raise secure_aggregation.neighbours"):
        ClientRound(1, min_survivors_floor=floor + 1).share_keys(
            dataclasses.replace(params[101], min_survivors=floor + 1)
        )
