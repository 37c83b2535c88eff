"""A site's SecAgg+ handlers (``client.secure_aggregation``) refuse a malformed request or a
damaged saved round plainly, naming the record and the field, instead of misreading it."""

from __future__ import annotations

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedtune.client import secure_aggregation
from fedtune.common.secure_aggregation.protocol import ProtocolViolation
from fedtune.common.secure_aggregation.records import ADVERTISE, SHARE_KEYS, UNMASK, tag_record
from fedtune.common.wire import SECAGG, SiteState, SiteStatus

pytestmark = pytest.mark.usefixtures("server_identity")

TAG = b"fedtune/run/1"


def _context() -> Context:
    return Context(run_id=1, node_id=11, node_config={}, state=RecordDict(), run_config={})


def _request(record: ConfigRecord, message_type: str) -> Message:
    return Message(RecordDict({SECAGG: record}), message_type=message_type, dst_node_id=11)


def test_a_malformed_request_is_refused_naming_the_field():
    reply = secure_aggregation.advertise_step(
        _request(ConfigRecord({"round-tag": "not bytes"}), ADVERTISE), _context(), "north", lambda context: (10, 2)
    )
    status = SiteStatus.from_content(reply.content)
    assert status.state is SiteState.REFUSED
    assert status.reason == "advertise request record: field 'round-tag' is str, expected bytes"

    request = ConfigRecord({"round-tag": TAG, "survivors": [1, 2], "dropped": ["3"]})
    context = _context()
    secure_aggregation.advertise(context, TAG, 10, 2)
    context.state.config_records["secagg-current"] = context.state.config_records["secagg-next"]
    status = SiteStatus.from_content(secure_aggregation.unmask(_request(request, UNMASK), context, "north").content)
    assert status.state is SiteState.REFUSED
    assert status.reason == "unmask request record: field 'dropped' is a list of str, expected a list of integers"


def test_a_damaged_saved_round_is_an_error_naming_the_slot_and_field():
    context = _context()
    secure_aggregation.advertise(context, TAG, 10, 2)
    context.state.config_records["secagg-next"]["num-examples"] = "10"
    with pytest.raises(
        ValueError, match="site state 'secagg-next' record: field 'num-examples' is str, expected an integer"
    ):
        secure_aggregation.open_inbox(context, TAG, {})
    with pytest.raises(ProtocolViolation, match="this site holds"):
        secure_aggregation.open_inbox(context, b"fedtune/run/2", {})
    reply = secure_aggregation.share_keys(_request(tag_record(TAG), SHARE_KEYS), context, "north")
    assert SiteStatus.from_content(reply.content).state is SiteState.REFUSED
