"""The wire contract (``common.wire``): each record survives Flower's serialisation, and one that
breaks the contract is stopped where it arrives, with a message naming the record and the field."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import Array, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.common.serde import (
    config_record_from_proto,
    config_record_to_proto,
    metric_record_from_proto,
    metric_record_to_proto,
)

from fedtune.common.wire import (
    ADAPTER,
    PLAN,
    PROTOCOL_VERSION,
    STATUS,
    EvaluatePlan,
    EvaluationReport,
    ProtocolMismatch,
    RunEnded,
    SiteNoise,
    SiteState,
    SiteStatus,
    TrainPlan,
    TrainReport,
    WireError,
    array_of,
    to_array_record,
)
from tests.plans import train_plan

PLAN_ = train_plan(
    run_id="run-1",
    round=2,
    total_rounds=5,
    local_steps=3,
    lr=0.01,
    optimizer="adam",
    a_fingerprint="ab12",
    secure_aggregation=True,
    proximal_mu=0.01,
    site_noise=SiteNoise.DISTRIBUTED,
    site_clip_norm=0.5,
    site_noise_multiplier=1.1,
)


def _over_the_wire(record: ConfigRecord | MetricRecord) -> ConfigRecord | MetricRecord:
    """The record as the other side gets it: through Flower's protobuf serialisation."""
    if isinstance(record, MetricRecord):
        return metric_record_from_proto(metric_record_to_proto(record))
    return config_record_from_proto(config_record_to_proto(record))


@pytest.mark.parametrize(
    "message",
    [
        PLAN_,
        EvaluatePlan(round=0, a_fingerprint="ab12"),
        RunEnded(run_id="run-1", round=4, reason="stopped early at round 4"),
        TrainReport(num_examples=60, steps=3, epsilon_spent=2.5, noise_multiplier=1.1, sample_rate=0.13),
        SiteStatus("site-0", SiteState.TRAINED),
        SiteStatus("site-1", SiteState.REFUSED, "privacy budget exhausted"),
    ],
    ids=lambda m: type(m).__name__,
)
def test_every_record_round_trips_through_flower(message):
    record = message.to_record()
    assert set(record) == set(type(message).keys())
    assert type(message).from_record(_over_the_wire(record)) == message


def test_an_evaluation_report_round_trips_as_floats_and_cannot_be_changed():
    report = EvaluationReport({"loss": 1.5, "accuracy": 0.75, "num-examples": 12})
    back = EvaluationReport.from_record(_over_the_wire(report.to_record()))
    assert back == report and dict(back.metrics) == {"loss": 1.5, "accuracy": 0.75, "num-examples": 12.0}
    assert all(type(v) is float for v in back.metrics.values())
    with pytest.raises(TypeError):
        back.metrics["loss"] = 0.0  # type: ignore[index]


def test_without_dp_the_spent_epsilon_travels_as_infinity():
    report = TrainReport(num_examples=1, steps=1, epsilon_spent=math.inf, noise_multiplier=0.0, sample_rate=1.0)
    assert TrainReport.from_record(_over_the_wire(report.to_record())).epsilon_spent == math.inf


def test_target_and_spent_epsilon_travel_under_different_keys():
    assert "target-epsilon" in TrainPlan.keys() and "epsilon-spent" in TrainReport.keys()
    assert "epsilon" not in TrainPlan.keys() + TrainReport.keys()


def test_a_missing_field_names_the_record_and_the_field():
    record = PLAN_.to_record()
    del record["local-steps"]
    with pytest.raises(
        WireError,
        match=r"TrainPlan \('plan' record\): field 'local-steps' is missing, "
        r"expected an integer",
    ):
        TrainPlan.from_record(record)


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("dp", 1, "a boolean"),
        ("local-steps", 2.5, "an integer"),
        ("local-steps", True, "an integer"),
        ("lr", "0.01", "a number"),
        ("run-id", 7, "a string"),
        ("site-noise", "sometimes", "one of 'off', 'distributed', 'server'"),
    ],
)
def test_a_wrongly_typed_field_is_refused(key, value, expected):
    record = PLAN_.to_record()
    record[key] = value
    with pytest.raises(WireError, match=rf"field '{key}' is {value!r} \({type(value).__name__}\), expected {expected}"):
        TrainPlan.from_record(record)


def test_an_integer_is_a_number_and_extra_keys_are_ignored():
    record = PLAN_.to_record()
    record["lr"], record["something-new"] = 1, "x"
    plan = TrainPlan.from_record(record)
    assert plan.lr == 1.0 and type(plan.lr) is float


