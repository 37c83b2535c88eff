"""Compose files that run a deployment in containers, from the same command builders as the scripts.

Three files, built from one service definition per role:

- ``OUT/compose.yaml``: the SuperLink and every site on one Docker host (a trial run); the
  sites reach the SuperLink by its service name, ``superlink``;
- ``OUT/operator/compose.yaml``: the SuperLink alone, its port published;
- ``OUT/sites/<id>/compose.yaml``: one site's SuperNode, reaching the SuperLink at the
  address the sites were given.

Inside a container the deployment folder is mounted at ``CONTAINER_ROOT``, so every command
is a builder's output for the same ``Deployment`` moved there: compose and the start
scripts cannot drift. Only the SuperLink's bind address differs: it listens on all of its
container's interfaces (the host name sites dial is outside the container), and Flower's
own helper then reaches it on 127.0.0.1, which its certificate names.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from dataclasses import replace
from pathlib import Path

from fedtune.deploy.commands import (
    register_command,
    registry_command,
    run_command,
    sign_command,
    superlink_command,
    superlink_env,
    supernode_command,
)
from fedtune.deploy.layout import CONNECTION, SUPERLINK_SERVICE, Deployment

CONTAINER_ROOT = Path("/fedtune")
IMAGE = "${FEDTUNE_IMAGE:-fedtune}"
USER = "${FEDTUNE_UID:-1000}:${FEDTUNE_GID:-1000}"
CACHE_VOLUME = "fedtune-cache"
CACHE_PATH = "/var/cache/fedtune"
BUILD = "docker build -f deploy/container/Dockerfile -t fedtune .   # in the fedtune repository"
CLI_HOME = "compose-flwr-home"


def in_container(d: Deployment, host: str | None = None) -> Deployment:
    """The same deployment as its containers see it: mounted at ``CONTAINER_ROOT``."""
    return replace(d, root=CONTAINER_ROOT, host=host or d.host)


def service_name(site: str) -> str:
    """A site's compose service: its id, with what compose does not allow in a name replaced."""
    return re.sub(r"[^a-zA-Z0-9._-]", "-", site)


def data_variable(site: str) -> str:
    """The variable that points a site's container at its data folder on the host."""
    return "FEDTUNE_DATA_" + re.sub(r"[^A-Za-z0-9]", "_", site).upper()


def flag_value(cmd: list[str], flag: str) -> str:
    return cmd[cmd.index(flag) + 1]


def _literal(text: str) -> str:
    """Compose interpolates ``$``; a literal one is written ``$$``."""
    return text.replace("$", "$$")


def _source(path: Path, here: Path) -> str:
    """A host path relative to the compose file's folder, so the deployment folder can move."""
    rel = os.path.relpath(path, here)
    return _literal("." if rel == "." else f"./{rel}")


def _common(command: list[str], env: dict[str, str], probe_url: str) -> dict:
    return {
        "image": IMAGE,
        "user": USER,
        "init": True,
        "restart": "unless-stopped",
        "security_opt": ["no-new-privileges:true"],
        "cap_drop": ["ALL"],
        "command": [_literal(arg) for arg in command],
        "environment": {k: _literal(v) for k, v in env.items()} | {"FEDTUNE_HEALTHCHECK_URL": probe_url},
    }


def superlink_process(d: Deployment) -> list[str]:
    """The SuperLink container's command: the app registry on its loopback, then the SuperLink itself.

    The registry answers only the SuperLink, on 127.0.0.1, so both share one container; the
    SuperLink is ``exec``'d, so a stop signal reaches it.
    """
    c = in_container(d, host="0.0.0.0")
    return ["bash", "-c", f"{shlex.join(registry_command(c))} & exec {shlex.join(superlink_command(c))}"]


def superlink_service(d: Deployment, here: Path) -> dict:
    """The SuperLink; it writes its state database, its Flower home and the runs in ``operator/``."""
    c = in_container(d, host="0.0.0.0")
    env = {
        "FLWR_HOME": str(c.operator / CLI_HOME),
        **superlink_env(c),
        "FEDTUNE_HEALTHCHECK_CA": str(c.operator / "ca.crt"),
    }
    service = _common(superlink_process(d), env, f"https://127.0.0.1:{d.port}/health")
    service["volumes"] = [
        f"{_source(d.operator, here)}:{_literal(str(c.operator))}",
        f"{_source(d.root / 'deployment.json', here)}:{_literal(str(c.root / 'deployment.json'))}:ro",
        f"{CACHE_VOLUME}:{CACHE_PATH}",
    ]
    service["ports"] = [f"{d.port}:{d.port}"]
    return service


