"""A real Flower simulation (Ray) of 3 sites x 2 rounds with DP-SGD on a tiny LoRA model.

This run uses plain FedAvg (secure aggregation off) so the adapters themselves can be
inspected; ``test_secure_aggregation`` covers the default, masked path.

Checks the whole privacy story end to end: what travels, what each site's ledger says,
that the held-out metric moves, that checkpoints and the merged model load with plain
peft/transformers, and that a resumed run replays rather than re-spends privacy.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from fedtune.common.config import load_config
from fedtune.common.privacy.accounting import epsilon_spent
from fedtune.common.wire import ADAPTER, METRICS, PLAN, STATUS, SiteStatus, TrainReport, array_record_nbytes
from tests.e2e.message_spy import simulate_recording_messages

pytestmark = pytest.mark.e2e

SAMPLES = Path(__file__).resolve().parents[2] / "common" / "data" / "samples"
EPSILON = 4.0


def _config(tmp_path: Path):
    toml = tmp_path / "tiny.toml"
    toml.write_text(f"""
[run]
name = "e2e"
output_dir = "{tmp_path / "runs"}"
[model]
name = "tiny-llama"
max_length = 48
[lora]
rank = 4
alpha = 16
ffa = true
[data]
task = "question-answer"
path = "{SAMPLES / "medquad" / "medquad_sample.jsonl"}"
max_records = 360
max_eval_examples = 24
[partition]
scheme = "column"
column = "source"
num_clients = 3
min_examples = 10
[federation]
rounds = 2
min_clients = 3
[train]
local_steps = 4
batch_size = 8
lr = 0.02
[privacy]
epsilon = {EPSILON}
delta = 1e-3
share_site_metrics = true
[secure_aggregation]
enabled = false
""")
    return load_config(toml)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    cfg = _config(tmp_path_factory.mktemp("sim"))
    run_dir, seen = simulate_recording_messages(cfg)
    return cfg, run_dir, seen


def _is_float32_payload(nbytes: int, n_params: int, n_arrays: int) -> bool:
    """4 bytes a value plus one small .npy header (at most 256 bytes) per named tensor."""
    return 4 * n_params < nbytes <= 4 * n_params + 256 * n_arrays


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_rounds_aggregate_every_site_and_improve_held_out_loss(finished_run):
    _, run_dir, _ = finished_run
    records = _records(run_dir)
    assert [r["round"] for r in records] == [0, 1, 2]
    assert [r["status"] for r in records[1:]] == ["aggregated 3 sites"] * 2
    assert records[2]["server"]["loss"] < records[0]["server"]["loss"]
    assert set(records[2]["clients"]) == {"site-0", "site-1", "site-2"}
    assert (run_dir / "curves.png").stat().st_size > 10_000
    assert "held-out loss" in (run_dir / "summary.txt").read_text()


def test_only_adapter_tensors_travel(finished_run):
    cfg, _, seen = finished_run
    from fedtune.common.models.loading import model_spec
    from fedtune.common.models.lora import build_adapted_model

    model, _ = build_adapted_model(model_spec(cfg), cfg.lora)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_B" in n for n in trainable), "FFA-LoRA trains B only"
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert len(seen) == 5  # eval round 0, then train + eval for two rounds
    for requests, replies in seen:
        assert len(requests) == len(replies) == 3
        for msg in requests:
            assert set(msg.content.keys()) == {ADAPTER, PLAN}
            keys = list(msg.content[ADAPTER].keys())
            assert keys and all("lora_B" in k for k in keys)
            assert _is_float32_payload(array_record_nbytes(msg.content[ADAPTER]), n_params, len(keys))
        for reply in replies:
            assert not reply.has_error()
            assert set(reply.content.keys()) <= {ADAPTER, METRICS, STATUS}
            if ADAPTER in reply.content:
                assert list(reply.content[ADAPTER].keys()) == keys
                assert _is_float32_payload(array_record_nbytes(reply.content[ADAPTER]), n_params, len(keys))
            if ADAPTER in reply.content:
                assert set(reply.content[METRICS].keys()) == set(TrainReport.keys()), "no training loss leaves"
            for value in reply.content[METRICS].values():
                assert isinstance(value, (int, float)), "metrics are aggregate scalars, never per-record data"
            assert set(reply.content[STATUS].keys()) == set(SiteStatus.keys())


def test_bytes_are_reported_per_site_per_round(finished_run):
    _, run_dir, seen = finished_run
    train = _records(run_dir)[1]["train"]
    requests, replies = seen[1]
    assert {t["bytes-sent"] for t in train.values()} == {array_record_nbytes(requests[0].content[ADAPTER])}
    assert {t["bytes-received"] for t in train.values()} == {array_record_nbytes(replies[0].content[ADAPTER])}


def test_each_site_ledger_holds_accountant_epsilon_within_target(finished_run):
    cfg, run_dir, _ = finished_run
    records = _records(run_dir)
    for site in ("site-0", "site-1", "site-2"):
        ledger = json.loads((run_dir / "sites" / site / "privacy_ledger.json").read_text())
        assert [e["round"] for e in ledger["entries"]] == [1, 2]
        history = [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in ledger["entries"]]
        assert sum(e["steps"] for e in ledger["entries"]) == 2 * cfg.train.local_steps
        eps = epsilon_spent(history, cfg.privacy.delta)
        assert ledger["epsilon"] == pytest.approx(eps, rel=1e-9)
        assert records[2]["train"][site]["epsilon"] == pytest.approx(eps, rel=1e-9)
        assert 0.5 * EPSILON < eps <= EPSILON


def test_checkpoints_and_merged_model_load_with_plain_libraries(finished_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg, run_dir, _ = finished_run
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["round-0001", "round-0002"]
    from fedtune.common.models.loading import model_spec

    base = AutoModelForCausalLM.from_pretrained(model_spec(cfg).directory)
    kept = json.loads((run_dir / "best.json").read_text())["kept-round"]  # federation.keep = "best"
    assert kept == json.loads((run_dir / "result.json").read_text())["kept-round"] in (1, 2)
    peft_model = PeftModel.from_pretrained(base, run_dir / "checkpoints" / f"round-{kept:04d}").eval()
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "merged").eval()
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "merged")
    ids = tokenizer("Question: What is gout?\nAnswer: ", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, peft_model(ids).logits, rtol=1e-4, atol=1e-4)
        fresh = AutoModelForCausalLM.from_pretrained(model_spec(cfg).directory)(ids).logits
    assert not torch.allclose(fresh, merged(ids).logits), "the merged model must differ from the base"


def test_resume_redoes_a_lost_round_by_replaying_site_updates(finished_run):
    from safetensors.numpy import load_file

    from fedtune.simulation import simulate

    cfg, run_dir, _ = finished_run
    ckpt = run_dir / "checkpoints" / "round-0002"
    original = load_file(str(ckpt / "adapter_model.safetensors"))
    ledgers = {p: p.read_bytes() for p in (run_dir / "sites").glob("*/privacy_ledger.json")}
    shutil.rmtree(ckpt)  # as if the server crashed before round 2 was checkpointed
    simulate(cfg, run_dir=run_dir, resume=True)
    resumed = load_file(str(ckpt / "adapter_model.safetensors"))
    assert set(resumed) == set(original)
    for key in original:
        np.testing.assert_array_equal(resumed[key], original[key])
    assert [r["round"] for r in _records(run_dir)] == [0, 1, 2]
    for path, before in ledgers.items():
        assert path.read_bytes() == before, "replaying a released update must not spend privacy again"
