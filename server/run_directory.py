"""A run's directory: created once with its config and run id, found again to resume."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

from fedtune.common.atomic_files import atomic_write_json
from fedtune.common.config import ConfigError, FedtuneConfig, config_from_dict, config_to_toml_dict


def start_run_dir(run_dir: Path, cfg: FedtuneConfig, run_id: str) -> Path:
    """Create ``run_dir`` with the config it runs and the run id sites key their ledgers by."""
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / "config.json", config_to_toml_dict(cfg))
    atomic_write_json(run_dir / "run.json", {"run-id": run_id, "created": time.time()})
    return run_dir


def new_run_dir(cfg: FedtuneConfig) -> Path:
    """A fresh, uniquely named run (a simulation)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = Path(cfg.run.output_dir) / f"{cfg.run.name}-{stamp}-{uuid.uuid4().hex[:4]}"
    run_dir.mkdir(parents=True)
    return start_run_dir(run_dir, cfg, uuid.uuid4().hex)


def named_run_dir(cfg: FedtuneConfig, output_dir: Path) -> tuple[Path, bool]:
    """The directory of the run named ``run.name`` (a deployment) and whether an earlier start left it to resume."""
    run_dir = Path(output_dir) / cfg.run.name
    if (run_dir / "run.json").exists():
        return run_dir, True
    return start_run_dir(run_dir, cfg, cfg.run.name), False


def load_run_config(run_dir: Path) -> FedtuneConfig:
    path = Path(run_dir) / "config.json"
    if not path.exists():
        raise ConfigError(f"{run_dir} is not a fedtune run directory (no config.json); cannot resume")
    # Validated as any config is, so a stored config that no longer holds (a model.path since
    # removed, say) is one line naming the field, not a traceback.
    return config_from_dict(json.loads(path.read_text()), str(path), Path(run_dir))
