"""Sites of different LoRA ranks: each trains its first components under DP-SGD and sends the global
shapes; one model serves them all in a process, and FFA-LoRA's exactness survives it."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from fedtune.client.app import check_outgoing_update, simulated_site_factory
from fedtune.client.policy import PolicyError, load_policy
from fedtune.client.site import Site
from fedtune.common.config import load_config
from fedtune.common.data.federation_data import SiteSplit
from fedtune.common.data.shapes import Example
from fedtune.common.models.lora import adapter_state, build_adapted_model, frozen_a_fingerprint
from tests.conftest import SAMPLES
from tests.plans import train_plan

MEDQUAD = SAMPLES / "medquad" / "medquad_sample.jsonl"
SPLIT = SiteSplit(
    train=[Example(f"question {i}?", f"answer number {i}.") for i in range(40)],
    val=[Example("question x?", "answer x.")] * 4,
)


def _config(tmp_path: Path, ffa: bool, *extra: str):
    toml = tmp_path / "c.toml"
    toml.write_text(f"""
[model]
name = "tiny-llama"
max_length = 24
[lora]
rank = 4
ffa = {str(ffa).lower()}
{chr(10).join(extra)}
[data]
task = "question-answer"
path = "{MEDQUAD}"
max_records = 120
[partition]
scheme = "iid"
num_clients = 3
min_examples = 10
""")
    return load_config(toml)


def _global_adapter(spec, cfg) -> dict[str, np.ndarray]:
    """The server's adapter at full rank, B moved off zero so that keeping the global values (not zeros)
    in a site's untrained components matters."""
    model, _ = build_adapted_model(spec, cfg.lora)
    rng = np.random.default_rng(0)
    return {
        k: v + (0.05 * rng.normal(size=v.shape)).astype(np.float32) if "lora_B" in k else v
        for k, v in adapter_state(model, cfg.lora.ffa).items()
    }


def _request(round_: int = 1, **kw):
    return train_plan(run_id="run-1", round=round_, local_steps=2, lr=0.05, target_epsilon=6.0, delta=1e-3, **kw)


@pytest.mark.parametrize("ffa", [False, True])
def test_a_lower_rank_site_trains_its_first_components_only_and_sends_the_global_shapes(tmp_path, tiny_llama_spec, ffa):
    cfg = _config(tmp_path, ffa)
    global_adapter = _global_adapter(tiny_llama_spec, cfg)
    site = Site("site-1", cfg, tiny_llama_spec, SPLIT, tmp_path / "site-1", lora_rank=2)
    outcome = site.train(_request(), global_adapter)  # DP-SGD through Opacus, on the resized layers
    assert outcome.noise_multiplier > 0
    assert {k: v.shape for k, v in outcome.adapter.items()} == {k: v.shape for k, v in global_adapter.items()}
    check_outgoing_update(outcome.adapter, global_adapter, 0.0)  # what the app checks before sending
    update = {k: outcome.adapter[k] - global_adapter[k] for k in global_adapter}
    b_keys = [k for k in update if "lora_B" in k]
    assert b_keys and all(np.all(update[k][:, 2:] == 0) for k in b_keys)
    assert all(np.any(update[k][:, :2] != 0) for k in b_keys)
    a_keys = [k for k in update if "lora_A" in k]
    assert (a_keys == []) == ffa  # under FFA-LoRA A is neither trained nor sent
    assert all(np.all(update[k][2:] == 0) and np.any(update[k][:2] != 0) for k in a_keys)