def supernode_service(d: Deployment, site: str, here: Path, superlink_host: str, data_source: str) -> dict:
    """One site's SuperNode: its folder read-only, its state and Flower home writable, its data read-only."""
    c = in_container(d, host=superlink_host)
    command = supernode_command(c, site)
    service = _common(
        command,
        {"FLWR_HOME": str(c.site_dir(site) / "flwr-home")},
        f"http://127.0.0.1:{flag_value(command, '--port')}/health",
    )
    s, cs = d.site_dir(site), c.site_dir(site)
    service["volumes"] = [
        f"{_source(s, here)}:{_literal(str(cs))}:ro",
        f"{_source(s / 'state', here)}:{_literal(str(cs / 'state'))}",
        f"{_source(s / 'flwr-home', here)}:{_literal(str(cs / 'flwr-home'))}",
        f"{data_source}:{_literal(str(cs / 'data'))}:ro",
        f"{CACHE_VOLUME}:{CACHE_PATH}",
    ]
    return service


def operator_commands(d: Deployment) -> dict[str, list[list[str]]]:
    """The operator's steps, in the SuperLink's container: register the sites, (re)sign the app, run it.

    The run names the signed bundle, so it carries no path; its runs go to the mounted
    ``operator/runs`` instead of the host folder the bundle names.
    """
    c = in_container(d)
    exec_ = ["docker", "compose", "exec", SUPERLINK_SERVICE]
    runs = json.dumps(str(c.operator / "runs"))
    return {
        "register": [exec_ + register_command(c, site) for site in d.sites],
        "sign": [["docker", "compose", "run", "--rm", "--no-deps", SUPERLINK_SERVICE, *sign_command(c)]],
        "run": [exec_ + run_command(d) + ["--run-config", f"output-dir={runs}"]],
    }


def cli_config_toml(d: Deployment) -> str:
    """The Flower home of ``flwr`` inside the SuperLink container: the SuperLink is on its loopback."""
    c = in_container(d)
    return "\n".join(
        [
            "# Written by `fedtune deploy init`: `flwr` inside the SuperLink container (docker compose exec).",
            "[superlink]",
            f'default = "{CONNECTION}"',
            "",
            f"[superlink.{CONNECTION}]",
            f'address = "127.0.0.1:{d.port}"',
            f"root-certificates = {json.dumps(str(c.operator / 'ca.crt'))}",
            "",
        ]
    )


def _yaml(value, indent: int = 0) -> list[str]:
    """Block-style YAML for dicts, lists and scalars (strings double-quoted, JSON escapes are YAML's)."""
    pad = " " * indent
    lines: list[str] = []
    items = value.items() if isinstance(value, dict) else ((None, v) for v in value)
    for key, item in items:
        head = f"{pad}{key}:" if key is not None else f"{pad}-"
        if isinstance(item, (dict, list)) and item:
            lines += [head, *_yaml(item, indent + 2)]
        else:
            lines.append(f"{head} {_scalar(item)}")
    return lines


