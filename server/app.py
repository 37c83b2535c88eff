"""Thin Flower glue for the operator: a ServerApp that runs :class:`FederationServer`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedtune.common.atomic_files import atomic_write_json
from fedtune.common.config import FedtuneConfig
from fedtune.common.data.federation_data import agreed_labels, server_test_set
from fedtune.common.models.loading import BaseModelSpec
from fedtune.server.federation import EVERY_SITE_REFUSED, FederationServer
from fedtune.server.global_model import GlobalModel
from fedtune.server.messaging import Availability, every_connected_node


def run_federation(
    grid: Grid,
    cfg: FedtuneConfig,
    spec: BaseModelSpec,
    run_dir: Path,
    resume: bool,
    available: Availability = every_connected_node,
) -> None:
    """Every round of one federation, then the merged model, summary table and plot in ``run_dir``."""
    model = GlobalModel(cfg, spec)
    test = server_test_set(cfg)
    test_set = cfg.task.head.encode(test, model.tokenizer, agreed_labels(cfg), cfg.model.max_length)
    server = FederationServer(cfg, model, test_set, run_dir, available)
    records = server.run(grid, resume)
    outcome = server.finish(records)
    last = records[-1] if records else {}
    if last.get("status") == EVERY_SITE_REFUSED:
        reasons = "; ".join(f"{site}: {reason}" for site, reason in sorted(last.get("refused", {}).items()))
        outcome["stopped"] = f"every site refused round {last['round']} ({reasons or 'no reason given'})"
    atomic_write_json(Path(run_dir) / "result.json", {"records": len(records), **outcome})
    print("\n" + outcome["table"], flush=True)


def build_server_app(
    cfg: FedtuneConfig,
    spec: BaseModelSpec,
    run_dir: Path,
    resume: bool = False,
    available: Availability = every_connected_node,
    grid_view: Callable[[Grid], Grid] | None = None,
) -> ServerApp:
    """The ServerApp of a simulation; ``available`` and ``grid_view`` are how it shows late and slow sites."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_federation(grid_view(grid) if grid_view else grid, cfg, spec, run_dir, resume, available)

    return app
