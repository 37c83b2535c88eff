"""The exact commands of each role, built once as argument lists.

The start scripts, compose files, systemd units, the README and the end-to-end test all run
what these functions return, so they cannot drift apart.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from fedtune.deploy.app_registry import app_identity
from fedtune.deploy.layout import CONNECTION, SUPERNODE_BASE_PORT, Deployment


def flower_env(home: Path) -> dict[str, str]:
    """Environment for a Flower process: this Python's tools first on PATH, its own Flower home."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update({"FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"})
    return env


def superlink_env(d: Deployment) -> dict[str, str]:
    """Where the SuperLink fetches signed app bundles (Flower reads it at import time)."""
    return {"FLWR_SUPERGRID_API_URL": d.registry_url}


def registry_command(d: Deployment) -> list[str]:
    return ["fedtune", "deploy", "registry", str(d.root)]


def sign_command(d: Deployment) -> list[str]:
    return ["fedtune", "deploy", "sign", str(d.root)]


def superlink_command(d: Deployment) -> list[str]:
    o = d.operator
    return [
        "flower-superlink",
        "--ssl-ca-certfile",
        str(o / "ca.crt"),
        "--ssl-certfile",
        str(o / "superlink.crt"),
        "--ssl-keyfile",
        str(o / "superlink.key"),
        "--enable-supernode-auth",
        "--database",
        str(o / "superlink-state.db"),
        "--host",
        d.host,
        "--port",
        str(d.port),
        "--disable-runtime-dependency-installation",
    ]


def register_command(d: Deployment, site: str) -> list[str]:
    return ["flwr", "supernode", "register", str(d.operator / "site-keys" / f"{site}.pub"), CONNECTION]


def run_command(d: Deployment, signed: bool = True) -> list[str]:
    """Run the signed bundle by name; ``signed=False`` sends the local folder, which signed-only sites refuse."""
    if not signed:
        return ["flwr", "run", str(d.app), CONNECTION, "--stream"]
    app_id, version = app_identity(d.app)
    return ["flwr", "run", f"{app_id}=={version}", CONNECTION, "--stream"]


def supernode_command(
    d: Deployment,
    site: str,
    require_signed_apps: bool = True,
    port: int | None = None,
    root_certificates: Path | None = None,
    auth_key: Path | None = None,
) -> list[str]:
    s = d.site_dir(site)
    index = d.sites.index(site) if site in d.sites else 0
    node_config = " ".join(
        [
            f"site-id={json.dumps(site)}",
            f"partition-id={index}",
            f"policy={json.dumps(str(s / 'policy.toml'))}",
            f"state-dir={json.dumps(str(s / 'state'))}",
        ]
    )
    cmd = [
        "flower-supernode",
        "--superlink",
        d.address,
        "--root-certificates",
        str(root_certificates or s / "ca.crt"),
        "--auth-supernode-private-key",
        str(auth_key or s / "auth"),
        "--node-config",
        node_config,
        "--port",
        str(port or SUPERNODE_BASE_PORT + index),
        "--max-retries",
        "3",
    ]
    if require_signed_apps:
        cmd += ["--trusted-entities", str(s / "trusted_entities.yaml")]
    return cmd
