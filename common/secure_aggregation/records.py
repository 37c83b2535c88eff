"""The secure-aggregation steps as Flower records (what crosses the wire at each step).

Every value is a public key, a ciphertext, an index or a masked vector: nothing a site
sends here reveals its update without the masks that only the protocol can remove.

Message types: ``ADVERTISE`` and ``SHARE_KEYS`` set a round up before its training request
(only when it was not set up during the previous round), ``UNMASK`` ends a round; in a round
with a roster in which some site dropped, ``SIGN_SURVIVORS`` comes before it (the consistency
step) and the unmask request carries the survivors' signatures. The
train request carries the shares addressed to the site (``SECAGG``), its reply the masked
vector (``MASKED``) and the next round's keys (``SECAGG_NEXT``); the unmask request and
reply carry the next round's parameters and share ciphertexts in ``SECAGG_NEXT``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, ConfigRecordValues

from fedtune.common.secure_aggregation.protocol import Advertisement, RoundParameters
from fedtune.common.secure_aggregation.signed_keys import SignedKeys
from fedtune.common.wire import array_of

ADVERTISE = "train.secagg_advertise"
SHARE_KEYS = "train.secagg_share_keys"
UNMASK = "train.secagg_unmask"
SIGN_SURVIVORS = "train.secagg_sign_survivors"
SECAGG_NEXT = "secagg-next"


# Typed reads. A ConfigRecord value may be any of Flower's scalars or a list of them: each field
# is checked once, here where it arrives, so that a malformed record is a ValueError naming the
# record (``what``), the field and the type expected, and the code past this edge holds typed
# values. A missing field stays a KeyError. Values are never echoed: some records hold secret keys.


def _wrong(what: str, key: str, value: ConfigRecordValues, expected: str) -> ValueError:
    got = (
        f"a list of {', '.join(sorted({type(v).__name__ for v in value}))}"
        if isinstance(value, list)
        else type(value).__name__
    )
    return ValueError(f"{what} record: field {key!r} is {got}, expected {expected}")


def bytes_field(record: ConfigRecord, key: str, what: str) -> bytes:
    value = record[key]
    if not isinstance(value, bytes):
        raise _wrong(what, key, value, "bytes")
    return value


def int_field(record: ConfigRecord, key: str, what: str) -> int:
    """An integer; a boolean is not one here, though Python counts it as one."""
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise _wrong(what, key, value, "an integer")
    return value


def float_field(record: ConfigRecord, key: str, what: str) -> float:
    """A number (an integer will do), as a float."""
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _wrong(what, key, value, "a number")
    return float(value)


def str_field(record: ConfigRecord, key: str, what: str) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise _wrong(what, key, value, "a string")
    return value


def str_list_field(record: ConfigRecord, key: str, what: str) -> list[str]:
    return _list_field(record, key, what, str, "a list of strings")


def bool_field(record: ConfigRecord, key: str, what: str) -> bool:
    value = record[key]
    if not isinstance(value, bool):
        raise _wrong(what, key, value, "a boolean")
    return value


def _list_field(record: ConfigRecord, key: str, what: str, kind: type, expected: str) -> list:
    """A list whose every item is a ``kind`` (a boolean is not an integer here)."""
    value = record[key]
    if not isinstance(value, list) or not all(isinstance(v, kind) and not isinstance(v, bool) for v in value):
        raise _wrong(what, key, value, expected)
    return value


def int_list_field(record: ConfigRecord, key: str, what: str) -> list[int]:
    return _list_field(record, key, what, int, "a list of integers")


def bytes_list_field(record: ConfigRecord, key: str, what: str) -> list[bytes]:
    return _list_field(record, key, what, bytes, "a list of bytes")


def round_tag(run_id: str, round_: int) -> bytes:
    return f"fedtune/{run_id}/{round_}".encode()


def advertisement_record(ad: Advertisement, tag: bytes) -> ConfigRecord:
    record = ConfigRecord(
        {"round-tag": tag, "c-public": ad.c_public, "s-public": ad.s_public, "num-examples": ad.num_examples}
    )
    if ad.member:
        record["member"], record["signature"] = ad.member, ad.signature
    return record


def advertisement_from(record: ConfigRecord, tag: bytes) -> Advertisement:
    """The advertisement, provided it is for round ``tag``; ValueError otherwise."""
    what = "advertisement"
    advertised_for = bytes_field(record, "round-tag", what)
    if advertised_for != tag:
        raise ValueError(f"keys advertised for {advertised_for!r}, expected {tag!r}")
    n = int_field(record, "num-examples", what)
    if n < 1:
        raise ValueError(f"a site advertised {n} examples")
    member, signature = "", b""
    if "member" in record:
        member, signature = str_field(record, "member", what), bytes_field(record, "signature", what)
    return Advertisement(
        bytes_field(record, "c-public", what), bytes_field(record, "s-public", what), n, member, signature
    )


def tag_record(tag: bytes) -> ConfigRecord:
    return ConfigRecord({"round-tag": tag})


def inbox_record(tag: bytes, inbox: Mapping[int, bytes]) -> ConfigRecord:
    """The share ciphertexts addressed to one site for round ``tag`` (sent with its train request)."""
    record = indexed_bytes_record(inbox)
    record["round-tag"] = tag
    return record


def inbox_from(record: ConfigRecord) -> tuple[bytes, dict[int, bytes]]:
    return bytes_field(record, "round-tag", "inbox"), indexed_bytes_from(record, what="inbox")


def params_record(p: RoundParameters) -> ConfigRecord:
    ids, members = sorted(p.neighbours), sorted(p.members)
    return ConfigRecord(
        {
            "member-ids": members,
            "member-names": [p.members[i].member for i in members],
            "member-c-publics": [p.members[i].c_public for i in members],
            "member-s-publics": [p.members[i].s_public for i in members],
            "member-signatures": [p.members[i].signature for i in members],
            "round-tag": p.round_tag,
            "index": p.index,
            "neighbours": ids,
            "c-publics": [p.neighbours[j][0] for j in ids],
            "s-publics": [p.neighbours[j][1] for j in ids],
            "threshold": p.threshold,
            "min-survivors": p.min_survivors,
            "clip-range": float(p.clip_range),
            "num-participants": p.num_participants,
            "total-examples": p.total_examples,
        }
    )


def params_from(record: ConfigRecord) -> RoundParameters:
    what = "round parameters"
    ids = int_list_field(record, "neighbours", what)
    c_publics, s_publics = bytes_list_field(record, "c-publics", what), bytes_list_field(record, "s-publics", what)
    members: dict[int, SignedKeys] = {}
    if "member-ids" in record:
        member_ids = int_list_field(record, "member-ids", what)
        names = str_list_field(record, "member-names", what)
        c_keys = bytes_list_field(record, "member-c-publics", what)
        s_keys = bytes_list_field(record, "member-s-publics", what)
        signatures = bytes_list_field(record, "member-signatures", what)
        if not len(member_ids) == len(names) == len(c_keys) == len(s_keys) == len(signatures):
            raise ValueError(f"{what} record: the member-* lists differ in length")
        members = {
            i: SignedKeys(n, c, k, sig)
            for i, n, c, k, sig in zip(member_ids, names, c_keys, s_keys, signatures, strict=True)
        }
    return RoundParameters(
        round_tag=bytes_field(record, "round-tag", what),
        index=int_field(record, "index", what),
        neighbours={j: (c, s) for j, c, s in zip(ids, c_publics, s_publics, strict=True)},
        threshold=int_field(record, "threshold", what),
        min_survivors=int_field(record, "min-survivors", what),
        clip_range=float_field(record, "clip-range", what),
        num_participants=int_field(record, "num-participants", what),
        total_examples=int_field(record, "total-examples", what),
        members=members,
    )


def indexed_bytes_record(values: Mapping[int, bytes], ids: str = "ids", data: str = "data") -> ConfigRecord:
    keys = sorted(values)
    return ConfigRecord({ids: keys, data: [values[k] for k in keys]})


def indexed_bytes_from(
    record: ConfigRecord, ids: str = "ids", data: str = "data", what: str = "share ciphertexts"
) -> dict[int, bytes]:
    """The bytes by index; a record without the two fields holds none."""
    keys = int_list_field(record, ids, what) if ids in record else []
    values = bytes_list_field(record, data, what) if data in record else []
    return dict(zip(keys, values, strict=True))


def unmask_request_record(
    tag: bytes, survivors: list[int], dropped: list[int], signatures: Mapping[int, bytes] | None = None
) -> ConfigRecord:
    """The lists of finished and dropped sites (and, after the consistency step, the survivors' signatures)."""
    record = ConfigRecord({"round-tag": tag, "survivors": list(survivors), "dropped": list(dropped)})
    if signatures:
        signers = sorted(signatures)
        record["signers"], record["signatures"] = signers, [signatures[i] for i in signers]
    return record


def unmask_request_from(record: ConfigRecord) -> tuple[bytes, list[int], list[int], dict[int, bytes]]:
    """(round tag, survivors, dropped, signatures by index) of an unmask or sign-survivors request."""
    what = "unmask request"
    return (
        bytes_field(record, "round-tag", what),
        int_list_field(record, "survivors", what),
        int_list_field(record, "dropped", what),
        indexed_bytes_from(record, "signers", "signatures", what),
    )


def signature_record(signature: bytes) -> ConfigRecord:
    return ConfigRecord({"signature": signature})


def signature_from(record: ConfigRecord) -> bytes:
    return bytes_field(record, "signature", "sign-survivors reply")


def unmask_reply_record(b_shares: Mapping[int, bytes], s_shares: Mapping[int, bytes]) -> ConfigRecord:
    b, s = sorted(b_shares), sorted(s_shares)
    return ConfigRecord(
        {"b-owners": b, "b-shares": [b_shares[k] for k in b], "s-owners": s, "s-shares": [s_shares[k] for k in s]}
    )


def unmask_reply_from(record: ConfigRecord) -> tuple[dict[int, bytes], dict[int, bytes]]:
    return (
        indexed_bytes_from(record, "b-owners", "b-shares", "unmask reply"),
        indexed_bytes_from(record, "s-owners", "s-shares", "unmask reply"),
    )


def masked_record(vector: np.ndarray) -> ArrayRecord:
    return ArrayRecord(array_dict={"vector": array_of(np.asarray(vector, dtype=np.uint64))})


def masked_from(record: ArrayRecord) -> np.ndarray:
    return record["vector"].numpy()
