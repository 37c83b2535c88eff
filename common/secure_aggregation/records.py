"""The secure-aggregation steps as Flower records (what crosses the wire at each step).

Every value is a public key, a ciphertext, an index or a masked vector: nothing a site
sends here reveals its update without the masks that only the protocol can remove.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord

from common.secure_aggregation.protocol import Advertisement, RoundParameters

SHARE_KEYS = "train.secagg_share_keys"
MASKED_INPUT = "train.secagg_masked_input"
UNMASK = "train.secagg_unmask"


def round_tag(run_id: str, round_: int) -> bytes:
    return f"fedtune/{run_id}/{round_}".encode()


def advertisement_record(ad: Advertisement) -> ConfigRecord:
    return ConfigRecord({"c-public": ad.c_public, "s-public": ad.s_public})


def advertisement_from(record: ConfigRecord, num_examples: int) -> Advertisement:
    return Advertisement(bytes(record["c-public"]), bytes(record["s-public"]), int(num_examples))


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


def unmask_request_record(survivors: list[int], dropped: list[int]) -> ConfigRecord:
    return ConfigRecord({"survivors": list(survivors), "dropped": list(dropped)})


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
