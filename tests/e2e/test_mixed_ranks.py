"""Sites of ranks 4, 2 and 1 in a real Flower simulation: 2 rounds, DP-SGD, secure aggregation, A trained.

The server sees only the masked sum; each site's update is zero beyond its rank (read from the
site's own replay file against the global adapter of the round before), and the server's SVD
step leaves every layer of the global adapter in SVD form (A with orthonormal rows).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedtune.common.config import load_config
from fedtune.common.models.lora_ranks import is_lora_a, is_lora_b
from tests.conftest import SAMPLES

pytestmark = pytest.mark.e2e

RANKS = [4, 2, 1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from fedtune.simulation import simulate

    tmp = tmp_path_factory.mktemp("ranks")
    (tmp / "c.toml").write_text(f"""
[run]
name = "ranks"
output_dir = "{tmp / "runs"}"
[model]
name = "tiny-llama"
max_length = 32
[lora]
rank = 4
site_ranks = {RANKS}
[data]
task = "question-answer"
path = "{SAMPLES / "medquad" / "medquad_sample.jsonl"}"
max_records = 240
max_eval_examples = 8
[partition]
scheme = "iid"
num_clients = 3
min_examples = 10
[federation]
rounds = 2
min_clients = 3
[train]
local_steps = 2
batch_size = 8
lr = 0.02
[privacy]
epsilon = 6.0
delta = 1e-3
""")
    cfg = load_config(tmp / "c.toml")
    assert cfg.secure_aggregation.enabled and cfg.lora.svd_refactorisation
    run_dir = simulate(cfg)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return run_dir, records


def _checkpoint(run_dir, round_: int) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(run_dir / "checkpoints" / f"round-{round_:04d}" / "adapter_model.safetensors"))


def test_every_round_aggregates_all_three_ranks_securely(run):
    _, records = run
    assert [r["status"] for r in records[1:]] == ["aggregated 3 sites securely"] * 2


def test_each_sites_update_is_zero_beyond_its_rank(run):
    run_dir, _ = run
    before = _checkpoint(run_dir, 1)  # the global adapter round 2 started from
    for pid, rank in enumerate(RANKS):
        with np.load(run_dir / "sites" / f"site-{pid}" / "last_update.npz", allow_pickle=False) as saved:
            assert json.loads(str(saved["__meta__"]))["round"] == 2
            sent = {k: saved[k] for k in saved.files if k != "__meta__"}
        for key, value in sent.items():
            update = value - before[key]
            if is_lora_b(key):
                assert np.all(update[:, rank:] == 0) and np.any(update[:, :rank] != 0), (pid, key)
            elif is_lora_a(key):
                assert np.all(update[rank:] == 0) and np.any(update[:rank] != 0), (pid, key)


def test_the_global_adapter_is_left_in_svd_form_every_round(run):
    run_dir, _ = run
    for round_ in (1, 2):
        state = _checkpoint(run_dir, round_)
        a_keys = [k for k in state if is_lora_a(k)]
        assert a_keys
        for key in a_keys:
            a = state[key].astype(np.float64)
            np.testing.assert_allclose(a @ a.T, np.eye(a.shape[0]), atol=1e-4)
            b = state[key.replace("lora_A", "lora_B")].astype(np.float64)
            norms = np.linalg.norm(b, axis=0)  # = the singular values, in order
            assert np.all(np.diff(norms) <= 1e-6)
