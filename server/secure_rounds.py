"""The server's side of secure aggregation as Flower messages, two exchanges a round in steady state.

A round is *set up* (SecAgg+ steps 1-2: keys advertised, shares exchanged) before its
training request, and *finished* (steps 3-4) by the train replies, which carry the masked
vectors, and one unmask exchange. The set-up of round r+1 rides on round r's messages:
each train reply carries the site's keys for r+1, and the unmask request and reply carry
r+1's parameters and share ciphertexts. So a steady round costs the train exchange plus
one small exchange; :func:`set_up_round` spends two more only for the first round, after a
restart, or when the sites differ from those set up (a site dropped or came back).

Masking with a neighbour is only safe once that neighbour's shares are distributed (else
its masks could not be removed if it dropped): here every site masks only after the whole
set-up is done, exactly as in SecAgg+. A site that errs, refuses or times out at any step
counts as dropped; the protocol tolerates that while enough sites remain and otherwise
raises :class:`SecureAggregationError`, leaving the global model to the caller untouched.
A round's record (:func:`completed_round`, :func:`failed_round`) tells apart the sites whose
masked input is not in the sum from the survivors that only missed the unmask step.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedtune.common.secure_aggregation.protocol import (
    ALREADY_MASKED,
    ALREADY_REVEALED,
    Advertisement,
    SecureAggregationError,
    SecureSum,
    ServerRound,
)
from fedtune.common.secure_aggregation.records import (
    ADVERTISE,
    SECAGG_NEXT,
    SHARE_KEYS,
    SIGN_SURVIVORS,
    UNMASK,
    advertisement_from,
    inbox_record,
    indexed_bytes_from,
    params_record,
    signature_from,
    tag_record,
    unmask_reply_from,
    unmask_request_record,
)
from fedtune.common.wire import SECAGG, SiteState, SiteStatus, WireError, payload_nbytes
from fedtune.server.messaging import by_node, send_and_collect

log = logging.getLogger("fedtune.server.secagg")

Sender = Callable[[Grid, list[Message], str, float], list[Message]]
T = TypeVar("T")

UNMASK_STEP = "secagg unmask"
SIGN_STEP = "secagg sign survivors"
NEXT_SET_UP_STEP = "secagg share keys (next round)"


@dataclass(frozen=True)
class SecureSettings:
    """What every round of a run shares: the quantisation range and the graph's shape."""

    clip_range: float
    min_survivors: int
    vector_length: int
    neighbours: int = 0
    threshold_fraction: float = 0.5

    def server_round(self, tag: bytes, advertised: Mapping[int, Advertisement]) -> ServerRound:
        return ServerRound(
            tag,
            advertised,
            self.clip_range,
            self.min_survivors,
            self.vector_length,
            self.neighbours,
            self.threshold_fraction,
        )


class SecureExchange:
    """One step: send a record to each node, keep the good replies, name who dropped and why."""

    def __init__(self, grid: Grid, sites: dict[int, str], timeout_s: float, send: Sender = send_and_collect):
        """``sites`` (node id -> site id) is updated in place as replies name their senders."""
        self.grid, self.sites, self.timeout_s, self.send = grid, sites, timeout_s, send
        self.dropped: dict[str, str] = {}  # site -> "step: reason"
        self.steps: dict[str, str] = {}  # site -> the step it dropped at
        self.reasons: dict[str, str] = {}  # site -> why, without the step
        self.failed: set[str] = set()  # dropped by an error or a timeout, not by a refusal
        self.refusals: dict[str, str] = {}  # site -> the reason it gave
        self.bytes_received: dict[str, int] = {}

    def site(self, node: int) -> str:
        return self.sites.get(node, f"node-{node}")

    def __call__(
        self, step: str, message_type: str, records: Mapping[int, ConfigRecord | RecordDict]
    ) -> dict[int, RecordDict]:
        requests = [
            Message(
                r if isinstance(r, RecordDict) else RecordDict({SECAGG: r}), message_type=message_type, dst_node_id=n
            )
            for n, r in records.items()
        ]
        replies = by_node(requests, self.send(self.grid, requests, step, self.timeout_s))
        good: dict[int, RecordDict] = {}
        for node, reply in replies:
            if reply.has_error():
                self.fail(node, step, reply.error.reason.splitlines()[-1][:300] if reply.error.reason else "error")
                continue
            try:
                status = SiteStatus.from_content(reply.content)
            except WireError as exc:
                self.fail(node, step, f"malformed reply: {exc}")
                continue
            self.sites.setdefault(node, status.site_id)
            if status.state is not SiteState.OK:
                self.drop(node, step, status.reason)
                self.refusals[self.site(node)] = status.reason
            else:
                good[node] = reply.content
                self.received(node, payload_nbytes(reply.content))
        for node in set(records) - {node for node, _ in replies}:
            self.fail(node, step, "no reply before secure_aggregation.stage_timeout_s")
        return good

    def parsed(self, step: str, replies: Mapping[int, RecordDict], parse: Callable[[RecordDict], T]) -> dict[int, T]:
        """Each good reply's payload; a malformed one drops its site (named in the log) rather
        than stopping the server, and the protocol decides whether enough sites remain."""
        out: dict[int, T] = {}
        for node, content in replies.items():
            try:
                out[node] = parse(content)
            except (KeyError, ValueError, TypeError) as exc:
                self.fail(node, step, f"malformed reply: {exc}")
        return out

    def received(self, node: int, nbytes: int) -> None:
        site = self.site(node)
        self.bytes_received[site] = self.bytes_received.get(site, 0) + nbytes

    def fail(self, node: int, step: str, reason: str) -> None:
        """Dropped by an error, a timeout or a malformed reply (not by a refusal)."""
        self.drop(node, step, reason)
        self.failed.add(self.site(node))

    def drop(self, node: int, step: str, reason: str) -> None:
        site = self.site(node)
        self.dropped[site] = f"{step}: {reason}"
        self.steps[site], self.reasons[site] = step, reason
        log.warning("secure aggregation: %s dropped out at %s: %s", site, step, reason)