def test_an_unknown_state_is_refused_naming_the_states_known():
    record = ConfigRecord({"site-id": "site-0", "state": "exploded", "reason": ""})
    with pytest.raises(WireError, match=r"field 'state' is 'exploded' \(str\), expected one of 'trained', 'refused'"):
        SiteStatus.from_record(record)


def test_a_metric_that_is_not_a_number_is_refused():
    with pytest.raises(WireError, match=r"EvaluationReport \('metrics' record\): metric 'loss' is 'low'"):
        EvaluationReport({"loss": "low"})


def test_a_message_without_the_record_is_refused():
    with pytest.raises(WireError, match=r"SiteStatus \('status' record\): the message carries no such record"):
        SiteStatus.from_content(RecordDict({"metrics": MetricRecord({"steps": 1})}))


@pytest.mark.parametrize(
    ("theirs", "upgrade"), [(PROTOCOL_VERSION + 1, "this site"), (PROTOCOL_VERSION - 1, "the server")]
)
def test_a_plan_of_another_protocol_version_says_which_side_to_upgrade(theirs, upgrade):
    for plan in (PLAN_, EvaluatePlan(round=1)):
        record = plan.to_record()
        record["protocol-version"] = theirs
        del record["round"]  # another version may lay its fields out differently: the version is checked first
        with pytest.raises(
            ProtocolMismatch,
            match=f"server speaks fedtune wire protocol {theirs}, "
            f"this site {PROTOCOL_VERSION}: upgrade fedtune on {upgrade}",
        ):
            type(plan).from_record(record)


def test_a_plan_without_a_version_comes_from_an_older_server():
    record = PLAN_.to_record()
    del record["protocol-version"]
    with pytest.raises(ProtocolMismatch, match="unversioned .* upgrade fedtune on the server"):
        TrainPlan.from_record(record)


class SiteThatMustNotRun:
    """Stands in for ``client.site.Site``: any training or evaluation fails the test."""

    site_id = "site-11"
    cfg = SimpleNamespace(privacy=SimpleNamespace(share_site_metrics=True))
    policy = SimpleNamespace(allow_site_metrics=True, min_aggregation_sites=2)

    def train(self, request, adapter):
        raise AssertionError("the site trained on a plan of another protocol version")

    def evaluate(self, adapter, fingerprint=""):
        raise AssertionError("the site evaluated on a plan of another protocol version")


@pytest.mark.usefixtures("server_identity")
@pytest.mark.parametrize(
    ("message_type", "plan"), [(MessageType.TRAIN, PLAN_), (MessageType.EVALUATE, EvaluatePlan(round=1))]
)
def test_a_site_refuses_a_plan_of_another_version_with_a_normal_reply(message_type, plan):
    from fedtune.client.app import build_client_app

    record = plan.to_record()
    record["protocol-version"] = PROTOCOL_VERSION + 1
    request = Message(
        RecordDict({ADAPTER: to_array_record({"w": np.zeros(4, np.float32)}), PLAN: record}),
        message_type=message_type,
        dst_node_id=11,
    )
    request.metadata.__dict__["_message_id"] = request.object_id
    context = Context(run_id=1, node_id=11, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    reply = build_client_app(lambda context: SiteThatMustNotRun())(request, context)
    assert not reply.has_error()
    assert list(reply.content.keys()) == [STATUS], "a refusal carries no tensors and no metrics"
    status = SiteStatus.from_content(reply.content)
    assert (status.site_id, status.state) == ("site-11", SiteState.REFUSED)
    assert status.reason == (
        f"server speaks fedtune wire protocol {PROTOCOL_VERSION + 1}, this site "
        f"{PROTOCOL_VERSION}: upgrade fedtune on this site"
    )


@pytest.mark.parametrize(
    "values",
    [
        np.arange(1_000_001, dtype=np.uint64),
        np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4),
        np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4).T,  # not C-contiguous
        np.arange(20, dtype=np.float64)[::3],  # strided
        np.zeros(0, dtype=np.float32),
        np.array(2.5, dtype=np.float32),  # 0-d
    ],
)
def test_array_of_sends_the_bytes_flowers_array_would(values):
    packed = array_of(values)
    reference = Array(np.ascontiguousarray(values))
    assert (packed.data, packed.dtype, packed.shape, packed.stype) == (
        reference.data,
        reference.dtype,
        reference.shape,
        reference.stype,
    )
    np.testing.assert_array_equal(packed.numpy(), values)
