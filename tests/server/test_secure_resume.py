"""A server killed during a secure round, then resumed: what the round's record says.

The resumed server sets the round up again with fresh keys, and the sites would replay the
very updates they sent. A site sends a masked input for a round at most once
(``client.revealed_rounds.MaskedRounds``, on its disk): the sites that had sent theirs before
the server died refuse to mask the round again, before any training, so every masked input
the server ever holds for the round belongs to one attempt and no two sums share an update.
A round cut short after its masked inputs were sent therefore fails when resumed (the last
test shows the two-sum attack this stops); one cut short during training completes from the
sites that had not sent theirs yet. The sites are real ClientApps' SecAgg+ handlers served
in this process (tests/secure_sites.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from fedtune.client import secure_aggregation
from fedtune.client.revealed_rounds import AlreadyMasked
from fedtune.common.secure_aggregation.protocol import ALREADY_MASKED, SecureAggregationError, SecureSum
from fedtune.common.secure_aggregation.records import round_tag, unmask_reply_from
from fedtune.common.wire import SECAGG
from fedtune.server.secure_rounds import (
    UNMASK_STEP,
    completed_round,
    failed_round,
    finish_round,
    set_up_round,
)
from tests.secure_sites import EXAMPLES, NODES, SETTINGS, Sites, random_updates, weighted_mean

pytestmark = pytest.mark.usefixtures("server_identity")

TAG = round_tag("run", 4)


class ServerKilled(Exception):
    """The server process dies in the middle of an exchange."""


def killed_during_unmask(
    sites: Sites, updates: dict[int, np.ndarray], answering: Sequence[int], setting_up: Sequence[int] | None = None
) -> SecureSum | SecureAggregationError:
    """Round TAG set up by ``setting_up`` (all sites by default) and trained; the server dies once
    the ``answering`` sites have answered its unmask request. Returns what a server that had kept
    those answers could compute from them: the round's sum, or why it cannot."""
    kept = {}

    def deliver(grid, requests, step, timeout):
        if step != UNMASK_STEP:
            return sites.deliver(grid, requests, step, timeout)
        reached = [r for r in requests if r.metadata.dst_node_id in answering]
        for request, reply in zip(reached, sites.deliver(grid, reached, step, timeout), strict=True):
            kept[request.metadata.dst_node_id] = unmask_reply_from(reply.content.config_records[SECAGG])
        raise ServerKilled

    exchange = sites.exchange()
    exchange.send = deliver
    prepared = set_up_round(exchange, TAG, setting_up or sites.nodes, SETTINGS)
    masked = {
        n: secure_aggregation.mask_update(
            sites.contexts[n], TAG, prepared.inboxes[n], updates[n], f"site-{n}", sites.masked_for(n)
        )
        for n in prepared.nodes
    }
    if sites.mask_once:
        assert all(sites.masked[n].tags() == {TAG.hex()} for n in prepared.nodes), "claimed before the vector left"
    with pytest.raises(ServerKilled):
        finish_round(exchange, prepared, masked, SETTINGS)
    assert all(sites.revealed[n].tags() == {TAG.hex()} for n in answering), "claimed before the shares left"
    try:
        return prepared.server.unmask(kept)
    except SecureAggregationError as exc:
        return exc


def resumed(
    sites: Sites, updates: dict[int, np.ndarray], setting_up: Sequence[int] | None = None, lost: Sequence[int] = ()
) -> tuple[str, dict, SecureSum | None]:
    """The resumed server runs round TAG again: the sites that already sent a masked input for it
    refuse (as their train handler does, before training), the others replay or send their
    updates, and the ``lost`` sites' unmask answers never arrive. Returns the round's status and
    record, as ``metrics.jsonl`` gets them, and its sum if any."""

    def deliver(grid, requests, step, timeout):
        replies = sites.deliver(grid, requests, step, timeout)
        return [r for r in replies if step != UNMASK_STEP or r.metadata.src_node_id not in lost]

    exchange = sites.exchange()
    exchange.send = deliver
    prepared = set_up_round(exchange, TAG, setting_up or sites.nodes, SETTINGS)
    masked = {}
    for n in prepared.nodes:
        try:
            masked[n] = secure_aggregation.mask_update(
                sites.contexts[n], TAG, prepared.inboxes[n], updates[n], f"site-{n}", sites.masked_for(n)
            )
        except AlreadyMasked as exc:  # the site's refusal, as the server records it
            exchange.drop(n, "train (masked input)", str(exc))
    try:
        result, _ = finish_round(exchange, prepared, masked, SETTINGS)
    except SecureAggregationError as exc:
        return (*failed_round(exchange, exc), None)
    return (*completed_round(exchange, result), result)


def killed_during_training(sites: Sites, updates: dict[int, np.ndarray], masking: Sequence[int]) -> None:
    """Round TAG set up by every site; the server dies once the ``masking`` sites have sent their
    masked inputs, before the others were asked to train."""
    prepared = set_up_round(sites.exchange(), TAG, sites.nodes, SETTINGS)
    for n in masking:
        secure_aggregation.mask_update(
            sites.contexts[n], TAG, prepared.inboxes[n], updates[n], f"site-{n}", sites.masked_for(n)
        )


