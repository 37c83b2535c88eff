"""A site's side of secure aggregation as Flower handlers, with its secrets kept in ``context.state``.

The site's round state (fresh private keys, the self-mask seed, the update, the shares it
holds for its neighbours) must survive between the protocol's messages, which a simulation
may hand to different worker processes; Flower keeps ``context.state`` on the site (the
SuperNode) and never sends it to the server. It is erased once the site has unmasked.
"""

from __future__ import annotations

import logging

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from common.secure_aggregation.key_agreement import KeyPair, public_key_of
from common.secure_aggregation.protocol import ClientRound, ProtocolViolation
from common.secure_aggregation.records import (
    advertisement_record,
    indexed_bytes_from,
    indexed_bytes_record,
    masked_record,
    params_from,
    params_record,
    unmask_reply_record,
)
from common.secure_aggregation.share_transport import ShareDecryptionError
from common.wire import MASKED, SECAGG, STATUS

log = logging.getLogger("fedtune.client.secagg")

_STATE = "secagg-state"
_UPDATE = "secagg-update"


def _save(context: Context, state: ClientRound, tag: bytes) -> None:
    held = sorted(state.held_shares)
    context.state[_STATE] = ConfigRecord({
        "round-tag": tag, "c-private": state.c_keys.private, "s-private": state.s_keys.private,
        "self-seed": state.self_seed, "num-examples": state.num_examples, "floor": state.min_survivors_floor,
        "has-params": state.params is not None,
        "held-owners": held, "held-b": [state.held_shares[j][0] for j in held],
        "held-s": [state.held_shares[j][1] for j in held], "alive": list(state.alive), "unmasked": state.unmasked,
        "clipped": state.clipped,
    })
    if state.params is not None:
        context.state[_STATE + "-params"] = params_record(state.params)


def _load(context: Context) -> tuple[ClientRound, bytes]:
    if _STATE not in context.state.config_records:
        raise ProtocolViolation("no secure-aggregation round in progress on this site (restarted mid-round?)")
    r = context.state.config_records[_STATE]
    c_priv, s_priv = bytes(r["c-private"]), bytes(r["s-private"])
    state = ClientRound(
        update=context.state.array_records[_UPDATE]["update"].numpy(), num_examples=int(r["num-examples"]),
        min_survivors_floor=int(r["floor"]),
        c_keys=KeyPair(c_priv, public_key_of(c_priv)), s_keys=KeyPair(s_priv, public_key_of(s_priv)),
        self_seed=bytes(r["self-seed"]),
        params=params_from(context.state.config_records[_STATE + "-params"]) if r["has-params"] else None,
        held_shares={int(j): (bytes(b), bytes(s)) for j, b, s in zip(r["held-owners"], r["held-b"], r["held-s"],
                                                                        strict=True)},
        alive=tuple(int(j) for j in r["alive"]), unmasked=bool(r["unmasked"]), clipped=int(r["clipped"]),
    )
    return state, bytes(r["round-tag"])


def forget_round(context: Context) -> None:
    """Erase the round's secrets (after unmasking, or before a new round)."""
    for name in (_STATE, _STATE + "-params"):
        context.state.config_records.pop(name, None)
    context.state.array_records.pop(_UPDATE, None)


def begin_round(context: Context, tag: bytes, update: np.ndarray, num_examples: int, floor: int) -> ConfigRecord:
    """Fresh keys for this round; returns the public half for the trained reply."""
    forget_round(context)
    state = ClientRound(update=np.asarray(update, dtype=np.float32), num_examples=num_examples,
                        min_survivors_floor=floor)
    # The update does not change during the round: stored once here, not on every step.
    context.state[_UPDATE] = ArrayRecord(array_dict={"update": Array(np.ascontiguousarray(state.update))})
    _save(context, state, tag)
    return advertisement_record(state.advertise())


def _refuse(msg: Message, site_id: str, reason: str) -> Message:
    log.warning("%s: secure aggregation step refused: %s", site_id, reason)
    status = ConfigRecord({"site-id": site_id, "state": "refused", "reason": reason})
    return Message(RecordDict({STATUS: status}), reply_to=msg)


def _ok(site_id: str) -> ConfigRecord:
    return ConfigRecord({"site-id": site_id, "state": "ok", "reason": ""})


def share_keys(msg: Message, context: Context, site_id: str) -> Message:
    try:
        state, tag = _load(context)
        params = params_from(msg.content[SECAGG])
        if params.round_tag != tag:
            raise ProtocolViolation(f"step for {params.round_tag!r} but this site trained for {tag!r}")
        ciphertexts = state.share_keys(params)
    except (ProtocolViolation, KeyError, ValueError) as exc:
        return _refuse(msg, site_id, str(exc))
    _save(context, state, tag)
    return Message(RecordDict({SECAGG: indexed_bytes_record(ciphertexts), STATUS: _ok(site_id)}), reply_to=msg)


def masked_input(msg: Message, context: Context, site_id: str) -> Message:
    try:
        state, tag = _load(context)
        vector = state.masked_input(indexed_bytes_from(msg.content[SECAGG]))
    except (ProtocolViolation, ShareDecryptionError, KeyError, ValueError) as exc:
        return _refuse(msg, site_id, str(exc))
    if state.clipped:
        log.warning("%s: %d update values exceeded secure_aggregation.clip_range = %g and were clipped",
                    site_id, state.clipped, state.params.clip_range)
    _save(context, state, tag)
    return Message(RecordDict({MASKED: masked_record(vector), STATUS: _ok(site_id)}), reply_to=msg)


def unmask(msg: Message, context: Context, site_id: str) -> Message:
    try:
        state, tag = _load(context)
        request = msg.content[SECAGG]
        b_shares, s_shares = state.unmask([int(i) for i in request["survivors"]],
                                          [int(i) for i in request["dropped"]])
    except (ProtocolViolation, KeyError, ValueError) as exc:
        return _refuse(msg, site_id, str(exc))
    forget_round(context)
    return Message(RecordDict({SECAGG: unmask_reply_record(b_shares, s_shares), STATUS: _ok(site_id)}),
                   reply_to=msg)


__all__ = ["begin_round", "forget_round", "masked_input", "share_keys", "unmask"]
