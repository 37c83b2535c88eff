"""Where a deployment's files are: one folder per role, and the addresses that tie them together.

``fedtune deploy init`` (``deploy.bundle``) writes this layout; the command builders
(``deploy.commands``), compose files and systemd units read it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

CONNECTION = "fedtune"
APP_NAME = "fedtune-app"
SUPERNODE_BASE_PORT = 9094
#: The SuperLink's compose service name, which its TLS certificate also names.
SUPERLINK_SERVICE = "superlink"


@dataclass(frozen=True)
class Deployment:
    root: Path
    host: str
    port: int
    sites: tuple[str, ...]
    registry_port: int = 8001

    @property
    def operator(self) -> Path:
        return self.root / "operator"

    @property
    def app(self) -> Path:
        return self.operator / "app"

    def site_dir(self, site: str) -> Path:
        return self.root / "sites" / site

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def registry(self) -> Path:
        return self.operator / "registry"

    @property
    def registry_url(self) -> str:
        """The app registry runs beside the SuperLink, on loopback: only the SuperLink asks it."""
        return f"http://127.0.0.1:{self.registry_port}/v1"

    @property
    def signing_key_id(self) -> str:
        return (self.operator / "signing.key-id").read_text().strip()


def load_deployment(root: Path) -> Deployment:
    """The deployment that ``init_deployment`` wrote under ``root``."""
    path = Path(root).resolve() / "deployment.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: {root} is not a folder written by `fedtune deploy init`")
    meta = json.loads(path.read_text())
    return Deployment(path.parent, meta["host"], int(meta["port"]), tuple(meta["sites"]), int(meta["registry_port"]))