@dataclass
class PreparedRound:
    """A round whose keys and shares are distributed; its train requests carry ``train_record``."""

    tag: bytes
    server: ServerRound
    inboxes: dict[int, dict[int, bytes]]

    @property
    def nodes(self) -> list[int]:
        return sorted(self.inboxes)

    def train_record(self, node: int) -> ConfigRecord:
        return inbox_record(self.tag, self.inboxes[node])


def set_up_round(exchange: SecureExchange, tag: bytes, nodes: list[int], settings: SecureSettings) -> PreparedRound:
    """Steps 1-2 as two exchanges before training; raises SecureAggregationError if too few sites answer.

    Sites mask with every neighbour of the public graph or not at all, so when a site does not
    share its keys the set-up runs again, with fresh keys, among those that did.
    """
    while True:
        replies = exchange("secagg advertise", ADVERTISE, {n: tag_record(tag) for n in nodes})
        advertised = exchange.parsed(
            "secagg advertise", replies, lambda c: advertisement_from(c.config_records[SECAGG], tag)
        )
        server = settings.server_round(tag, advertised)
        shared = exchange.parsed(
            "secagg share keys",
            exchange(
                "secagg share keys",
                SHARE_KEYS,
                {n: params_record(p) for n, p in server.share_keys_requests().items()},
            ),
            lambda c: indexed_bytes_from(c.config_records[SECAGG], what="share keys reply"),
        )
        if not (missing := server.unshared(shared)):
            return PreparedRound(tag, server, server.route_shares(shared))
        log.info("secure aggregation set-up again without nodes %s, which did not share their keys", missing)
        nodes = [n for n in server.nodes if n not in missing]


def finish_round(
    exchange: SecureExchange,
    prepared: PreparedRound,
    masked: Mapping[int, np.ndarray],
    settings: SecureSettings,
    next_tag: bytes | None = None,
    next_keys: Mapping[int, Advertisement] | None = None,
) -> tuple[SecureSum, PreparedRound | None]:
    """Steps 3-4 from the masked vectors of the train replies, in one unmask exchange that
    also sets round ``next_tag`` up among the sites that sent ``next_keys``.

    Returns the sum and the next round (None when too few sites took part in its set-up);
    raises SecureAggregationError when this round cannot be unmasked.
    """
    requests = prepared.server.receive_masked(masked)
    upcoming = None
    advertised = {n: a for n, a in (next_keys or {}).items() if n in requests}
    if next_tag is not None and len(advertised) >= settings.min_survivors:
        upcoming = settings.server_round(next_tag, advertised)
    next_params = upcoming.share_keys_requests() if upcoming else {}
    signatures: dict[int, bytes] = {}
    if prepared.server.needs_survivor_signatures:
        # The consistency step: every survivor signs the list it was given; sites reveal a dropped
        # neighbour's mask key only with a majority of their neighbourhood's signatures on that list.
        signed = exchange(
            SIGN_STEP, SIGN_SURVIVORS, {n: unmask_request_record(prepared.tag, *view) for n, view in requests.items()}
        )
        signatures = prepared.server.signatures_by_index(
            exchange.parsed(SIGN_STEP, signed, lambda c: signature_from(c.config_records[SECAGG]))
        )
    records = {}
    for node, (survivors, dropped) in requests.items():
        content = RecordDict({SECAGG: unmask_request_record(prepared.tag, survivors, dropped, signatures)})
        if node in next_params:
            content[SECAGG_NEXT] = params_record(next_params[node])
        records[node] = content
    answers = exchange(UNMASK_STEP, UNMASK, records)
    result = prepared.server.unmask(
        exchange.parsed(UNMASK_STEP, answers, lambda c: unmask_reply_from(c.config_records[SECAGG]))
    )
    if upcoming is None or next_tag is None:  # next_tag is set whenever upcoming is; this says so to mypy
        return result, None
    shared = exchange.parsed(
        NEXT_SET_UP_STEP,
        {n: c for n, c in answers.items() if n in next_params and SECAGG_NEXT in c.config_records},
        lambda c: indexed_bytes_from(c.config_records[SECAGG_NEXT], what="share keys reply"),
    )
    try:
        return result, PreparedRound(next_tag, upcoming, upcoming.route_shares(shared))
    except SecureAggregationError as exc:
        log.info("the next round will be set up anew: %s", exc)
        return result, None


