"""Files that keep a deployment running as services: compose files (containers) and systemd units (hosts)."""

from __future__ import annotations

from pathlib import Path

from deploy.bundle import Deployment
from deploy.compose import write_compose_files
from deploy.systemd_units import write_systemd_units


def write_service_files(d: Deployment) -> list[Path]:
    return write_compose_files(d) + write_systemd_units(d)