def _scalar(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if value == {} or value == []:
        return json.dumps(value)
    return json.dumps(str(value))


def _document(header: list[str], services: dict) -> str:
    body = {"services": services, "volumes": {CACHE_VOLUME: {}}}
    return "\n".join(["# " + line if line else "#" for line in header] + _yaml(body)) + "\n"


def _steps(d: Deployment, step: str) -> list[str]:
    return ["  " + shlex.join(cmd) for cmd in operator_commands(d)[step]]


def federation_compose(d: Deployment) -> str:
    """``OUT/compose.yaml``: the whole federation on one Docker host."""
    here = d.root
    services = {SUPERLINK_SERVICE: superlink_service(d, here)}
    for site in d.sites:
        source = f"${{{data_variable(site)}:-{_source(d.site_dir(site) / 'data', here)}}}"
        services[service_name(site)] = supernode_service(d, site, here, SUPERLINK_SERVICE, source)
        services[service_name(site)]["depends_on"] = {SUPERLINK_SERVICE: {"condition": "service_healthy"}}
    return _document(
        [
            "Written by `fedtune deploy init`: the SuperLink (with the app registry) and every site on one Docker "
            "host.",
            "Build the image once:",
            f"  {BUILD}",
            "Then, in this folder (.env holds the user id that owns the keys):",
            f"  docker compose up -d {SUPERLINK_SERVICE}",
            *_steps(d, "register"),
            "  docker compose up -d",
            *_steps(d, "run"),
            "After editing operator/app (bump its version), sign it again:",
            *_steps(d, "sign"),
            "A site's data: its folder sites/<id>/data, or the folder a FEDTUNE_DATA_<ID> variable names,",
            'is mounted read-only at sites/<id>/data; set data_path = "data/<file>" in its policy.toml.',
        ],
        services,
    )


def operator_compose(d: Deployment) -> str:
    """``OUT/operator/compose.yaml``: the SuperLink (and the app registry) alone, on the operator's machine."""
    return _document(
        [
            "Written by `fedtune deploy init`: the SuperLink and the app registry on the operator's machine.",
            "Build the image once:",
            f"  {BUILD}",
            "Then, in this folder (.env holds the user id that owns the keys):",
            "  docker compose up -d",
            *_steps(d, "register"),
            "  (each site starts its SuperNode)",
            *_steps(d, "run"),
            "After editing app/ (bump its version), sign it again:",
            *_steps(d, "sign"),
        ],
        {SUPERLINK_SERVICE: superlink_service(d, d.operator)},
    )


def site_compose(d: Deployment, site: str) -> str:
    """``OUT/sites/<id>/compose.yaml``: one site's SuperNode, on that site's machine."""
    here = d.site_dir(site)
    service = supernode_service(d, site, here, d.host, "${FEDTUNE_DATA:-./data}")
    loopback = d.host in ("127.0.0.1", "localhost", "::1")
    return _document(
        [
            f"Written by `fedtune deploy init`: the SuperNode of {site}, dialling the SuperLink at {d.address}.",
            *(
                [
                    "In a container that address is the container itself: use ../../compose.yaml on this host,",
                    "or run `fedtune deploy init` again with --host set to a name the sites can reach.",
                ]
                if loopback
                else []
            ),
            "Build the image once:",
            f"  {BUILD}",
            "Then, in this folder (.env holds the user id that owns the keys), once the operator registered this site:",
            "  docker compose up -d",
            "The data folder (./data, or FEDTUNE_DATA in .env) is mounted read-only at ./data:",
            'set data_path = "data/<file>" in policy.toml.',
        ],
        {service_name(site): service},
    )


def _env_file(extra: list[str]) -> str:
    root = ["# These are root's: chown the folder to an unprivileged user and put its ids here."]
    root = root if os.getuid() == 0 else []
    return "\n".join(
        [
            "# Read by docker compose. The containers run as the user that owns this folder's keys (mode 0600).",
            *root,
            f"FEDTUNE_UID={os.getuid()}",
            f"FEDTUNE_GID={os.getgid()}",
            "# FEDTUNE_IMAGE=fedtune",
            *extra,
            "",
        ]
    )


def write_compose_files(d: Deployment) -> list[Path]:
    """Write the three kinds of compose file, their ``.env`` and the folders they mount."""
    written = []
    for site in d.sites:
        s = d.site_dir(site)
        for folder in ("state", "flwr-home", "data"):
            (s / folder).mkdir(exist_ok=True)
        (s / "compose.yaml").write_text(site_compose(d, site))
        (s / ".env").write_text(_env_file(["# FEDTUNE_DATA=/srv/fedtune/data"]))
        written.append(s / "compose.yaml")
    (d.operator / CLI_HOME).mkdir(exist_ok=True)
    (d.operator / CLI_HOME / "config.toml").write_text(cli_config_toml(d))
    (d.operator / "compose.yaml").write_text(operator_compose(d))
    (d.operator / ".env").write_text(_env_file([]))
    (d.root / "compose.yaml").write_text(federation_compose(d))
    (d.root / ".env").write_text(_env_file([f"# {data_variable(s)}=/srv/fedtune/{s}" for s in d.sites]))
    return [d.root / "compose.yaml", d.operator / "compose.yaml", *written]