def test_one_model_serves_sites_of_every_rank_and_ffa_stays_exact(tmp_path, tiny_llama_spec):
    """Served in turn by one process (a simulation actor): rank 1 then 4 then 2. Each site's own weight
    update, computed from the layers it really trained with, is its padded B-update times the server's A."""
    from peft import get_peft_model_state_dict

    cfg = _config(tmp_path, True)
    server_model, _ = build_adapted_model(tiny_llama_spec, cfg.lora)
    fingerprint = frozen_a_fingerprint(server_model)
    server_a = {k: v.detach().numpy() for k, v in get_peft_model_state_dict(server_model).items() if "lora_A" in k}
    global_adapter = _global_adapter(tiny_llama_spec, cfg)
    sites = {r: Site(f"site-r{r}", cfg, tiny_llama_spec, SPLIT, tmp_path / f"r{r}", lora_rank=r) for r in (1, 4, 2)}
    assert len({id(s.model) for s in sites.values()}) == 1
    updates, own_delta_w = [], []
    for rank, site in sites.items():
        outcome = site.train(_request(a_fingerprint=fingerprint), global_adapter)  # refused if A differed
        trained = {k: v.detach().numpy() for k, v in get_peft_model_state_dict(site.model).items()}
        update = {k: v - global_adapter[k] for k, v in outcome.adapter.items()}
        updates.append(update)
        own = {}
        for a_key, server_a_full in server_a.items():
            b_key = a_key.replace("lora_A", "lora_B")
            assert trained[a_key].shape[0] == rank
            np.testing.assert_array_equal(trained[a_key], server_a_full[:rank])  # the shared A, after regrowing
            own[b_key] = (trained[b_key] - global_adapter[b_key][:, :rank]) @ trained[a_key]
            np.testing.assert_allclose(update[b_key] @ server_a_full, own[b_key], atol=1e-6)
        own_delta_w.append(own)
    for b_key in own_delta_w[0]:
        a_full = server_a[b_key.replace("lora_B", "lora_A")]
        mean_update = np.mean([u[b_key] for u in updates], axis=0)
        np.testing.assert_allclose(mean_update @ a_full, np.mean([o[b_key] for o in own_delta_w], axis=0), atol=1e-6)
    metrics = sites[2].evaluate(global_adapter, fingerprint)  # evaluated at the site's own rank
    assert np.isfinite(metrics["loss"])


def test_a_rank_above_the_federations_trains_at_the_federations_with_a_log_line(tmp_path, tiny_llama_spec, caplog):
    cfg = _config(tmp_path, True)
    with caplog.at_level(logging.WARNING, logger="fedtune.site"):
        site = Site("site-big", cfg, tiny_llama_spec, SPLIT, tmp_path / "big", lora_rank=16)
    assert site.lora_rank == 4
    assert "LoRA rank 16 asked for, but the federation's adapter has lora.rank = 4: training at 4" in caplog.text
    assert Site("site-0", cfg, tiny_llama_spec, SPLIT, tmp_path / "zero").lora_rank == 4


def test_the_policy_file_sets_the_sites_rank_and_refuses_a_negative_one(tmp_path):
    path = tmp_path / "policy.toml"
    path.write_text("[policy]\nlora_rank = 2\n")
    assert load_policy(path).lora_rank == 2
    path.write_text("[policy]\nlora_rank = -1\n")
    with pytest.raises(PolicyError, match=r"policy.toml: policy.lora_rank: Input should be greater than or equal"):
        load_policy(path)


def test_a_simulated_site_gets_its_site_ranks_entry(tmp_path, tiny_llama_spec):
    cfg = _config(tmp_path, True, "site_ranks = [4, 2, 1]")
    site_for = simulated_site_factory(cfg, tiny_llama_spec, tmp_path / "run")
    ranks = [site_for(SimpleNamespace(node_config={"partition-id": pid}, node_id=pid)).lora_rank for pid in range(3)]
    assert ranks == [4, 2, 1]


def test_a_deployed_sites_policy_rank_wins_over_the_run_config(tmp_path, monkeypatch):
    from fedtune.client import deployment

    monkeypatch.setattr(deployment, "configure_logging", lambda **_: None)
    cfg = _config(tmp_path, True, "site_ranks = [4, 2, 1]")
    run_config = {"fedtune-config": json.dumps(cfg.model_dump(mode="json"))}
    policy = tmp_path / "policy.toml"
    policy.write_text("[policy]\nlora_rank = 3\n")

    def deployed(node_id: int, **extra):
        state_dir = str(tmp_path / str(node_id))
        node_config = {"partition-id": 1, "data-path": str(MEDQUAD), "state-dir": state_dir, **extra}
        context = SimpleNamespace(run_id=7, node_id=node_id, node_config=node_config, run_config=run_config)
        return deployment.deployed_site(context)

    assert deployed(1, policy=str(policy)).lora_rank == 3
    assert deployed(2).lora_rank == 2  # no policy rank: the run's lora.site_ranks entry for partition 1
