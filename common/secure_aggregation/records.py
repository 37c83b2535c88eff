"""The secure-aggregation steps as Flower records (what crosses the wire at each step).

Every value is a public key, a ciphertext, an index or a masked vector: nothing a site
sends here reveals its update without the masks that only the protocol can remove.

Message types: ``ADVERTISE`` and ``SHARE_KEYS`` set a round up before its training request
(only when it was not set up during the previous round), ``UNMASK`` ends a round. The
train request carries the shares addressed to the site (``SECAGG``), its reply the masked
vector (``MASKED``) and the next round's keys (``SECAGG_NEXT``); the unmask request and
reply carry the next round's parameters and share ciphertexts in ``SECAGG_NEXT``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord

from fedtune.common.secure_aggregation.protocol import Advertisement, RoundParameters

ADVERTISE = "train.secagg_advertise"
SHARE_KEYS = "train.secagg_share_keys"
UNMASK = "train.secagg_unmask"
SECAGG_NEXT = "secagg-next"


def round_tag(run_id: str, round_: int) -> bytes:
    return f"fedtune/{run_id}/{round_}".encode()


def advertisement_record(ad: Advertisement, tag: bytes) -> ConfigRecord:
    return ConfigRecord({"round-tag": tag, "c-public": ad.c_public, "s-public": ad.s_public,
                         "num-examples": ad.num_examples})


def advertisement_from(record: ConfigRecord, tag: bytes) -> Advertisement:
    """The advertisement, provided it is for round ``tag``; ValueError otherwise."""
    if bytes(record["round-tag"]) != tag:
        raise ValueError(f"keys advertised for {bytes(record['round-tag'])!r}, expected {tag!r}")
    n = int(record["num-examples"])
    if n < 1:
        raise ValueError(f"a site advertised {n} examples")
    return Advertisement(bytes(record["c-public"]), bytes(record["s-public"]), n)


def tag_record(tag: bytes) -> ConfigRecord:
    return ConfigRecord({"round-tag": tag})


def inbox_record(tag: bytes, inbox: Mapping[int, bytes]) -> ConfigRecord:
    """The share ciphertexts addressed to one site for round ``tag`` (sent with its train request)."""
    record = indexed_bytes_record(inbox)
    record["round-tag"] = tag
    return record


def inbox_from(record: ConfigRecord) -> tuple[bytes, dict[int, bytes]]:
    return bytes(record["round-tag"]), indexed_bytes_from(record)


def params_record(p: RoundParameters) -> ConfigRecord:
    ids = sorted(p.neighbours)
    return ConfigRecord({
        "round-tag": p.round_tag, "index": p.index, "neighbours": ids,
        "c-publics": [p.neighbours[j][0] for j in ids], "s-publics": [p.neighbours[j][1] for j in ids],
        "threshold": p.threshold, "min-survivors": p.min_survivors, "clip-range": float(p.clip_range),
        "num-participants": p.num_participants, "total-examples": p.total_examples,
    })


def params_from(record: ConfigRecord) -> RoundParameters:
    ids = [int(j) for j in record["neighbours"]]
    return RoundParameters(
        round_tag=bytes(record["round-tag"]), index=int(record["index"]),
        neighbours={j: (bytes(c), bytes(s)) for j, c, s in zip(ids, record["c-publics"], record["s-publics"],
                                                                   strict=True)},
        threshold=int(record["threshold"]), min_survivors=int(record["min-survivors"]),
        clip_range=float(record["clip-range"]), num_participants=int(record["num-participants"]),
        total_examples=int(record["total-examples"]),
    )


def indexed_bytes_record(values: Mapping[int, bytes], ids: str = "ids", data: str = "data") -> ConfigRecord:
    keys = sorted(values)
    return ConfigRecord({ids: keys, data: [values[k] for k in keys]})


def indexed_bytes_from(record: ConfigRecord, ids: str = "ids", data: str = "data") -> dict[int, bytes]:
    return {int(k): bytes(v) for k, v in zip(record.get(ids, []), record.get(data, []), strict=True)}


def unmask_request_record(tag: bytes, survivors: list[int], dropped: list[int]) -> ConfigRecord:
    return ConfigRecord({"round-tag": tag, "survivors": list(survivors), "dropped": list(dropped)})


def unmask_reply_record(b_shares: Mapping[int, bytes], s_shares: Mapping[int, bytes]) -> ConfigRecord:
    b, s = sorted(b_shares), sorted(s_shares)
    return ConfigRecord({"b-owners": b, "b-shares": [b_shares[k] for k in b],
                         "s-owners": s, "s-shares": [s_shares[k] for k in s]})


def unmask_reply_from(record: ConfigRecord) -> tuple[dict[int, bytes], dict[int, bytes]]:
    return (indexed_bytes_from(record, "b-owners", "b-shares"), indexed_bytes_from(record, "s-owners", "s-shares"))


def masked_record(vector: np.ndarray) -> ArrayRecord:
    return ArrayRecord(array_dict={"vector": Array(np.ascontiguousarray(vector, dtype=np.uint32))})


def masked_from(record: ArrayRecord) -> np.ndarray:
    return record["vector"].numpy()
