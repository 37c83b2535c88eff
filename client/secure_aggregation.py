"""A site's side of secure aggregation as Flower handlers, with its secrets kept in ``context.state``.

A site holds at most two rounds at once: ``next``, set up (keys, then shares sent) before
its training request arrives, and ``current``, masked and waiting to be unmasked. Both
must survive between messages, which a simulation may hand to different worker
processes; Flower keeps ``context.state`` on the site (the SuperNode) and never sends it
to the server. A round's secrets are erased once the site has unmasked it. The update
itself is masked as soon as training ends and is never stored here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedtune.client.membership import Membership, MembershipSource
from fedtune.client.revealed_rounds import MaskedRounds, RevealedRounds
from fedtune.common.secure_aggregation.key_agreement import KeyPair, public_key_of
from fedtune.common.secure_aggregation.protocol import ClientRound, ProtocolViolation, bound_tag_of
from fedtune.common.secure_aggregation.records import (
    SECAGG_NEXT,
    advertisement_record,
    bool_field,
    bytes_field,
    bytes_list_field,
    indexed_bytes_record,
    int_field,
    int_list_field,
    params_from,
    params_record,
    signature_record,
    str_field,
    unmask_reply_record,
    unmask_request_from,
)
from fedtune.common.wire import SECAGG, STATUS, SiteState, SiteStatus

log = logging.getLogger("fedtune.client.secagg")

CURRENT, NEXT = "secagg-current", "secagg-next"

# What a site declares when it sets a round up: (its number of training examples, the
# fewest sites it lets a sum be revealed over).
Declaration = Callable[[Context], tuple[int, int]]


def _save(context: Context, slot: str, state: ClientRound, tag: bytes) -> None:
    held = sorted(state.held_shares)
    context.state[slot] = ConfigRecord(
        {
            "round-tag": tag,
            "c-private": state.c_keys.private,
            "s-private": state.s_keys.private,
            "self-seed": state.self_seed,
            "num-examples": state.num_examples,
            "floor": state.min_survivors_floor,
            "member": state.identity.member if state.identity else "",
            "has-params": state.params is not None,
            "held-owners": held,
            "held-b": [state.held_shares[j][0] for j in held],
            "held-s": [state.held_shares[j][1] for j in held],
            "alive": list(state.alive),
            "unmasked": state.unmasked,
            "sent-masked": state.sent_masked,
            "clipped": state.clipped,
            "has-signed-view": state.signed_view is not None,
            "signed-survivors": list(state.signed_view[0]) if state.signed_view else [],
            "signed-dropped": list(state.signed_view[1]) if state.signed_view else [],
        }
    )
    if state.params is not None:
        context.state[slot + "-params"] = params_record(state.params)


def _load(context: Context, slot: str, tag: bytes, membership: Membership | None = None) -> ClientRound:
    """The round held in ``slot``, provided it is round ``tag`` (checked against ``membership``'s roster)."""
    if slot not in context.state.config_records:
        what = "set up" if slot == NEXT else "masked"
        raise ProtocolViolation(
            f"no secure-aggregation round {what} on this site for {tag!r} "
            "(the site restarted, or dropped out of the set-up)"
        )
    r = context.state.config_records[slot]
    name = f"site state {slot!r}"
    held_tag = bytes_field(r, "round-tag", name)
    if held_tag != tag:
        raise ProtocolViolation(f"step for {tag!r} but this site holds {held_tag!r}")
    c_priv, s_priv = bytes_field(r, "c-private", name), bytes_field(r, "s-private", name)
    owners, held_b, held_s = (
        int_list_field(r, "held-owners", name),
        bytes_list_field(r, "held-b", name),
        bytes_list_field(r, "held-s", name),
    )
    params = params_from(context.state.config_records[slot + "-params"]) if bool_field(r, "has-params", name) else None
    member = str_field(r, "member", name)
    if membership is not None and member != membership.identity.member:
        raise ProtocolViolation(f"round {tag!r} was set up without this site's identity")
    return ClientRound(
        num_examples=int_field(r, "num-examples", name),
        min_survivors_floor=int_field(r, "floor", name),
        c_keys=KeyPair(c_priv, public_key_of(c_priv)),
        s_keys=KeyPair(s_priv, public_key_of(s_priv)),
        self_seed=bytes_field(r, "self-seed", name),
        params=params,
        held_shares={j: (b, s) for j, b, s in zip(owners, held_b, held_s, strict=True)},
        alive=tuple(int_list_field(r, "alive", name)),
        unmasked=bool_field(r, "unmasked", name),
        clipped=int_field(r, "clipped", name),
        sent_masked=bool_field(r, "sent-masked", name),
        signed_view=(
            (tuple(int_list_field(r, "signed-survivors", name)), tuple(int_list_field(r, "signed-dropped", name)))
            if bool_field(r, "has-signed-view", name)
            else None
        ),
        roster=membership.roster if membership else None,
        identity=membership.identity if membership else None,
    )


def _forget(context: Context, slot: str) -> None:
    for name in (slot, slot + "-params"):
        context.state.config_records.pop(name, None)


def forget_rounds(context: Context) -> None:
    """Erase every secure-aggregation secret this site holds."""
    _forget(context, CURRENT)
    _forget(context, NEXT)


def advertise(
    context: Context, tag: bytes, num_examples: int, floor: int, membership: Membership | None = None
) -> ConfigRecord:
    """Fresh keys for round ``tag`` (replacing any round set up before); the public half to send,
    signed when the site is a roster member (whose floor, if higher, ``ClientRound.floor`` applies)."""
    state = ClientRound(
        num_examples=num_examples,
        min_survivors_floor=floor,
        roster=membership.roster if membership else None,
        identity=membership.identity if membership else None,
    )
    _forget(context, NEXT)
    _save(context, NEXT, state, tag)
    return advertisement_record(state.advertise(tag), tag)


def _share_keys(
    context: Context, params_rec: ConfigRecord, membership: Membership | None, revealed: RevealedRounds | None
) -> dict[int, bytes]:
    params = params_from(params_rec)
    state = _load(context, NEXT, params.round_tag, membership)
    ciphertexts = state.share_keys(params)
    if revealed is not None:  # before any ciphertext leaves: one set of parameters per set of keys
        revealed.shared_parameters.pin(params.round_tag, state.s_keys.public, bound_tag_of(params))
    _save(context, NEXT, state, params.round_tag)
    return ciphertexts


def open_inbox(
    context: Context,
    tag: bytes,
    inbox: Mapping[int, bytes],
    masked: MaskedRounds | None = None,
    membership: Membership | None = None,
) -> ClientRound:
    """Round ``tag``, set up with this site, with the shares its neighbours sent opened.

    Called before training: raises ProtocolViolation (or ShareDecryptionError) when the
    round was not set up with this site, when ``masked`` (the site's on-disk record of the
    rounds it sent a masked input for) says it already masked round ``tag`` (AlreadyMasked),
    or the shares are unusable, so no privacy budget is spent on an update that could not be sent.
    """
    if masked is not None:
        masked.check(tag)
    state = _load(context, NEXT, tag, membership)
    if state.params is None:
        raise ProtocolViolation(f"this site never shared its keys for {tag!r}")
    state.receive_shares(inbox)
    return state


def mask_opened(
    context: Context, state: ClientRound, update: np.ndarray, site_id: str, masked: MaskedRounds | None = None
) -> np.ndarray:
    """The masked vector of an opened round (:func:`open_inbox`); the round moves to ``current``.

    The round is claimed in ``masked`` (on disk) before the vector is returned: a site sends a
    masked input for each round at most once, and a second claim raises AlreadyMasked.
    """
    params = state.params
    if params is None:  # not a round open_inbox returned
        raise ProtocolViolation("masked input requested for a round whose keys were never shared")
    vector = state.masked_input(None, update)
    if masked is not None:
        masked.claim(params.round_tag)
    if state.clipped:
        log.warning(
            "%s: %d update values exceeded secure_aggregation.clip_range = %g and were clipped",
            site_id,
            state.clipped,
            params.clip_range,
        )
    _forget(context, NEXT)
    _forget(context, CURRENT)
    _save(context, CURRENT, state, params.round_tag)
    return vector


def mask_update(
    context: Context,
    tag: bytes,
    inbox: Mapping[int, bytes],
    update: np.ndarray,
    site_id: str,
    masked: MaskedRounds | None = None,
    membership: Membership | None = None,
) -> np.ndarray:
    """:func:`open_inbox` then :func:`mask_opened`, for an update that is already at hand."""
    return mask_opened(context, open_inbox(context, tag, inbox, masked, membership), update, site_id, masked)


def _refuse(msg: Message, site_id: str, reason: str) -> Message:
    log.warning("%s: secure aggregation step refused: %s", site_id, reason)
    return Message(RecordDict({STATUS: SiteStatus(site_id, SiteState.REFUSED, reason).to_record()}), reply_to=msg)


def _ok(site_id: str) -> ConfigRecord | MetricRecord:
    return SiteStatus(site_id, SiteState.OK).to_record()


def advertise_step(
    msg: Message, context: Context, site_id: str, declare: Declaration, membership_of: MembershipSource | None = None
) -> Message:
    try:
        tag = bytes_field(msg.content.config_records[SECAGG], "round-tag", "advertise request")
        num_examples, floor = declare(context)
        membership = membership_of(context) if membership_of else None
    except (KeyError, ValueError, RuntimeError) as exc:
        return _refuse(msg, site_id, str(exc))
    # A round set up apart from training starts after the previous one ended: its secrets, if
    # it was never unmasked (a failed round), have no further use.
    _forget(context, CURRENT)
    keys = advertise(context, tag, num_examples, floor, membership)
    return Message(RecordDict({SECAGG: keys, STATUS: _ok(site_id)}), reply_to=msg)


def share_keys(
    msg: Message,
    context: Context,
    site_id: str,
    membership: Membership | None = None,
    revealed: RevealedRounds | None = None,
) -> Message:
    try:
        ciphertexts = _share_keys(context, msg.content.config_records[SECAGG], membership, revealed)
    except (ProtocolViolation, KeyError, ValueError) as exc:
        return _refuse(msg, site_id, str(exc))
    return Message(RecordDict({SECAGG: indexed_bytes_record(ciphertexts), STATUS: _ok(site_id)}), reply_to=msg)


def sign_survivors(
    msg: Message,
    context: Context,
    site_id: str,
    membership: Membership | None = None,
    revealed: RevealedRounds | None = None,
) -> Message:
    """This site's signature on the lists of finished and dropped sites it was given (the consistency step).

    With ``revealed`` (every real site's record), the list is pinned on disk before the signature
    leaves: a site handles messages in several processes, and its memory alone cannot stop two
    signatures on two lists sent at once.
    """
    try:
        tag, survivors, dropped, _ = unmask_request_from(msg.content.config_records[SECAGG])
        state = _load(context, CURRENT, tag, membership)
        signature = state.sign_survivors(survivors, dropped)
        if revealed is not None:
            revealed.survivor_lists.pin(tag, survivors, dropped)
    except (ProtocolViolation, KeyError, ValueError) as exc:
        return _refuse(msg, site_id, str(exc))
    _save(context, CURRENT, state, tag)
    return Message(RecordDict({SECAGG: signature_record(signature), STATUS: _ok(site_id)}), reply_to=msg)


def unmask(
    msg: Message,
    context: Context,
    site_id: str,
    revealed: RevealedRounds | None = None,
    membership: Membership | None = None,
) -> Message:
    """This round's shares; and, when the request carries them, the next round's parameters
    answered with this site's share ciphertexts for it (the set-up rides on this message).

    ``revealed`` is the site's on-disk record of the rounds it unmasked: a round is claimed
    there before its shares leave, and a second request for it (after a restart) is refused.
    """
    try:
        tag, survivors, dropped, signatures = unmask_request_from(msg.content.config_records[SECAGG])
        state = _load(context, CURRENT, tag, membership)
        b_shares, s_shares = state.unmask(survivors, dropped, signatures)
        if revealed is not None:
            revealed.check(tag)  # a replayed round is refused as such, before its list is compared
            revealed.survivor_lists.pin(tag, survivors, dropped)
            revealed.claim(tag)
    except (ProtocolViolation, KeyError, ValueError) as exc:
        return _refuse(msg, site_id, str(exc))
    _forget(context, CURRENT)
    content = RecordDict({SECAGG: unmask_reply_record(b_shares, s_shares), STATUS: _ok(site_id)})
    if SECAGG_NEXT in msg.content.config_records:
        try:
            content[SECAGG_NEXT] = indexed_bytes_record(
                _share_keys(context, msg.content.config_records[SECAGG_NEXT], membership, revealed)
            )
        except (ProtocolViolation, KeyError, ValueError) as exc:
            log.warning("%s: next round's secure-aggregation set-up refused: %s", site_id, exc)
            _forget(context, NEXT)
    return Message(content, reply_to=msg)


__all__ = [
    "advertise",
    "advertise_step",
    "forget_rounds",
    "mask_opened",
    "mask_update",
    "open_inbox",
    "share_keys",
    "sign_survivors",
    "unmask",
]
