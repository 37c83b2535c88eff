"""systemd units that keep the SuperLink and a SuperNode running on a host, via the start scripts.

A unit starts the generated script (which ``exec``s Flower, so systemd's signals reach it),
restarts it when it fails, and confines it: the file system is read-only except the folders
the process must write (the SuperLink's state database, Flower home and runs; a site's
state and Flower home) and a cache for model weights. The SuperLink never reads the CA key
or the signing key, so its unit cannot see them.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from fedtune.deploy.layout import Deployment

SUPERLINK_UNIT = "fedtune-superlink.service"
REGISTRY_UNIT = "fedtune-app-registry.service"
SUPERNODE_UNIT = "fedtune-supernode.service"
SERVICE_USER = "fedtune"


def _path(path: Path) -> str:
    """A path as a unit file reads it: ``%`` starts a specifier, whitespace splits lists."""
    text = str(path).replace("%", "%%")
    return f'"{text}"' if any(c.isspace() for c in text) else text


def run_output_dir(d: Deployment) -> Path:
    """Where the ServerApp writes runs: the ``output-dir`` of the app bundle's config."""
    raw = tomllib.loads((d.app / "pyproject.toml").read_text())
    return Path(raw["tool"]["flwr"]["app"]["config"]["output-dir"])


def _unit(
    name: str,
    description: str,
    folder: Path,
    script: Path,
    writable: list[Path],
    hidden: list[Path],
    needs: str | None = None,
) -> str:
    lines = [
        "# Written by `fedtune deploy init`. Install on this host:",
        f"#   sudo cp {_path(folder / 'systemd' / name)} /etc/systemd/system/",
        f"#   sudo systemctl daemon-reload && sudo systemctl enable --now {name}",
        "[Unit]",
        "Description=" + description.replace("%", "%%"),
        f"Wants=network-online.target{' ' + needs if needs else ''}",
        f"After=network-online.target{' ' + needs if needs else ''}",
        "",
        "[Service]",
        "Type=simple",
        f"# Placeholder: a dedicated, unprivileged account that owns {_path(folder)} (its keys are",
        "# readable by their owner only). Create it and hand it the folder before starting:",
        f"#   sudo useradd --system --user-group --no-create-home --shell /usr/sbin/nologin {SERVICE_USER}",
        f"#   sudo chown -R {SERVICE_USER}:{SERVICE_USER} {_path(folder)}",
        f"User={SERVICE_USER}",
        f"Group={SERVICE_USER}",
        f"WorkingDirectory={_path(folder)}",
        f"ExecStart={_path(script)}",
        "Restart=on-failure",
        "RestartSec=5",
        "TimeoutStopSec=30",
        "# Model weights are cached here (not in a home directory); systemd creates it for User=.",
        "CacheDirectory=fedtune",
        "Environment=FEDTUNE_CACHE=%C/fedtune HF_HOME=%C/fedtune/huggingface",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=read-only",
        "PrivateTmp=yes",
        "# Remove PrivateDevices= on a site that trains on a GPU.",
        "PrivateDevices=yes",
        "ProtectKernelTunables=yes",
        "ProtectKernelModules=yes",
        "ProtectControlGroups=yes",
        "RestrictSUIDSGID=yes",
        "RestrictRealtime=yes",
        "LockPersonality=yes",
    ]
    if writable:
        lines.append("ReadWritePaths=" + " ".join(_path(p) for p in writable))
    if hidden:
        lines.append("InaccessiblePaths=" + " ".join("-" + _path(p) for p in hidden))
    return "\n".join(lines + ["", "[Install]", "WantedBy=multi-user.target", ""])


def superlink_unit(d: Deployment) -> str:
    o = d.operator
    writable = [o] + [p for p in [run_output_dir(d)] if not p.is_relative_to(o)]
    return _unit(
        SUPERLINK_UNIT,
        f"fedtune SuperLink (Flower) serving sites at {d.address}",
        o,
        o / "start-superlink.sh",
        writable,
        [o / "ca.key", o / "signing.key"],
        needs=REGISTRY_UNIT,
    )


def registry_unit(d: Deployment) -> str:
    """The app registry only reads the signed bundles: nothing is writable, no key is visible."""
    o = d.operator
    return _unit(
        REGISTRY_UNIT,
        f"fedtune app registry for the SuperLink, on 127.0.0.1:{d.registry_port}",
        o,
        o / "start-registry.sh",
        [],
        [o / "ca.key", o / "signing.key"],
    )


def supernode_unit(d: Deployment, site: str) -> str:
    s = d.site_dir(site)
    return _unit(
        SUPERNODE_UNIT,
        f"fedtune SuperNode (Flower) of {site}, dialling {d.address}",
        s,
        s / "start-supernode.sh",
        [s / "state", s / "flwr-home"],
        [],
    )


def write_systemd_units(d: Deployment) -> list[Path]:
    """Write one unit per role and create the folders the units let the processes write."""
    out = run_output_dir(d)
    out.mkdir(parents=True, exist_ok=True)
    (d.operator / "systemd").mkdir(exist_ok=True)
    written = [d.operator / "systemd" / SUPERLINK_UNIT, d.operator / "systemd" / REGISTRY_UNIT]
    written[0].write_text(superlink_unit(d))
    written[1].write_text(registry_unit(d))
    for site in d.sites:
        s = d.site_dir(site)
        for folder in ("state", "flwr-home"):
            (s / folder).mkdir(exist_ok=True)
        (s / "systemd").mkdir(exist_ok=True)
        (s / "systemd" / SUPERNODE_UNIT).write_text(supernode_unit(d, site))
        written.append(s / "systemd" / SUPERNODE_UNIT)
    return written
