"""FedAvg through the strategy seam gives exactly what the server computed before the seam existed."""

from __future__ import annotations

import numpy as np
import pytest

from fedtune.common.config import ConfigError, FederationConfig
from fedtune.server.checkpoints import CheckpointStore
from fedtune.server.strategies import available_strategies, build_strategy
from fedtune.server.strategies.fedavg import FedAvg
from fedtune.server.strategies.mean_delta import mean_delta


def weighted_mean_of_adapters(updates):
    """The server's FedAvg before the strategy seam (plain path): the weighted mean of whole adapters."""
    weights = np.asarray([w for _, w in updates], dtype=np.float64)
    return {
        k: np.tensordot(
            weights / weights.sum(), np.stack([np.asarray(s[k], np.float64) for s, _ in updates]), axes=1
        ).astype(np.float32)
        for k in sorted(updates[0][0])
    }


def _adapters(rng, n):
    shapes = {"lora_B.q": (64, 8), "lora_B.v": (64, 8), "head": (77, 64)}
    return [{k: rng.normal(scale=0.05, size=s).astype(np.float32) for k, s in shapes.items()} for _ in range(n)]


@pytest.mark.parametrize("seed", range(5))
def test_fedavg_over_the_mean_delta_is_bit_identical_to_averaging_adapters(seed):
    rng = np.random.default_rng(seed)
    current, *sites = _adapters(rng, 5)
    sites = [{k: current[k] + v for k, v in site.items()} for site in sites]  # trained from the global adapter
    updates = [(site, float(w)) for site, w in zip(sites, rng.integers(20, 5000, size=len(sites)), strict=False)]
    new = FedAvg().apply(current, mean_delta(updates, current), round_=1)
    before = weighted_mean_of_adapters(updates)
    for k in before:
        assert new[k].dtype == np.float32
        np.testing.assert_array_equal(new[k], before[k])


def test_fedavg_on_the_secure_path_adds_the_unmasked_mean_as_before():
    rng = np.random.default_rng(7)
    current, mean = _adapters(rng, 2)
    new = FedAvg().apply(current, mean, round_=3)
    for k in current:
        np.testing.assert_array_equal(new[k], current[k] + mean[k])


def test_strategies_are_found_by_name_and_unknown_names_are_refused():
    assert available_strategies()["fedavg"] is FedAvg
    assert isinstance(build_strategy(FederationConfig(strategy="fedavg")), FedAvg)
    with pytest.raises(
        ConfigError,
        match="federation.strategy = 'fedsgd' is not a known strategy; "
        "known: fedadagrad, fedadam, fedavg, fedavgm, fedyogi",
    ):
        build_strategy(FederationConfig(strategy="fedsgd"))


def test_a_stateless_strategy_refuses_a_checkpoint_that_holds_state():
    FedAvg().load_state_dict({})
    with pytest.raises(ValueError, match="keeps no state"):
        FedAvg().load_state_dict({"m": np.zeros(2)})


class _Peft:
    """Stands in for a peft model: save_pretrained writes the files a checkpoint is recognised by."""

    def save_pretrained(self, directory):
        (directory / "adapter_model.safetensors").write_bytes(b"x")


def test_strategy_state_is_saved_with_each_round_and_read_back(tmp_path):
    store = CheckpointStore(tmp_path)
    state = {"m": np.arange(6, dtype=np.float32).reshape(2, 3), "t": np.array(4)}
    store.save(1, _Peft(), {"status": "aggregated"}, state)
    got = CheckpointStore(tmp_path).latest().strategy_state()
    assert set(got) == {"m", "t"} and int(got["t"]) == 4
    np.testing.assert_array_equal(got["m"], state["m"])
    store.save(2, _Peft(), {"status": "aggregated"}, FedAvg().state_dict())
    latest = CheckpointStore(tmp_path).latest()
    assert latest.round == 2 and latest.strategy_state() == {}
