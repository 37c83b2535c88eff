"""The secure-aggregation records (``common.secure_aggregation.records``): what survives Flower's
serialisation, and a malformed field named (record, field, expected type) rather than misread."""

from __future__ import annotations

import pytest
from flwr.app import ConfigRecord

from fedtune.common.secure_aggregation.protocol import Advertisement, RoundParameters
from fedtune.common.secure_aggregation.records import (
    advertisement_from,
    advertisement_record,
    inbox_from,
    inbox_record,
    indexed_bytes_from,
    indexed_bytes_record,
    params_from,
    params_record,
    unmask_reply_from,
    unmask_reply_record,
)

TAG = b"fedtune/run/1"


def _over_the_wire(record: ConfigRecord) -> ConfigRecord:
    """The record as the other side gets it (Flower's own serialisation)."""
    return ConfigRecord.inflate(record.deflate())


def test_records_survive_flowers_serialisation():
    params = RoundParameters(
        round_tag=TAG,
        index=2,
        neighbours={1: (b"c1", b"s1"), 3: (b"c3", b"s3")},
        threshold=2,
        min_survivors=2,
        clip_range=0.5,
        num_participants=3,
        total_examples=750,
    )
    assert params_from(_over_the_wire(params_record(params))) == params
    ad = Advertisement(b"c" * 32, b"s" * 32, 10)
    assert advertisement_from(_over_the_wire(advertisement_record(ad, TAG)), TAG) == ad
    assert inbox_from(_over_the_wire(inbox_record(TAG, {3: b"x", 1: b"y"}))) == (TAG, {1: b"y", 3: b"x"})
    # Empty lists travel too (Flower sends them as a list of booleans, and they come back empty).
    assert inbox_from(_over_the_wire(inbox_record(TAG, {}))) == (TAG, {})
    assert unmask_reply_from(_over_the_wire(unmask_reply_record({1: b"b"}, {}))) == ({1: b"b"}, {})
    assert indexed_bytes_from(ConfigRecord()) == {}


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("num-examples", "10", "advertisement record: field 'num-examples' is str, expected an integer"),
        ("num-examples", True, "advertisement record: field 'num-examples' is bool, expected an integer"),
        ("num-examples", 10.0, "advertisement record: field 'num-examples' is float, expected an integer"),
        ("c-public", "c" * 32, "advertisement record: field 'c-public' is str, expected bytes"),
        ("round-tag", [TAG], "advertisement record: field 'round-tag' is a list of bytes, expected bytes"),
    ],
)
def test_a_malformed_advertisement_names_the_field_and_the_type_expected(field, value, message):
    record = advertisement_record(Advertisement(b"c" * 32, b"s" * 32, 10), TAG)
    record[field] = value
    with pytest.raises(ValueError) as caught:
        advertisement_from(record, TAG)
    assert str(caught.value) == message


def test_malformed_lists_and_missing_fields_are_refused():
    params = RoundParameters(
        round_tag=TAG,
        index=2,
        neighbours={1: (b"c1", b"s1")},
        threshold=2,
        min_survivors=2,
        clip_range=0.5,
        num_participants=2,
        total_examples=20,
    )
    record = params_record(params)
    record["neighbours"] = ["1"]
    with pytest.raises(
        ValueError, match="round parameters record: field 'neighbours' is a list of str, expected a list of integers"
    ):
        params_from(record)
    record = params_record(params)
    record["clip-range"] = 1  # an integer is a number
    assert params_from(record).clip_range == 1.0
    record["clip-range"] = False
    with pytest.raises(ValueError, match="field 'clip-range' is bool, expected a number"):
        params_from(record)
    record = params_record(params)
    record["s-publics"] = [b"s1", b"s2"]  # one key too many
    with pytest.raises(ValueError, match="zip"):
        params_from(record)
    record = params_record(params)
    del record["threshold"]
    with pytest.raises(KeyError):
        params_from(record)
    bad = indexed_bytes_record({1: b"x"})
    bad["data"] = [1]
    with pytest.raises(
        ValueError, match="share ciphertexts record: field 'data' is a list of int, expected a list of bytes"
    ):
        indexed_bytes_from(bad)
