"""The communication benchmark's measures: Flower's wire size of a message, and a real SecAgg+ round."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from fedtune.common.config import load_config, preset_path
from fedtune.common.wire import TrainReport
from tests.benchmarks.scripts import load_benchmark_script

pytestmark = pytest.mark.usefixtures("server_identity")

communication = load_benchmark_script("communication")


def _message(**arrays: np.ndarray) -> Message:
    record = ArrayRecord(array_dict={k: Array(v) for k, v in arrays.items()})
    return Message(
        RecordDict({"adapter": record, "plan": ConfigRecord({"round": 1})}),
        message_type=MessageType.TRAIN,
        dst_node_id=7,
    )


def test_wire_bytes_count_every_value_once():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=1000).astype(np.float32), rng.normal(size=1000).astype(np.float32)
    one = communication.message_wire_bytes(_message(a=a))
    two = communication.message_wire_bytes(_message(a=a, b=b))
    twice = communication.message_wire_bytes(_message(a=a, b=a.copy()))
    assert 4000 < one < 4000 + 2000
    assert two - one >= 4000
    # Flower stores equal chunks once: a repeated array costs its small header, not its data.
    assert twice - one < 1000
    assert communication.values_in(_message(a=a, b=b).content) == 2000


REPORT = TrainReport(num_examples=1, steps=1, epsilon_spent=1.0, noise_multiplier=1.0, sample_rate=0.1)


def test_secure_round_measures_every_step_and_unmasks_the_true_mean():
    cfg = load_config(preset_path("banking77-minilm"))
    down = {"b": np.zeros((20, 10), np.float32), "head": np.zeros(7, np.float32)}
    rng = np.random.default_rng(1)
    rounds = {n: communication.secure_round(cfg, down, "fp", n, REPORT, {"loss": 1.0}, rng) for n in (3, 5)}
    for n, result in rounds.items():
        assert result.relative_error < 1e-6
        assert set(result.exchanges) and len(result.exchanges) == n
        for exchanges in result.exchanges.values():
            steps = {e.step: e for e in exchanges}
            assert list(steps) == ["train", "unmask", "evaluate"]
            assert steps["train"].up_values == 207 + 1  # the masked vector (and the next round's keys)
            assert steps["train"].up_bytes > 4 * 208
            assert steps["unmask"].up_values == 0
        for exchanges in result.setup.values():
            assert [e.step for e in exchanges] == ["advertise", "share keys"]
    # One encrypted share per neighbour: 4 neighbours cost more than 2.
    share_up = {n: r.setup[min(r.setup)][1].up_bytes for n, r in rounds.items()}
    assert (rounds[3].neighbours, rounds[5].neighbours) == (2, 4)
    assert share_up[5] - share_up[3] >= 2 * 100


def test_full_weights_count_tied_embeddings_once(tiny_llama_spec):
    from fedtune.common.models.loading import load_base_model

    model = load_base_model(tiny_llama_spec)
    weights = communication.full_weights(model)
    assert sum(v.size for v in weights.values()) == sum(p.numel() for p in model.parameters())
    assert sum(v.size for v in weights.values()) < sum(v.numel() for v in model.state_dict().values())
    assert all(v.dtype == np.float32 for v in weights.values())
