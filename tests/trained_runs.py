"""Run directories built by hand, as a finished run leaves them, without running a federation.

A config, a perturbed global adapter saved as round 1's checkpoint, metrics.jsonl with two
sites' DP accounting, and the merged export with its model cards: what ``fedtune evaluate``,
``predict``, ``generate`` and the model card read. Cheaper than a simulation by far.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedtune.common.config import FedtuneConfig, config_from_dict
from fedtune.common.models.loading import model_spec
from fedtune.server.checkpoints import CheckpointStore
from fedtune.server.global_model import GlobalModel
from fedtune.server.model_card import write_model_cards
from fedtune.server.report import MetricsLog
from fedtune.server.run_directory import start_run_dir
from tests.conftest import SAMPLES

LABELS = ["card_arrival", "exchange_rate", "Refund_not_showing_up"]
DATA_DESCRIPTION = "Banking77 customer queries from three banks, 2020; public data, no patients."


@dataclass
class TrainedRun:
    run_dir: Path
    cfg: FedtuneConfig
    model: GlobalModel
    records: list[dict[str, Any]]
    data: Path  # a labelled file in the run's format


def banking_file(path: Path, per_label: int = 6) -> Path:
    """A small CSV of the sample's records of :data:`LABELS` (``text``, ``category``)."""
    with open(SAMPLES / "banking77" / "test.csv", encoding="utf-8") as fh:
        rows = [r for r in csv.DictReader(fh) if r["category"] in LABELS]
    chosen = [r for label in LABELS for r in [r for r in rows if r["category"] == label][:per_label]]
    with open(path, "w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["text", "category"])
        writer.writeheader()
        writer.writerows(chosen)
    return path


def medquad_file(path: Path, n: int = 6) -> Path:
    lines = (SAMPLES / "medquad" / "medquad_sample.jsonl").read_text(encoding="utf-8").splitlines()[:n]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _records(server_metrics: dict[str, float]) -> list[dict[str, Any]]:
    def train(eps: float) -> dict[str, float]:
        return {"num-examples": 10, "steps": 2, "epsilon": eps, "noise-multiplier": 1.1, "sample-rate": 0.5}

    return [
        {"round": 0, "server": server_metrics, "clients": {}, "status": "base model"},
        {
            "round": 1,
            "server": server_metrics,
            "train": {"site-0": train(2.5), "site-1": train(3.0)},
            "status": "aggregated 2 sites",
            "site-level-epsilon": 12.0,
            "site-level-delta": 0.01,
        },
        {"round": 2, "server": server_metrics, "train": {"site-0": train(4.0)}, "status": "aggregated 1 sites"},
    ]


def build_run(tmp_path: Path, task: str = "classification", pooling: str = "auto", export: bool = True) -> TrainedRun:
    """A finished two-round run whose merged model comes from round 1 (round 2 is checkpointed too)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    if task == "classification":
        data = banking_file(tmp_path / "test.csv")
        raw: dict[str, Any] = {
            "model": {"name": "tiny-bert", "max_length": 32, "pooling": pooling},
            "data": {"path": str(data), "task": task, "labels": LABELS, "fields": {"label": "category"}},
            "lora": {"rank": 2},
        }
    else:
        data = medquad_file(tmp_path / "test.jsonl")
        raw = {
            "model": {"name": "tiny-llama", "max_length": 48},
            "data": {"path": str(data), "task": task},
            "lora": {"rank": 2},
        }
    raw |= {
        "run": {"name": "trained", "data_description": DATA_DESCRIPTION, "output_dir": str(tmp_path)},
        "partition": {"num_clients": 2},
        "secure_aggregation": {"enabled": False},
    }
    cfg = config_from_dict(raw, "test", tmp_path)
    model = GlobalModel(cfg, model_spec(cfg))
    torch.manual_seed(0)
    with torch.no_grad():  # LoRA's B starts at zero: move every trained tensor so the adapter changes the model
        for p in model.model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    run_dir = start_run_dir(tmp_path / "run", cfg, "run-id")
    store = CheckpointStore(run_dir / "checkpoints")
    for round_ in (1, 2):
        store.save(round_, model.model, {"status": "aggregated", "run-id": "run-id", "strategy": "fedavg"})
    metrics = {"loss": 1.0, "accuracy": 0.5, "macro-f1": 0.4} if task == "classification" else {"loss": 2.0}
    records = _records(metrics | {"num-examples": 18.0})
    log = MetricsLog(run_dir / "metrics.jsonl")
    for record in records:
        log.append(record)
    (run_dir / "best.json").write_text(json.dumps({"kept-round": 1}), encoding="utf-8")
    if export:
        model.export_merged(store.path_for(1), run_dir / "merged")
        write_model_cards(run_dir, cfg, records)
    return TrainedRun(run_dir, cfg, model, records, data)
