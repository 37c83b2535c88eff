"""``fedtune deploy init``: every file an operator and each site need, and the exact commands.

One folder per role. ``operator/`` holds the CA, the SuperLink's certificate, the signing
key, the Flower app bundle (code entry points plus the federation's config) and the
scripts to start the SuperLink, register the sites and run the federation. ``sites/<id>/``
holds what the operator hands to one site (the CA certificate, the trusted signer) and what
that site keeps (its authentication key, its local policy, its state directory). The
commands are built here once, as argument lists, so the scripts, the README and the
end-to-end test all run the same thing.

Sites run only signed code (and, once they pin their own approval key, only code they approved:
``deploy.app_approval``): the app bundle is signed at init (and again by
``fedtune deploy sign`` after an edit), served to the SuperLink by the operator's app
registry, and run by name (``flwr run @fedtune/fedtune-app==VERSION``); every SuperNode
starts with ``--trusted-entities``.
"""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Mapping
from pathlib import Path

from fedtune.common.config import FedtuneConfig, config_to_toml_dict
from fedtune.deploy.app_registry import publish_app
from fedtune.deploy.commands import (
    register_command,
    registry_command,
    run_command,
    sign_command,
    superlink_command,
    superlink_env,
    supernode_command,
)
from fedtune.deploy.compose import write_compose_files
from fedtune.deploy.credentials import (
    make_ca,
    make_server_certificate,
    make_signing_key,
    make_site_auth_key,
    read_auth_public_key,
    trusted_entities_yaml,
)
from fedtune.deploy.layout import APP_NAME, CONNECTION, SUPERLINK_SERVICE, Deployment
from fedtune.deploy.systemd_units import write_systemd_units


def _script(path: Path, lines: list[list[str]], env_home: Path, env: dict[str, str] | None = None) -> None:
    body = [
        "#!/usr/bin/env bash",
        "# Written by `fedtune deploy init`.",
        "set -euo pipefail",
        f"export PATH={shlex.quote(str(Path(sys.executable).parent))}:$PATH",
        f"export FLWR_HOME={shlex.quote(str(env_home))} FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1",
        *[f"export {k}={shlex.quote(v)}" for k, v in (env or {}).items()],
        *[shlex.join(cmd) for cmd in lines[:-1]],
        "exec " + shlex.join(lines[-1]),  # the process takes the script's place: systemd's signals reach it
    ]
    path.write_text("\n".join(body) + "\n")
    path.chmod(0o755)


#: The bundle's Python files: entry points into the installed fedtune package and nothing else, so a
#: site can check a bundle holds no code of the operator's (``deploy.app_approval``).
APP_PACKAGE = {
    "fedtune_app/__init__.py": '"""Entry points of the fedtune Flower app."""\n',
    **{
        f"fedtune_app/{role}_app.py": f'"""The {role} side, from the installed fedtune package."""\n\n'
        f'from fedtune.{role}.deployment import app\n\n__all__ = ["app"]\n'
        for role in ("server", "client")
    },
}
CLIENT_COMPONENT = "fedtune_app.client_app:app"


def _app_pyproject(cfg: FedtuneConfig, output_dir: Path) -> str:
    config_json = json.dumps(config_to_toml_dict(cfg), sort_keys=True)
    return "\n".join(
        [
            "# The Flower app bundle (FAB) of this federation: entry points plus the federation's config.",
            "# fedtune itself is installed on every machine; signing this bundle signs the config too.",
            "[build-system]",
            'requires = ["hatchling"]',
            'build-backend = "hatchling.build"',
            "",
            "[project]",
            f'name = "{APP_NAME}"',
            'version = "1.0.0"',
            "dependencies = []",
            "",
            "[tool.flwr.app]",
            'publisher = "fedtune"',
            "",
            "[tool.flwr.app.components]",
            'serverapp = "fedtune_app.server_app:app"',
            f'clientapp = "{CLIENT_COMPONENT}"',
            "",
            "[tool.flwr.app.config]",
            f"fedtune-config = {json.dumps(config_json)}",
            f"output-dir = {json.dumps(str(output_dir))}",
            "",
        ]
    )


