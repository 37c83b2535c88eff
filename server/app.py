"""Thin Flower glue for the operator: a ServerApp that runs :class:`FederationServer`."""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedtune.common.atomic_files import atomic_write_json
from fedtune.common.config import FedtuneConfig
from fedtune.common.data.encoding import encode_examples
from fedtune.common.data.federation_data import load_label_set, server_test_set
from fedtune.common.models.loading import BaseModelSpec
from fedtune.server.federation import FederationServer
from fedtune.server.global_model import GlobalModel


def run_federation(grid: Grid, cfg: FedtuneConfig, spec: BaseModelSpec, run_dir: Path, resume: bool) -> None:
    """Every round of one federation, then the merged model, summary table and plot in ``run_dir``."""
    model = GlobalModel(cfg, spec)
    test = server_test_set(cfg)
    labels = load_label_set(cfg.data) if cfg.model.task == "classification" else []
    test_set = encode_examples(test, model.tokenizer, cfg.model.task, labels, cfg.model.max_length)
    server = FederationServer(cfg, model, test_set, run_dir)
    records = server.run(grid, resume)
    outcome = server.finish(records)
    atomic_write_json(Path(run_dir) / "result.json", {"records": len(records), **outcome})
    print("\n" + outcome["table"], flush=True)


def build_server_app(cfg: FedtuneConfig, spec: BaseModelSpec, run_dir: Path, resume: bool = False) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_federation(grid, cfg, spec, run_dir, resume)

    return app
