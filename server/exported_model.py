"""What a merged model directory says about itself: ``fedtune.json``, written beside the weights at export.

A merged model travels without its run directory (to a hospital's model registry, say). The
record keeps what fedtune needs to use it again: the run's config made portable (file paths
dropped: they name the server's disks; the agreed labels inline), the round the weights come
from, and the fedtune version. ``fedtune evaluate``/``predict``/``generate`` read it, so a bare
merged directory needs no ``--config``.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from fedtune.common.atomic_files import atomic_write_json
from fedtune.common.config import ConfigError, FedtuneConfig, config_to_toml_dict

EXPORT_RECORD = "fedtune.json"


def fedtune_version() -> str:
    try:
        return version("fedtune")
    except PackageNotFoundError:  # pragma: no cover - a tree that was never installed
        return "0+unknown"


def portable_config(cfg: FedtuneConfig, labels: list[str]) -> dict[str, Any]:
    """The config as a TOML-like dict without the server's file paths (``model.path`` stays: the base model)."""
    raw = copy.deepcopy(config_to_toml_dict(cfg))
    data = raw.setdefault("data", {})
    for key in ("path", "test_path", "site_paths", "labels_file"):
        data.pop(key, None)
    if labels:
        data["labels"] = list(labels)
    if raw.get("partition", {}).get("scheme") == "files":
        raw["partition"]["scheme"] = "iid"  # "files" needs the sites' paths; nothing here partitions
    return raw


@dataclass(frozen=True)
class ExportRecord:
    """``fedtune.json``: the round the weights come from, the portable config, the fedtune that wrote it."""

    round: int | None
    config: dict[str, Any]
    fedtune_version: str

    def to_json(self) -> dict[str, Any]:
        return {"round": self.round, "fedtune-version": self.fedtune_version, "config": self.config}


def write_export_record(directory: Path, cfg: FedtuneConfig, labels: list[str], checkpoint_dir: Path) -> ExportRecord:
    """Record ``directory`` as built from the checkpoint in ``checkpoint_dir`` (its ``round.json`` names the round)."""
    round_file = Path(checkpoint_dir) / "round.json"
    round_ = json.loads(round_file.read_text(encoding="utf-8")).get("round") if round_file.exists() else None
    record = ExportRecord(round_, portable_config(cfg, labels), fedtune_version())
    atomic_write_json(Path(directory) / EXPORT_RECORD, record.to_json())
    return record


def read_export_record(directory: Path) -> ExportRecord | None:
    """The record of a merged directory, or None when it has none (exported before fedtune wrote one)."""
    path = Path(directory) / EXPORT_RECORD
    if not path.exists():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return ExportRecord(raw.get("round"), dict(raw["config"]), str(raw.get("fedtune-version", "")))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"{path}: not a fedtune export record ({exc}); remove it and give --config") from exc