def _missing(exchange: SecureExchange) -> dict[str, dict[str, str]]:
    """Who was missing from a round that got as far as its masked inputs, for its record.

    ``dropped``: sites whose masked input is not in the sum ("step: reason"), as SecAgg+ means
    the word. ``absent-at-unmask``: survivors (their masked input is in the sum, or would have
    been) that did not answer the unmask step, with their reason: the other survivors' shares
    removed their masks, or the round failed for want of them. A survivor whose part in the
    *next* round's set-up went wrong is in neither: the log names it, and that round is set up anew.
    """
    out: dict[str, dict[str, str]] = {"dropped": {}, "absent-at-unmask": {}}
    for site in sorted(exchange.dropped):
        step = exchange.steps[site]
        if step in (UNMASK_STEP, SIGN_STEP):
            out["absent-at-unmask"][site] = exchange.reasons[site]
        elif step != NEXT_SET_UP_STEP:
            out["dropped"][site] = exchange.dropped[site]
    return out


def _absent_note(absent: Mapping[str, str]) -> str:
    """What a status adds about the survivors that did not answer the unmask step ("" for none)."""
    revealed = [site for site, reason in absent.items() if reason.startswith(ALREADY_REVEALED)]
    silent = [site for site in absent if site not in revealed]
    parts = []
    if revealed:
        parts.append(
            f"{', '.join(revealed)} had already revealed this round before the server restarted and refused to again"
        )
    if silent:
        parts.append(f"{', '.join(silent)} did not answer the unmask step")
    return "; ".join(parts)


def already_masked(refusals: Mapping[str, str]) -> list[str]:
    """The sites that refused a round because they had sent their masked input for it before a restart."""
    return sorted(site for site, reason in refusals.items() if reason.startswith(ALREADY_MASKED))


def already_masked_note(sites: list[str]) -> str:
    """What a status says of the sites :func:`already_masked` found ("" for none)."""
    if not sites:
        return ""
    return (
        f"{', '.join(sites)} had already sent {'its' if len(sites) == 1 else 'their'} masked update for this "
        "round before the server restarted and refused to mask it again"
    )


def _masked_note(exchange: SecureExchange) -> str:
    return already_masked_note(already_masked({s: exchange.reasons.get(s, "") for s in exchange.dropped}))


def completed_round(exchange: SecureExchange, result: SecureSum) -> tuple[str, dict[str, Any]]:
    """The status and record of a round whose sum was revealed: ``survivors`` are the sites in it."""
    missing = _missing(exchange)
    status = f"aggregated {len(result.survivors)} sites securely"
    if note := _masked_note(exchange):
        status += f"; {note}"
    if note := _absent_note(missing["absent-at-unmask"]):
        status += f"; {note}; the other sites' shares sufficed"
    return status, {"survivors": sorted(exchange.site(n) for n in result.survivors), **missing}


def failed_round(exchange: SecureExchange, error: SecureAggregationError) -> tuple[str, dict[str, Any]]:
    """The status and record of a round that failed after training (too few masked inputs, or too
    few shares to remove the masks): no sum was revealed."""
    missing = _missing(exchange)
    notes = [n for n in (_masked_note(exchange), _absent_note(missing["absent-at-unmask"])) if n]
    status = "; ".join([f"failed: secure aggregation: {error}", *notes])
    return status, {**missing, "error": str(error)}


__all__ = [
    "NEXT_SET_UP_STEP",
    "UNMASK_STEP",
    "PreparedRound",
    "SecureAggregationError",
    "SecureExchange",
    "SecureSettings",
    "already_masked",
    "already_masked_note",
    "completed_round",
    "failed_round",
    "finish_round",
    "set_up_round",
]
