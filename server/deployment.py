"""The ServerApp that ``flwr run`` starts on a SuperLink, configured from the signed app bundle.

The bundle's run config carries the federation's config as JSON (``fedtune-config``) and
where to keep runs (``output-dir``). A run is named by ``run.name``: its directory and the
run id that sites see are stable, so starting the same bundle again resumes after the
newest checkpoint, and sites replay rather than re-spend an update they already released.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.atomic_files import atomic_write_json
from common.config import FedtuneConfig, config_to_toml_dict
from common.logs import configure_logging
from common.models.loading import model_spec
from server.app import run_federation

log = logging.getLogger("fedtune.server")


def config_from_run_config(run_config: dict) -> FedtuneConfig:
    if "fedtune-config" not in run_config:
        raise ValueError("the app bundle has no fedtune-config in [tool.flwr.app.config]; rebuild it with "
                         "`fedtune deploy init`")
    return FedtuneConfig.model_validate(json.loads(str(run_config["fedtune-config"])))


def prepare_run_dir(cfg: FedtuneConfig, output_dir: Path) -> tuple[Path, bool]:
    """The run's directory and whether an earlier start of this run left checkpoints to resume."""
    run_dir = Path(output_dir) / cfg.run.name
    if (run_dir / "run.json").exists():
        return run_dir, True
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / "config.json", config_to_toml_dict(cfg))
    atomic_write_json(run_dir / "run.json", {"run-id": cfg.run.name, "created": time.time()})
    return run_dir, False


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    configure_logging()
    cfg = config_from_run_config(context.run_config)
    run_dir, resume = prepare_run_dir(cfg, Path(str(context.run_config.get("output-dir", cfg.run.output_dir))))
    log.info("federation %s: run directory %s%s", cfg.run.name, run_dir, " (resuming)" if resume else "")
    run_federation(grid, cfg, model_spec(cfg), run_dir, resume)
