"""``fedtune deploy init``: every file an operator and each site need, and the exact commands.

One folder per role. ``operator/`` holds the CA, the SuperLink's certificate, the signing
key, the Flower app bundle (code entry points plus the federation's config) and the
scripts to start the SuperLink, register the sites and run the federation. ``sites/<id>/``
holds what the operator hands to one site (the CA certificate, the trusted signer) and what
that site keeps (its authentication key, its local policy, its state directory). The
commands are built here once, as argument lists, so the scripts, the README and the
end-to-end test all run the same thing.

Sites run only code the operator signed: the app bundle is signed at init (and again by
``fedtune deploy sign`` after an edit), served to the SuperLink by the operator's app
registry, and run by name (``flwr run @fedtune/fedtune-app==VERSION``); every SuperNode
starts with ``--trusted-entities``.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from common.config import FedtuneConfig, config_to_toml_dict
from deploy.app_registry import app_identity, publish_app
from deploy.credentials import (
    make_ca,
    make_server_certificate,
    make_signing_key,
    make_site_auth_key,
    trusted_entities_yaml,
)

CONNECTION = "fedtune"
APP_NAME = "fedtune-app"
SUPERNODE_BASE_PORT = 9094


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
        "flower-superlink", "--ssl-ca-certfile", str(o / "ca.crt"), "--ssl-certfile", str(o / "superlink.crt"),
        "--ssl-keyfile", str(o / "superlink.key"), "--enable-supernode-auth",
        "--database", str(o / "superlink-state.db"), "--host", d.host, "--port", str(d.port),
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


def supernode_command(d: Deployment, site: str, require_signed_apps: bool = True, port: int | None = None,
                      root_certificates: Path | None = None, auth_key: Path | None = None) -> list[str]:
    s = d.site_dir(site)
    index = d.sites.index(site) if site in d.sites else 0
    node_config = " ".join([
        f"site-id={json.dumps(site)}", f"partition-id={index}",
        f"policy={json.dumps(str(s / 'policy.toml'))}", f"state-dir={json.dumps(str(s / 'state'))}",
    ])
    cmd = [
        "flower-supernode", "--superlink", d.address, "--root-certificates", str(root_certificates or s / "ca.crt"),
        "--auth-supernode-private-key", str(auth_key or s / "auth"), "--node-config", node_config,
        "--port", str(port or SUPERNODE_BASE_PORT + index), "--max-retries", "3",
    ]
    if require_signed_apps:
        cmd += ["--trusted-entities", str(s / "trusted_entities.yaml")]
    return cmd


def _script(path: Path, lines: list[list[str]], env_home: Path, env: dict[str, str] | None = None) -> None:
    body = [
        "#!/usr/bin/env bash", "# Written by `fedtune deploy init`.", "set -euo pipefail",
        f"export PATH={shlex.quote(str(Path(sys.executable).parent))}:$PATH",
        f"export FLWR_HOME={shlex.quote(str(env_home))} FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1",
        *[f"export {k}={shlex.quote(v)}" for k, v in (env or {}).items()],
        *[shlex.join(cmd) for cmd in lines[:-1]],
        "exec " + shlex.join(lines[-1]),  # the process takes the script's place: systemd's signals reach it
    ]
    path.write_text("\n".join(body) + "\n")
    path.chmod(0o755)


def _app_pyproject(cfg: FedtuneConfig, output_dir: Path) -> str:
    config_json = json.dumps(config_to_toml_dict(cfg), sort_keys=True)
    return "\n".join([
        "# The Flower app bundle (FAB) of this federation: entry points plus the federation's config.",
        "# fedtune itself is installed on every machine; signing this bundle signs the config too.",
        "[build-system]", 'requires = ["hatchling"]', 'build-backend = "hatchling.build"', "",
        "[project]", f'name = "{APP_NAME}"', 'version = "1.0.0"', "dependencies = []", "",
        "[tool.flwr.app]", 'publisher = "fedtune"', "",
        "[tool.flwr.app.components]", 'serverapp = "fedtune_app.server_app:app"',
        'clientapp = "fedtune_app.client_app:app"', "",
        "[tool.flwr.app.config]", f"fedtune-config = {json.dumps(config_json)}",
        f"output-dir = {json.dumps(str(output_dir))}", "",
    ])


def _policy_template(cfg: FedtuneConfig) -> str:
    return "\n".join([
        "# This site's own limits. The server cannot widen them: they are read from this file only.",
        "[policy]",
        f"max_epsilon = {cfg.privacy.epsilon}",
        f"max_delta = {cfg.privacy.delta}",
        "min_noise_multiplier = 0.3",
        "require_dp = true",
        "require_secure_aggregation = true",
        f"min_aggregation_sites = {max(2, cfg.federation.min_clients)}",
        f'accepted_run_ids = ["{cfg.run.name}"]',
        "allow_site_metrics = true",
        '# The only records this site trains on (any format `fedtune data check` accepts).',
        '# data_path = "/srv/fedtune/data/train.jsonl"',
        "",
    ])


def init_deployment(root: Path, cfg: FedtuneConfig, host: str = "127.0.0.1", port: int = 8000,
                    site_ids: list[str] | None = None, output_dir: Path | None = None,
                    registry_port: int | None = None) -> Deployment:
    """Write credentials, the signed app bundle, site folders and scripts under ``root`` (which must not exist)."""
    root = Path(root).resolve()
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} already exists and is not empty; choose a new folder (keys are never overwritten)")
    sites = tuple(site_ids or [f"site-{i}" for i in range(cfg.partition.num_clients)])
    d = Deployment(root, host, port, sites, registry_port or port + 1)
    o = d.operator
    from deploy.compose import SUPERLINK_SERVICE  # deploy.compose builds on this module
    from deploy.service_files import write_service_files

    ca_key, ca_cert = make_ca(o)
    make_server_certificate(o, ca_key, ca_cert, host, aliases=(SUPERLINK_SERVICE,))
    key_id, signer_public = make_signing_key(o)
    (o / "signing.key-id").write_text(key_id + "\n")
    (root / "deployment.json").write_text(json.dumps({"host": host, "port": port, "sites": list(sites),
                                                      "registry_port": d.registry_port}, indent=1) + "\n")
    for site in sites:
        s = d.site_dir(site)
        public = make_site_auth_key(s, site)
        (o / "site-keys").mkdir(parents=True, exist_ok=True)
        (o / "site-keys" / f"{site}.pub").write_bytes(public.read_bytes())
        (s / "ca.crt").write_bytes((o / "ca.crt").read_bytes())
        (s / "trusted_entities.yaml").write_text(trusted_entities_yaml(key_id, signer_public))
        (s / "policy.toml").write_text(_policy_template(cfg))
        (s / "state").mkdir()
        _script(s / "start-supernode.sh", [supernode_command(d, site)], s / "flwr-home")
    home = o / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text("\n".join([
        "[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]", f'address = "{d.address}"',
        f'root-certificates = "{o / "ca.crt"}"', "",
    ]))
    package = d.app / "fedtune_app"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text('"""Entry points of the fedtune Flower app."""\n')
    for role in ("server", "client"):
        (package / f"{role}_app.py").write_text(
            f'"""The {role} side, from the installed fedtune package."""\n\nimport {role}.deployment\n\n'
            f"app = {role}.deployment.app\n")
    (d.app / "pyproject.toml").write_text(_app_pyproject(cfg, Path(output_dir or o / "runs").resolve()))
    publish_app(d.app, o / "signing.key", key_id, d.registry)
    _script(o / "start-registry.sh", [registry_command(d)], home)
    _script(o / "start-superlink.sh", [superlink_command(d)], home, superlink_env(d))
    _script(o / "register-sites.sh", [register_command(d, s) for s in sites], home)
    _script(o / "sign-app.sh", [sign_command(d)], home)
    _script(o / "run-federation.sh", [run_command(d)], home)
    write_service_files(d)
    return d
