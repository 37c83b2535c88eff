"""The server's secure rounds against real sites' handlers: a malformed reply drops that site, it
never stops the server, and the steady round carries the next round's set-up."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message

from fedtune.client import secure_aggregation
from fedtune.common.secure_aggregation import records
from fedtune.common.secure_aggregation.records import round_tag
from fedtune.common.wire import SECAGG
from fedtune.server.secure_rounds import finish_round, set_up_round
from tests.secure_sites import NODES, SETTINGS, Sites, random_updates, secure_round, weighted_mean

pytestmark = pytest.mark.usefixtures("server_identity")


def corrupt(node: int, message_type: str, field: str):
    """A Flower mod: ``node``'s reply to ``message_type`` has one field of its secagg record cut short."""

    def mod(msg: Message, context, call_next) -> Message:
        reply = call_next(msg, context)
        if context.node_id == node and msg.metadata.message_type == message_type:
            record = reply.content[SECAGG]
            values = dict(record)
            values[field] = [bytes(v)[:-1] for v in record[field]] if field.endswith("shares") else record[field][:-1]
            reply.content[SECAGG] = ConfigRecord(values)
        return reply

    return mod


@pytest.mark.parametrize(
    "message_type, field, step, survivors",
    [
        (records.SHARE_KEYS, "data", "secagg share keys", [11, 12]),  # ids and ciphertexts no longer pair up
        (records.UNMASK, "b-owners", "secagg unmask", NODES),  # the same, in its unmask reply
    ],
)
def test_a_malformed_reply_drops_its_site_and_the_round_completes(tmp_path, message_type, field, step, survivors):
    updates = random_updates()
    sites = Sites(tmp_path, mods=[corrupt(13, message_type, field)])
    exchange = sites.exchange()
    result = secure_round(sites, round_tag("run", 1), updates, NODES, exchange)
    assert exchange.dropped["site-13"].startswith(f"{step}: malformed reply")
    assert result.survivors == survivors
    assert np.max(np.abs(result.mean_update - weighted_mean(updates, survivors))) < 1e-6


def withhold_a_share(node: int):
    """A Flower mod: ``node``'s share-keys reply leaves out its first neighbour's ciphertext (well formed)."""

    def mod(msg: Message, context, call_next) -> Message:
        reply = call_next(msg, context)
        if context.node_id == node and msg.metadata.message_type == records.SHARE_KEYS:
            record = reply.content[SECAGG]
            reply.content[SECAGG] = ConfigRecord({"ids": list(record["ids"])[1:], "data": list(record["data"])[1:]})
        return reply

    return mod


def test_a_site_that_shares_with_only_some_neighbours_is_set_up_without(tmp_path, caplog):
    """Sites mask with every neighbour or not at all, so the server sets the round up again, with fresh
    keys, among the sites that shared with all their neighbours; their mean is exact."""
    updates = random_updates()
    sites = Sites(tmp_path, mods=[withhold_a_share(13)])
    exchange = sites.exchange()
    with caplog.at_level("INFO", logger="fedtune.server.secagg"):
        prepared = set_up_round(exchange, round_tag("run", 1), NODES, SETTINGS)
    assert prepared.nodes == [11, 12]
    assert "set-up again without nodes [13]" in caplog.text
    masked = {
        n: secure_aggregation.mask_update(
            sites.contexts[n], prepared.tag, prepared.inboxes[n], updates[n], f"site-{n}", sites.masked_for(n)
        )
        for n in prepared.nodes
    }
    result, _ = finish_round(exchange, prepared, masked, SETTINGS)
    assert result.survivors == [11, 12]
    assert np.max(np.abs(result.mean_update - weighted_mean(updates, [11, 12]))) < 1e-6


def test_shares_of_the_wrong_size_count_as_missing(tmp_path):
    updates = random_updates()
    sites = Sites(tmp_path, mods=[corrupt(13, records.UNMASK, "b-shares")])
    exchange = sites.exchange()
    result = secure_round(sites, round_tag("run", 1), updates, NODES, exchange)
    assert "site-13" not in exchange.dropped  # its reply parsed; the other two sites' shares suffice
    assert np.max(np.abs(result.mean_update - weighted_mean(updates, NODES))) < 1e-6


def test_the_unmask_exchange_sets_the_next_round_up_and_its_train_request_uses_it(tmp_path):
    updates = random_updates()
    sites = Sites(tmp_path)
    exchange = sites.exchange()
    tag, next_tag = round_tag("run", 1), round_tag("run", 2)
    prepared = set_up_round(exchange, tag, NODES, SETTINGS)
    masked, next_keys = {}, {}
    for n in NODES:
        masked[n] = secure_aggregation.mask_update(sites.contexts[n], tag, prepared.inboxes[n], updates[n], f"site-{n}")
        next_keys[n] = records.advertisement_from(
            secure_aggregation.advertise(sites.contexts[n], next_tag, 10, 2), next_tag
        )
    first, upcoming = finish_round(exchange, prepared, masked, SETTINGS, next_tag, next_keys)
    assert upcoming is not None and upcoming.tag == next_tag and upcoming.nodes == NODES
    # Round 2 needs no set-up exchange of its own: its shares are already routed.
    steady = {
        n: secure_aggregation.mask_update(sites.contexts[n], next_tag, upcoming.inboxes[n], 2 * updates[n], f"site-{n}")
        for n in NODES
    }
    second, after = finish_round(exchange, upcoming, steady, SETTINGS)
    assert after is None
    assert np.max(np.abs(first.mean_update - weighted_mean(updates, NODES))) < 1e-6
    # The weights declared for round 2 were equal (10 examples each).
    assert np.max(np.abs(second.mean_update - 2 * np.mean([updates[n] for n in NODES], axis=0))) < 1e-6
