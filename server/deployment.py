"""The ServerApp that ``flwr run`` starts on a SuperLink, configured from the signed app bundle.

The bundle's run config carries the federation's config as JSON (``fedtune-config``) and
where to keep runs (``output-dir``). A run is named by ``run.name``: its directory and the
run id that sites see are stable, so starting the same bundle again resumes after the
newest checkpoint, and sites replay rather than re-spend an update they already released.
"""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedtune.common.config import config_from_run_config
from fedtune.common.logs import configure_logging
from fedtune.common.models.lora import checked_model_spec
from fedtune.server.app import run_federation
from fedtune.server.run_directory import named_run_dir

log = logging.getLogger("fedtune.server")

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    configure_logging(service=True)
    cfg = config_from_run_config(context.run_config)
    spec = checked_model_spec(cfg)  # a model problem stops here, before the run directory exists
    run_dir, resume = named_run_dir(cfg, Path(str(context.run_config.get("output-dir", cfg.run.output_dir))))
    log.info("federation %s: run directory %s%s", cfg.run.name, run_dir, " (resuming)" if resume else "")
    run_federation(grid, cfg, spec, run_dir, resume)
