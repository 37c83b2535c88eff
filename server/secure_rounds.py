"""The server's side of secure aggregation as Flower messages: three exchanges after training.

The sites that trained have already sent their public keys (with the trained reply); this
module relays shares, collects masked vectors and the shares needed to unmask their sum,
and hands back only :class:`SecureSum`. A site that errs, refuses or times out at any step
counts as dropped; the protocol tolerates that while enough sites remain and otherwise
raises :class:`SecureAggregationError`, leaving the global model to the caller untouched.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from common.secure_aggregation.protocol import Advertisement, SecureAggregationError, SecureSum, ServerRound
from common.secure_aggregation.records import (
    MASKED_INPUT,
    SHARE_KEYS,
    UNMASK,
    indexed_bytes_from,
    indexed_bytes_record,
    masked_from,
    params_record,
    unmask_reply_from,
    unmask_request_record,
)
from common.wire import MASKED, SECAGG, STATUS, payload_nbytes
from server.messaging import by_node, send_and_collect

log = logging.getLogger("fedtune.server.secagg")

Sender = Callable[[Grid, list[Message], str, float], list[Message]]


class SecureExchange:
    """One step: send a record to each node, keep the good replies, name who dropped and why."""

    def __init__(self, grid: Grid, sites: Mapping[int, str], timeout_s: float, send: Sender = send_and_collect):
        self.grid, self.sites, self.timeout_s, self.send = grid, dict(sites), timeout_s, send
        self.dropped: dict[str, str] = {}
        self.bytes_received: dict[str, int] = {}

    def __call__(self, step: str, message_type: str, records: Mapping[int, ConfigRecord]) -> dict[int, RecordDict]:
        requests = [Message(RecordDict({SECAGG: r}), message_type=message_type, dst_node_id=n)
                    for n, r in records.items()]
        replies = by_node(requests, self.send(self.grid, requests, step, self.timeout_s))
        good: dict[int, RecordDict] = {}
        for node, reply in replies:
            if reply.has_error():
                self.drop(node, step, reply.error.reason.splitlines()[-1][:300] if reply.error.reason else "error")
            elif reply.content[STATUS]["state"] != "ok":
                self.drop(node, step, str(reply.content[STATUS]["reason"]))
            else:
                good[node] = reply.content
                self.bytes_received[self.sites[node]] = self.bytes_received.get(self.sites[node], 0) + \
                    payload_nbytes(reply.content)
        for node in set(records) - {node for node, _ in replies}:
            self.drop(node, step, "no reply before secure_aggregation.stage_timeout_s")
        return good

    def drop(self, node: int, step: str, reason: str) -> None:
        site = self.sites.get(node, f"node-{node}")
        self.dropped[site] = f"{step}: {reason}"
        log.warning("secure aggregation: %s dropped out at %s: %s", site, step, reason)


def secure_sum(exchange: SecureExchange, tag: bytes, advertised: Mapping[int, Advertisement], clip_range: float,
               min_survivors: int, vector_length: int, neighbours: int = 0, threshold_fraction: float = 0.5,
               on_masked: Callable[[int, np.ndarray], None] | None = None) -> SecureSum:
    """Run steps 2-4 of SecAgg+ with the sites that trained; raises SecureAggregationError.

    ``on_masked(node, vector)`` sees each masked vector as received (for an audit record).
    """
    server = ServerRound(tag, advertised, clip_range, min_survivors, vector_length, neighbours, threshold_fraction)
    shared = exchange("secagg share keys", SHARE_KEYS,
                      {n: params_record(p) for n, p in server.share_keys_requests().items()})
    inboxes = server.route_shares({n: indexed_bytes_from(c[SECAGG]) for n, c in shared.items()})
    masked = exchange("secagg masked input", MASKED_INPUT,
                      {n: indexed_bytes_record(box) for n, box in inboxes.items()})
    vectors = {}
    for node, content in masked.items():
        try:
            vectors[node] = masked_from(content.array_records[MASKED])
        except (KeyError, ValueError) as exc:
            exchange.drop(node, "secagg masked input", f"malformed masked vector: {exc}")
            continue
        if on_masked is not None:
            on_masked(node, vectors[node])
    requests = server.receive_masked(vectors)
    answers = exchange("secagg unmask", UNMASK,
                       {n: unmask_request_record(s, d) for n, (s, d) in requests.items()})
    return server.unmask({n: unmask_reply_from(c[SECAGG]) for n, c in answers.items()})


__all__ = ["SecureAggregationError", "SecureExchange", "secure_sum"]
