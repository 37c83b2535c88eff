"""Every strategy is found by name, and a stateful one resumed from a checkpoint continues bit for bit."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from fedtune.common.config import FederationConfig, ServerOptimizerConfig
from fedtune.server.checkpoints import CheckpointStore
from fedtune.server.federation import restore_strategy
from fedtune.server.strategies import available_strategies, build_strategy
from fedtune.server.strategies.fedadagrad import FedAdagrad
from fedtune.server.strategies.fedadam import FedAdam
from fedtune.server.strategies.fedavg import FedAvg
from fedtune.server.strategies.fedavgm import FedAvgM
from fedtune.server.strategies.fedyogi import FedYogi

ROUNDS, SAVED_AFTER = 6, 3


def test_every_strategy_is_found_and_a_shared_base_is_not():
    assert available_strategies() == {
        "fedavg": FedAvg,
        "fedavgm": FedAvgM,
        "fedadam": FedAdam,
        "fedyogi": FedYogi,
        "fedadagrad": FedAdagrad,
    }


class _Peft:
    """Stands in for a peft model: save_pretrained writes the files a checkpoint is recognised by."""

    def save_pretrained(self, directory):
        (directory / "adapter_model.safetensors").write_bytes(b"x")


def _federation(name):
    return FederationConfig(strategy=name, server_optimizer=ServerOptimizerConfig(lr=0.05, momentum=0.8))


def _rounds():
    rng = np.random.default_rng(11)
    start = {"lora_B.q": rng.normal(scale=0.1, size=(16, 4)).astype(np.float32), "head": np.zeros((5, 16), np.float32)}
    deltas = [{k: rng.normal(scale=0.01, size=v.shape) for k, v in start.items()} for _ in range(ROUNDS)]
    return start, deltas


@pytest.mark.parametrize("name", sorted(available_strategies()))
def test_a_resumed_run_continues_bit_for_bit(name, tmp_path):
    start, deltas = _rounds()
    uninterrupted, adapters = build_strategy(_federation(name)), []
    current = start
    for round_, delta in enumerate(deltas, start=1):
        current = uninterrupted.apply(current, delta, round_)
        adapters.append(current)

    first = build_strategy(_federation(name))
    current = start
    for round_, delta in enumerate(deltas[:SAVED_AFTER], start=1):
        current = first.apply(current, delta, round_)
    store = CheckpointStore(tmp_path)
    store.save(SAVED_AFTER, _Peft(), {"status": "aggregated", "strategy": name}, first.state_dict())

    resumed = build_strategy(_federation(name))
    restore_strategy(resumed, CheckpointStore(tmp_path).latest())
    for round_, delta in enumerate(deltas[SAVED_AFTER:], start=SAVED_AFTER + 1):
        current = resumed.apply(current, delta, round_)
        for key in current:
            np.testing.assert_array_equal(current[key], adapters[round_ - 1][key])
    for key, value in uninterrupted.state_dict().items():
        np.testing.assert_array_equal(resumed.state_dict()[key], value)

    if name != "fedavg":  # the state is what makes it exact: a fresh optimiser goes elsewhere
        fresh = build_strategy(_federation(name)).apply(adapters[SAVED_AFTER - 1], deltas[SAVED_AFTER], SAVED_AFTER + 1)
        assert any(not np.array_equal(fresh[k], adapters[SAVED_AFTER][k]) for k in fresh)


def test_a_checkpoint_of_another_strategy_leaves_the_configured_one_fresh(tmp_path, caplog):
    adam = FedAdam()
    adam.apply({"x": np.zeros(2, np.float32)}, {"x": np.ones(2)}, 1)
    CheckpointStore(tmp_path).save(1, _Peft(), {"status": "aggregated", "strategy": "fedadam"}, adam.state_dict())
    yogi = FedYogi()
    with caplog.at_level(logging.WARNING, logger="fedtune.server"):
        restore_strategy(yogi, CheckpointStore(tmp_path).latest())
    assert yogi.state_dict() == {}
    assert "aggregated by strategy 'fedadam', the config names 'fedyogi'" in caplog.text


@pytest.mark.parametrize(
    ("strategy", "state", "message"),
    [
        (FedAvgM(), {"m/x": np.zeros(2)}, "keeps momentum per tensor, but the checkpoint holds 'm/x'"),
        (FedAdam(), {"m/x": np.zeros(2), "v/y": np.zeros(2)}, "cover different tensors"),
        (FedAdam(), {"x": np.zeros(2)}, "keeps m, v per tensor, but the checkpoint holds 'x'"),
    ],
)
def test_a_checkpoint_that_is_not_the_strategys_state_is_refused(strategy, state, message):
    with pytest.raises(ValueError, match=message):
        strategy.load_state_dict(state)


def test_state_over_other_tensors_than_the_adapter_is_refused():
    adam = FedAdam()
    adam.load_state_dict({"m/x": np.zeros(2), "v/x": np.ones(2)})
    with pytest.raises(ValueError, match="the state and the adapter disagree on tensor names"):
        adam.apply({"y": np.zeros(2, np.float32)}, {"y": np.ones(2)}, 1)
    with pytest.raises(ValueError, match="state tensor 'x' has shape \\(2,\\), the adapter's \\(3,\\)"):
        adam.apply({"x": np.zeros(3, np.float32)}, {"x": np.ones(3)}, 1)