@pytest.mark.parametrize("answering", [[11], [11, 12], NODES])
def test_a_round_whose_masked_inputs_were_sent_fails_when_resumed_and_reveals_nothing_new(tmp_path, answering):
    sites, updates = Sites(tmp_path), random_updates()
    first = killed_during_unmask(sites, updates, answering)
    if len(answering) == 1:
        assert isinstance(first, SecureAggregationError), "one share of three: the first attempt revealed nothing"
    else:  # enough shares had reached the server: the round's sum may be known already
        assert isinstance(first, SecureSum)
        assert np.max(np.abs(first.mean_update - weighted_mean(updates, NODES))) < 1e-6

    status, record, result = resumed(sites, updates)
    assert result is None
    assert status.startswith("failed: secure aggregation: ")
    assert status.endswith(
        "; site-11, site-12, site-13 had already sent their masked update for this round before the server "
        "restarted and refused to mask it again"
    ), status
    # No site masked the round a second time: no masked input, no unmask request, no second sum.
    assert sorted(record["dropped"]) == ["site-11", "site-12", "site-13"]
    assert all(r.startswith(f"train (masked input): {ALREADY_MASKED} for {TAG!r}") for r in record["dropped"].values())
    assert record["absent-at-unmask"] == {}
    assert all(sites.masked[n].tags() == {TAG.hex()} for n in NODES)


def test_a_round_cut_short_during_training_completes_from_the_sites_that_had_not_masked(tmp_path):
    sites, updates = Sites(tmp_path), random_updates()
    killed_during_training(sites, updates, masking=[11])
    sites.restart()  # the sites keep only what is on disk
    status, record, result = resumed(sites, updates)
    assert status == (
        "aggregated 2 sites securely; site-11 had already sent its masked update for this round before the "
        "server restarted and refused to mask it again"
    )
    assert record["survivors"] == ["site-12", "site-13"]  # site-11's masked input is in no sum
    assert list(record["dropped"]) == ["site-11"] and record["absent-at-unmask"] == {}
    assert result is not None
    assert np.max(np.abs(result.mean_update - weighted_mean(updates, [12, 13]))) < 1e-6


def test_a_dropout_at_unmask_is_not_listed_as_dropped_from_the_sum(tmp_path):
    """A survivor that fails the unmask step for another reason: its input is in the sum all the same."""
    sites, updates = Sites(tmp_path), random_updates()
    status, record, result = resumed(sites, updates, lost=[13])
    assert status == (
        "aggregated 3 sites securely; site-13 did not answer the unmask step; the other sites' shares sufficed"
    )
    assert record["survivors"] == ["site-11", "site-12", "site-13"] and record["dropped"] == {}
    assert record["absent-at-unmask"] == {"site-13": "no reply before secure_aggregation.stage_timeout_s"}
    assert result is not None and np.max(np.abs(result.mean_update - weighted_mean(updates, NODES))) < 1e-6


@pytest.mark.parametrize("mask_once", [False, True], ids=["without-the-masked-record", "with-it"])
def test_a_resumed_round_set_up_by_other_sites_reveals_no_second_sum(tmp_path, mask_once):
    """Different sites set the two attempts up. Without the masked-rounds record (the revealed-rounds
    one alone), a server that kept the first attempt's unmask answers unmasks both attempts, and
    their difference involves only two sites' updates. With it, sites 11 and 12 refuse to mask
    the second attempt, site 14's input alone is too few, and there is no second sum."""
    sites = Sites(tmp_path, nodes=[11, 12, 13, 14], mask_once=mask_once)
    updates = random_updates(nodes=sites.nodes)
    # Site 14 is away while the round is set up; sites 11 and 13 answer the unmask request: 2 of 3 is enough.
    first = killed_during_unmask(sites, updates, answering=[11, 13], setting_up=[11, 12, 13])
    assert isinstance(first, SecureSum)
    # Resumed while site 13 is away: site 11 refuses to unmask, sites 12 and 14 answer: 2 of 3 again.
    status, record, second = resumed(sites, updates, setting_up=[11, 12, 14])
    if not mask_once:
        assert second is not None, "the attack needs the second sum"
        difference = first.mean_update * sum(EXAMPLES[n] for n in (11, 12, 13)) - second.mean_update * sum(
            EXAMPLES[n] for n in (11, 12, 14)
        )
        exposed = EXAMPLES[13] * updates[13] - EXAMPLES[14] * updates[14]
        assert np.max(np.abs(difference - exposed)) < 1e-5, "what the two sums give away"
        return
    assert second is None, "a second sum of round 4's updates was revealed"
    assert status.startswith("failed: secure aggregation: ")
    assert status.endswith(
        "; site-11, site-12 had already sent their masked update for this round before the server restarted "
        "and refused to mask it again"
    ), status
    assert sorted(record["dropped"]) == ["site-11", "site-12"]
    assert record["absent-at-unmask"] == {}, "no unmask request went out"
    assert sites.revealed[12].tags() == set() and sites.revealed[14].tags() == set()