def _policy_template(cfg: FedtuneConfig) -> str:
    return "\n".join(
        [
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
            "# DP-SGD noise robust to floating-point attacks (Opacus secure_mode; cost: docs/benchmarks.md).",
            "secure_noise = true",
            "# The only records this site trains on (any format `fedtune data check` accepts).",
            '# data_path = "/srv/fedtune/data/train.jsonl"',
            "# This site's LoRA rank, from its compute (0: the federation's lora.rank, the most any site trains).",
            "# lora_rank = 4",
            "# Above 0: refuse rounds without site-level DP (distributed noise) of at least this noise multiplier.",
            "# min_site_noise_multiplier = 0.0",
            "# The federation's roster, pinned: run `fedtune site init . --name <this site>` here, send the printed",
            "# line to the operator, then `fedtune site pin roster.toml --identity identity.pem` and paste its lines.",
            '# roster = "roster.toml"',
            '# roster_fingerprint = "sha256:..."',
            '# identity_key = "identity.pem"',
            "",
        ]
    )


def init_deployment(
    root: Path,
    cfg: FedtuneConfig,
    host: str = "127.0.0.1",
    port: int = 8000,
    site_ids: list[str] | None = None,
    output_dir: Path | None = None,
    registry_port: int | None = None,
    site_public_keys: Mapping[str, Path] | None = None,
) -> Deployment:
    """Write credentials, the signed app bundle, site folders and scripts under ``root`` (which must not exist).

    ``site_public_keys``: a site's Flower authentication public key (``auth.pub``, made on the site
    by ``fedtune site init``), by site; such a site's folder gets no private key, the site puts its
    own ``auth`` there. Sites not listed get a key pair made here, for trials on one machine.
    """
    root = Path(root).resolve()
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(
            f"{root} already exists and is not empty; choose a new folder (keys are never overwritten)"
        )
    sites = tuple(site_ids or [f"site-{i}" for i in range(cfg.partition.num_clients)])
    given = dict(site_public_keys or {})
    if unknown := sorted(set(given) - set(sites)):
        raise ValueError(f"--site-key names sites that are not in the federation: {unknown} (sites: {list(sites)})")
    publics = {site: read_auth_public_key(path) for site, path in given.items()}
    d = Deployment(root, host, port, sites, registry_port or port + 1)
    o = d.operator
    ca_key, ca_cert = make_ca(o)
    make_server_certificate(o, ca_key, ca_cert, host, aliases=(SUPERLINK_SERVICE,))
    key_id, signer_public = make_signing_key(o)
    (o / "signing.key-id").write_text(key_id + "\n")
    (root / "deployment.json").write_text(
        json.dumps({"host": host, "port": port, "sites": list(sites), "registry_port": d.registry_port}, indent=1)
        + "\n"
    )
    for site in sites:
        s = d.site_dir(site)
        (o / "site-keys").mkdir(parents=True, exist_ok=True)
        if site in publics:
            s.mkdir(parents=True, exist_ok=True)
            (o / "site-keys" / f"{site}.pub").write_bytes(publics[site])
        else:
            (o / "site-keys" / f"{site}.pub").write_bytes(make_site_auth_key(s, site).read_bytes())
        (s / "ca.crt").write_bytes((o / "ca.crt").read_bytes())
        (s / "trusted_entities.yaml").write_text(trusted_entities_yaml(key_id, signer_public))
        (s / "policy.toml").write_text(_policy_template(cfg))
        (s / "state").mkdir()
        _script(s / "start-supernode.sh", [supernode_command(d, site)], s / "flwr-home")
    home = o / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        "\n".join(
            [
                "[superlink]",
                f'default = "{CONNECTION}"',
                "",
                f"[superlink.{CONNECTION}]",
                f'address = "{d.address}"',
                f'root-certificates = "{o / "ca.crt"}"',
                "",
            ]
        )
    )
    (d.app / "fedtune_app").mkdir(parents=True)
    for name, text in APP_PACKAGE.items():
        (d.app / name).write_text(text)
    (d.app / "pyproject.toml").write_text(_app_pyproject(cfg, Path(output_dir or o / "runs").resolve()))
    publish_app(d.app, o / "signing.key", key_id, d.registry)
    _script(o / "start-registry.sh", [registry_command(d)], home)
    _script(o / "start-superlink.sh", [superlink_command(d)], home, superlink_env(d))
    _script(o / "register-sites.sh", [register_command(d, s) for s in sites], home)
    _script(o / "sign-app.sh", [sign_command(d)], home)
    _script(o / "run-federation.sh", [run_command(d)], home)
    write_compose_files(d)
    write_systemd_units(d)
    return d
