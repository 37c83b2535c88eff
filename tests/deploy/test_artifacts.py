"""The files that run a deployment as services, checked without Docker or systemd running.

The Dockerfile, the compose files, the systemd units and the start scripts are read the way
their tools read them, and checked against the repository, the installed console scripts
and the command builders: every file and executable they name exists, every command is the
builders' own, every path a process writes is writable, and no two services share a port.
Each validator is also shown rejecting a broken file, so none of them passes vacuously.
"""

from __future__ import annotations

import configparser
import fnmatch
import importlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import tomllib
import zipfile
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import yaml
from cryptography import x509

from fedtune.common.config import config_from_dict
from fedtune.deploy import compose
from fedtune.deploy.bundle import init_deployment
from fedtune.deploy.commands import (
    flower_env,
    register_command,
    registry_command,
    run_command,
    sign_command,
    superlink_command,
    supernode_command,
)
from fedtune.deploy.healthcheck import main as healthcheck_main
from fedtune.deploy.healthcheck import probe
from tests.conftest import REPO, SAMPLES

DOCKERFILE = REPO / "deploy" / "container" / "Dockerfile"
CONTAINER = Path("/fedtune")
SITES = ("north", "south", "east")
# Started by Flower itself, by bare name, from the PATH of the SuperLink or SuperNode.
FLOWER_CHILDREN = {"flower-superexec", "flwr-serverapp", "flwr-clientapp"}
# In the python:3.11-slim base image rather than in a Python distribution.
BASE_IMAGE_PROGRAMS = {"bash", "python"}
# The service keys of the Compose Specification (compose-spec/compose-spec, schema/compose-spec.json).
COMPOSE_SERVICE_KEYS = set(
    """
    develop deploy annotations attach build blkio_config cap_add cap_drop cgroup cgroup_parent command configs
    container_name cpu_count cpu_percent cpu_shares cpu_quota cpu_period cpu_rt_period cpu_rt_runtime cpus cpuset
    credential_spec depends_on device_cgroup_rules devices dns dns_opt dns_search domainname entrypoint env_file
    label_file environment expose extends provider external_links extra_hosts gpus group_add healthcheck hostname
    image init ipc isolation labels links logging mac_address mem_limit mem_reservation mem_swappiness
    memswap_limit network_mode models networks oom_kill_disable oom_score_adj pid pids_limit platform ports
    post_start pre_stop privileged profiles pull_policy pull_refresh_after read_only restart runtime scale
    security_opt shm_size secrets sysctls stdin_open stop_grace_period stop_signal storage_opt tmpfs tty ulimits
    use_api_socket user uts userns_mode volumes volumes_from working_dir""".split()
)
COMPOSE_SERVICE_NAME = re.compile(r"^[a-zA-Z0-9._-]+$")
DOCKERFILE_INSTRUCTIONS = {
    "FROM",
    "ARG",
    "ENV",
    "RUN",
    "COPY",
    "WORKDIR",
    "USER",
    "HEALTHCHECK",
    "CMD",
    "ENTRYPOINT",
    "LABEL",
    "EXPOSE",
}


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("artifacts")
    cfg = config_from_dict(
        {
            "model": {"name": "tiny-llama"},
            "data": {"task": "question-answer", "path": str(SAMPLES / "medquad" / "medquad_sample.jsonl")},
            "partition": {"num_clients": 3},
        },
        "test",
        tmp,
    )
    # Runs outside the operator folder, so the SuperLink's unit must list them as writable.
    return init_deployment(tmp / "fed", cfg, port=18200, site_ids=list(SITES), output_dir=tmp / "runs")


# ---------------------------------------------------------------- console scripts


def console_scripts() -> dict[str, str]:
    """Every console script of the installed distributions, name -> ``module:attr``."""
    return {
        ep.name: ep.value
        for dist in importlib.metadata.distributions()
        for ep in dist.entry_points
        if ep.group == "console_scripts"
    }


def missing_executables(names: set[str]) -> set[str]:
    return {n for n in names if n not in BASE_IMAGE_PROGRAMS and n not in console_scripts()}


def test_every_executable_the_artifacts_start_is_a_console_script(deployment):
    d = deployment
    used = set(FLOWER_CHILDREN)
    for script in d.root.rglob("*.sh"):
        used |= {cmd[0] for cmd in script_commands(script)}
    for path in compose_files(d):
        for service in yaml.safe_load(path.read_text())["services"].values():
            used |= {cmd[0] for cmd in service_commands(service)}
    used |= {cmd[compose_prefix_length(cmd)] for cmds in compose.operator_commands(d).values() for cmd in cmds}
    used |= {dockerfile_exec_form(DOCKERFILE.read_text(), "CMD")[0]}
    assert {"flower-superlink", "flower-supernode", "flwr", "fedtune"} <= used
    assert missing_executables(used) == set()
    assert missing_executables({"flower-superlinkk"}) == {"flower-superlinkk"}


def test_fedtune_is_our_own_console_script():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    module, attr = scripts["fedtune"].split(":")
    assert callable(getattr(importlib.import_module(module), attr))
    assert console_scripts()["fedtune"] == scripts["fedtune"], "the installed fedtune is this checkout's"


# ---------------------------------------------------------------- Dockerfile


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` with comments dropped and continuation lines joined."""
    logical, current = [], ""
    for line in text.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.rstrip()[:-1] + " " if line.rstrip().endswith("\\") else line
        if not line.rstrip().endswith("\\"):
            logical.append(current.strip())
            current = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in logical]


def dockerfile_exec_form(text: str, instruction: str) -> list[str]:
    args = [a for i, a in dockerfile_instructions(text) if i == instruction][-1]
    return json.loads(args[args.index(" CMD ") + 5 :] if instruction == "HEALTHCHECK" else args)


def dockerignored(relative: str, patterns: list[str]) -> bool:
    parts = Path(relative).parts
    for i in range(1, len(parts) + 1):
        prefix = "/".join(parts[:i])
        for pattern in patterns:
            if fnmatch.fnmatch(prefix, pattern) or (
                pattern.startswith("**/") and fnmatch.fnmatch(parts[i - 1], pattern[3:])
            ):
                return True
    return False


def dockerfile_problems(text: str, repo: Path) -> list[str]:
    problems = []
    steps = dockerfile_instructions(text)
    unknown = [i for i, _ in steps if i not in DOCKERFILE_INSTRUCTIONS]
    if unknown:
        problems.append(f"unknown instructions {unknown}")
    first = next((s for s in steps if s[0] != "ARG"), ("", ""))
    if first != ("FROM", "python:3.11-slim"):
        problems.append(f"the image must start FROM python:3.11-slim, not {first}")
    ignore = [
        p.strip() for p in (repo / ".dockerignore").read_text().splitlines() if p.strip() and not p.startswith("#")
    ]
    for instruction, args in steps:
        if instruction == "COPY":
            for source in shlex.split(args)[:-1]:
                if source.startswith("--"):
                    continue
                if not (repo / source).exists():
                    problems.append(f"COPY {source}: not in the repository")
                elif dockerignored(source, ignore):
                    problems.append(f"COPY {source}: excluded by .dockerignore")
    pins = [
        r
        for r in tomllib.loads((repo / "pyproject.toml").read_text())["project"]["dependencies"]
        if r.startswith("torch==")
    ]
    args = dict(a.split("=", 1) for i, a in steps if i == "ARG" and "=" in a)
    if [f"torch=={args.get('TORCH_VERSION')}"] != pins:
        problems.append(f"ARG TORCH_VERSION={args.get('TORCH_VERSION')} is not pyproject's pin {pins}")
    runs = [a for i, a in steps if i == "RUN"]
    torch_run = next((n for n, a in enumerate(runs) if '"torch==${TORCH_VERSION}"' in a), None)
    package_run = next((n for n, a in enumerate(runs) if "pip install ." in a), None)
    if torch_run is None or '--index-url "$TORCH_INDEX_URL"' not in runs[torch_run]:
        problems.append("torch is not installed from the CPU index (ARG TORCH_INDEX_URL)")
    elif package_run is None or package_run < torch_run:
        problems.append("torch must be installed before `pip install .`")
    if "cpu" not in args.get("TORCH_INDEX_URL", ""):
        problems.append(f"TORCH_INDEX_URL {args.get('TORCH_INDEX_URL')} is not a CPU index")
    users = [(n, a) for n, (i, a) in enumerate(steps) if i == "USER"]
    last_run = max((n for n, (i, _) in enumerate(steps) if i == "RUN"), default=-1)
    if not users or users[-1][0] < last_run or users[-1][1] in ("root", "0"):
        problems.append("the image must end as a non-root USER, after every RUN")
    check = dockerfile_exec_form(text, "HEALTHCHECK") if any(i == "HEALTHCHECK" for i, _ in steps) else []
    if check[:2] != ["python", "-m"] or importlib.util.find_spec(check[2]) is None:
        problems.append(f"HEALTHCHECK {check}: not `python -m` of a module of the package")
    elif not any(i == "COPY" and check[2].split(".")[1] in a for i, a in steps):
        problems.append(f"HEALTHCHECK module {check[2]} is not copied into the image")
    return problems


def test_the_dockerfile_parses_pins_torch_and_copies_only_what_exists():
    text = DOCKERFILE.read_text()
    assert dockerfile_problems(text, REPO) == []
    assert dockerfile_exec_form(text, "HEALTHCHECK") == ["python", "-m", "fedtune.deploy.healthcheck"]


def test_what_the_dockerfile_copies_builds_the_package_with_its_entry_points(tmp_path):
    """`pip install .` in the image sees only the COPY sources: they must make the whole package."""
    pytest.importorskip("setuptools")
    context = tmp_path / "context"
    for instruction, args in dockerfile_instructions(DOCKERFILE.read_text()):
        if instruction == "COPY":
            *sources, target = shlex.split(args)
            for source in sources:
                dest = context / (target if target != "./" else source)
                if (REPO / source).is_dir():
                    shutil.copytree(REPO / source, dest, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy(REPO / source, dest)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path / "wheel"),
            str(context),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = (tmp_path / "wheel").glob("fedtune-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        entry_points = zf.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert "fedtune = fedtune.cli:main" in entry_points
    health = dockerfile_exec_form(DOCKERFILE.read_text(), "HEALTHCHECK")[2]
    assert health.replace(".", "/") + ".py" in names
    assert {
        "fedtune/cli/main.py",
        "fedtune/server/deployment.py",
        "fedtune/client/deployment.py",
        "fedtune/deploy/bundle.py",
    } <= names
    assert any(n.startswith("fedtune/common/presets/") for n in names), "package data travels too"


@pytest.mark.parametrize(
    "broken, complaint",
    [
        (("torch==${TORCH_VERSION}", "torch"), "CPU index"),
        (("ARG TORCH_VERSION=2.13.0", "ARG TORCH_VERSION=2.12.0"), "pyproject's pin"),
        (("download.pytorch.org/whl/cpu", "download.pytorch.org/whl/cu128"), "not a CPU index"),
        (("COPY deploy ./deploy", "COPY deploy ./deploy\nCOPY setup.py ./"), "not in the repository"),
        (("COPY deploy ./deploy", "COPY deploy ./deploy\nCOPY runs ./runs"), "excluded by .dockerignore"),
        (("USER fedtune\n", ""), "non-root USER"),
        (("USER fedtune\n", "USER root\n"), "non-root USER"),
        (("fedtune.deploy.healthcheck", "fedtune.deploy.health_check"), "HEALTHCHECK"),
        (("FROM python:3.11-slim", "FROM python:3.12-slim"), "FROM python:3.11-slim"),
        (("WORKDIR /fedtune", "WORKDIRR /fedtune"), "unknown instructions"),
    ],
)
def test_a_broken_dockerfile_is_rejected(broken, complaint, tmp_path):
    old, new = broken
    text = DOCKERFILE.read_text()
    assert old in text
    (tmp_path / "runs").mkdir()  # exists, but .dockerignore keeps it out of the build context
    for name in ("pyproject.toml", ".dockerignore", "README.md", "fedtune", "common", "server", "client", "deploy"):
        (tmp_path / name).symlink_to(REPO / name)
    problems = dockerfile_problems(text.replace(old, new), tmp_path)
    assert any(complaint in p for p in problems), problems


# ---------------------------------------------------------------- compose


def compose_files(d) -> list[Path]:
    return [d.root / "compose.yaml", d.operator / "compose.yaml", *[d.site_dir(s) / "compose.yaml" for s in d.sites]]


def compose_prefix_length(cmd: list[str]) -> int:
    """``docker compose exec SERVICE`` or ``docker compose run --rm --no-deps SERVICE``: where the command starts."""
    return 4 if cmd[2] == "exec" else 6


def split_shell(command: str) -> list[list[str]]:
    """The simple commands of ``a & exec b`` (what the SuperLink container runs under bash)."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars="&;")
    lexer.whitespace_split = True
    commands, current = [], []
    for token in lexer:
        if token in ("&", ";", "&&"):
            commands.append(current)
            current = []
        else:
            current.append(token)
    commands.append(current)
    return [c[1:] if c[0] == "exec" else c for c in commands if c]


def unescape(arg: str) -> str:
    return arg.replace("$$", "$")


def service_commands(service: dict) -> list[list[str]]:
    command = [unescape(a) for a in service["command"]]
    return split_shell(command[2]) if command[:2] == ["bash", "-c"] else [command]


def interpolated_default(text: str) -> str:
    """``${VAR:-default}`` as compose reads it when VAR is unset."""
    if text.startswith("${") and ":-" in text:
        return text[text.index(":-") + 2 : text.rindex("}")]
    return text


def host_path(container_path: str, mounts: list[tuple[Path, str, str]]) -> Path | None:
    """The host file a container path reaches through the bind mounts (the deepest mount wins)."""
    best = None
    for source, target, _ in mounts:
        if container_path == target or container_path.startswith(target.rstrip("/") + "/"):
            if best is None or len(target) > len(best[1]):
                best = (source, target)
    if best is None:
        return None
    return best[0] / os.path.relpath(container_path, best[1])


def container_paths(cmd: list[str]) -> list[str]:
    """Every container path a command names, also inside ``--node-config``."""
    paths = []
    for arg in cmd:
        for word in shlex.split(arg) if "=" in arg else [arg]:
            value = word.split("=", 1)[1] if "=" in word else word
            if value.startswith(str(CONTAINER) + "/") or value == str(CONTAINER):
                paths.append(value)
    return paths


def compose_problems(
    doc: dict, here: Path, expected: dict[str, list[list[str]]], writable: dict[str, set[str]]
) -> list[str]:
    """What is wrong with a parsed compose file whose services should run ``expected``."""
    problems = []
    services = doc.get("services", {})
    if set(doc) - {"services", "volumes", "networks", "name"}:
        problems.append(f"unknown top-level keys {set(doc) - {'services', 'volumes', 'networks', 'name'}}")
    if set(services) != set(expected):
        problems.append(f"services {sorted(services)} != {sorted(expected)}")
    named_volumes = set(doc.get("volumes") or {})
    published, runtime_ports, homes = [], [], []
    for name, service in services.items():
        if not COMPOSE_SERVICE_NAME.match(name):
            problems.append(f"{name!r} is not a valid service name")
        if set(service) - COMPOSE_SERVICE_KEYS:
            problems.append(f"{name}: unknown keys {sorted(set(service) - COMPOSE_SERVICE_KEYS)}")
        if not all(isinstance(a, str) for a in service.get("command", [None])):
            problems.append(f"{name}: command is not a list of strings")
        if not all(isinstance(v, str) for v in service.get("environment", {}).values()):
            problems.append(f"{name}: environment values must be strings")
        for key in ("volumes", "ports", "cap_drop", "security_opt"):
            if len(set(service.get(key, []))) != len(service.get(key, [])):
                problems.append(f"{name}: {key} repeats an item")
        if service.get("restart", "no") not in ("no", "always", "on-failure", "unless-stopped"):
            problems.append(f"{name}: restart {service['restart']!r}")
        for dependency, condition in (service.get("depends_on") or {}).items():
            if dependency not in services or condition.get("condition") not in ("service_started", "service_healthy"):
                problems.append(f"{name}: depends on {dependency} {condition}")
        if name in expected and service_commands(service) != expected[name]:
            problems.append(f"{name}: command {service_commands(service)} is not the builders' {expected[name]}")
        user = service.get("user", "")
        uid = user[: user.index("}") + 1] if user.startswith("${") else user.split(":")[0]
        if interpolated_default(uid) in ("", "0", "root"):
            problems.append(f"{name}: runs as root ({user!r})")
        mounts = []
        for volume in service.get("volumes", []):
            source, target, *mode = (
                volume.split(":")
                if not volume.startswith("${")
                else [volume[: volume.index("}") + 1], *volume[volume.index("}") + 2 :].split(":")]
            )
            source, target = unescape(interpolated_default(source)), unescape(target)
            if not target.startswith("/"):
                problems.append(f"{name}: mount target {target} is not absolute")
            if source in named_volumes:
                continue
            if not source.startswith("."):
                problems.append(f"{name}: {source} is neither a named volume nor relative to the compose file")
                continue
            path = (here / source).resolve()
            if not path.exists():
                problems.append(f"{name}: mounts {source}, which does not exist")
            if (mode or ["rw"])[0] != "ro" and target not in writable.get(name, set()):
                problems.append(f"{name}: {target} is mounted writable")
            mounts.append((path, target, (mode or ["rw"])[0]))
        for cmd in service_commands(service):
            for path in container_paths(cmd):
                if any(target.startswith(path.rstrip("/") + "/") for _, target, _ in mounts):
                    continue  # a folder of the container holding mounts, such as the deployment root
                found = host_path(path, mounts)
                if found is None or not (found.exists() or found.parent.is_dir()):
                    problems.append(f"{name}: {path} reaches no host file through the mounts")
            if "--port" in cmd:
                runtime_ports.append(cmd[cmd.index("--port") + 1])
        published += [p.split(":")[0] for p in service.get("ports", [])]
        homes.append(service.get("environment", {}).get("FLWR_HOME"))
        if "FEDTUNE_HEALTHCHECK_URL" not in service.get("environment", {}):
            problems.append(f"{name}: no health probe")
    if len(set(published)) != len(published):
        problems.append(f"published ports collide: {published}")
    if len(set(runtime_ports)) != len(runtime_ports):
        problems.append(f"--port values collide: {runtime_ports}")
    if len(set(homes)) != len(homes):
        problems.append(f"services share a Flower home: {homes}")
    return problems


def expected_services(d, file: Path) -> tuple[dict[str, list[list[str]]], dict[str, set[str]]]:
    """What each service of ``file`` must run, from the builders, and which mounts it may write."""
    at = replace(d, root=CONTAINER)
    superlink = {compose.SUPERLINK_SERVICE: [registry_command(at), superlink_command(replace(at, host="0.0.0.0"))]}
    writable = {compose.SUPERLINK_SERVICE: {str(at.operator)}}
    writable |= {s: {str(at.site_dir(s) / "state"), str(at.site_dir(s) / "flwr-home")} for s in d.sites}
    if file == d.operator / "compose.yaml":
        return superlink, writable
    if file == d.root / "compose.yaml":
        return superlink | {s: [supernode_command(replace(at, host="superlink"), s)] for s in d.sites}, writable
    site = file.parent.name
    return {site: [supernode_command(at, site)]}, writable


def test_compose_files_run_the_builders_commands_on_existing_mounts(deployment):
    d = deployment
    for path in compose_files(d):
        doc = yaml.safe_load(path.read_text())
        expected, writable = expected_services(d, path)
        assert compose_problems(doc, path.parent, expected, writable) == [], path
    everything = yaml.safe_load((d.root / "compose.yaml").read_text())["services"]
    assert set(everything) == {"superlink", *SITES}
    for site in SITES:
        assert everything[site]["depends_on"] == {"superlink": {"condition": "service_healthy"}}
        assert f"./sites/{site}/data" in " ".join(everything[site]["volumes"]), "a site's data is mounted"


def test_a_broken_compose_file_is_rejected(deployment):
    d = deployment
    path = d.root / "compose.yaml"
    expected, writable = expected_services(d, path)

    def problems(edit) -> list[str]:
        doc = yaml.safe_load(path.read_text())
        edit(doc["services"])
        return compose_problems(doc, path.parent, expected, writable)

    assert any("services" in p for p in problems(lambda s: s.pop("east")))
    assert any("collide" in p for p in problems(lambda s: s["east"]["command"].__setitem__(10, "9094")))
    assert any("not the builders'" in p for p in problems(lambda s: s["north"]["command"].__setitem__(2, "x:1")))
    assert any("does not exist" in p for p in problems(lambda s: s["north"]["volumes"].append("./nowhere:/x:ro")))
    assert any(
        "writable" in p
        for p in problems(lambda s: s["north"]["volumes"].__setitem__(0, s["north"]["volumes"][0].removesuffix(":ro")))
    )
    assert any("reaches no host file" in p for p in problems(lambda s: s["north"]["volumes"].pop(0)))
    assert any("root" in p for p in problems(lambda s: s["south"].__setitem__("user", "0:0")))
    assert any("root" in p for p in problems(lambda s: s["south"].__setitem__("user", "${FEDTUNE_UID:-0}:0")))
    assert any("published" in p for p in problems(lambda s: s["north"].__setitem__("ports", ["18200:1"])))
    assert any("unknown keys" in p for p in problems(lambda s: s["north"].__setitem__("enviroment", {})))
    assert any(
        "depends on" in p
        for p in problems(
            lambda s: s["north"].__setitem__("depends_on", {"superlinc": {"condition": "service_healthy"}})
        )
    )
    assert any("service name" in p for p in problems(lambda s: s.__setitem__("east site", s.pop("east"))))


def certificate_names(cert_path: Path) -> set[str]:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return set(san.get_values_for_type(x509.DNSName)) | {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}


def test_the_superlink_certificate_names_every_address_a_container_dials(deployment):
    d = deployment
    dialled = {"127.0.0.1"}  # the CLI and the health probe inside the SuperLink container; Flower's helper
    for path in compose_files(d):
        for service in yaml.safe_load(path.read_text())["services"].values():
            for cmd in service_commands(service):
                if "--superlink" in cmd:
                    dialled.add(cmd[cmd.index("--superlink") + 1].rsplit(":", 1)[0])
    cli = tomllib.loads((d.operator / compose.CLI_HOME / "config.toml").read_text())["superlink"]
    dialled.add(cli[cli["default"]]["address"].rsplit(":", 1)[0])
    assert {"superlink", d.host} <= dialled
    assert dialled <= certificate_names(d.operator / "superlink.crt")
    assert cli[cli["default"]]["root-certificates"] == str(CONTAINER / "operator" / "ca.crt")


def test_the_operator_steps_are_the_builders_commands(deployment):
    d = deployment
    at = replace(d, root=CONTAINER)
    steps = compose.operator_commands(d)
    assert [c[4:] for c in steps["register"]] == [register_command(at, s) for s in d.sites]
    assert [c[:4] for c in steps["register"]] == [["docker", "compose", "exec", "superlink"]] * len(d.sites)
    assert steps["sign"] == [["docker", "compose", "run", "--rm", "--no-deps", "superlink", *sign_command(at)]]
    (run,) = steps["run"]
    assert run[4:-2] == run_command(d) and run[-2] == "--run-config"
    assert run[-1] == f'output-dir="{at.operator / "runs"}"', "runs land in the mounted operator folder"
    text = (d.root / "compose.yaml").read_text()
    for cmd in steps["register"] + steps["sign"] + steps["run"]:
        assert f"#   {shlex.join(cmd)}\n" in text


def test_the_env_file_names_the_owner_of_the_keys(deployment):
    d = deployment
    for folder, key in [
        (d.root, d.site_dir("north") / "auth"),
        (d.operator, d.operator / "superlink.key"),
        (d.site_dir("south"), d.site_dir("south") / "auth"),
    ]:
        env = dict(
            line.split("=", 1)
            for line in (folder / ".env").read_text().splitlines()
            if line and not line.startswith("#")
        )
        assert int(env["FEDTUNE_UID"]) == key.stat().st_uid and int(env["FEDTUNE_GID"]) == key.stat().st_gid


# ---------------------------------------------------------------- systemd units and scripts


def script_commands(script: Path) -> list[list[str]]:
    lines = [line for line in script.read_text().splitlines() if line and not line.startswith(("#", "set ", "export "))]
    return [cmd[1:] if cmd[0] == "exec" else cmd for cmd in map(shlex.split, lines)]


def script_exports(script: Path) -> dict[str, str]:
    exports = {}
    for line in script.read_text().splitlines():
        if line.startswith("export "):
            exports |= dict(word.split("=", 1) for word in shlex.split(line)[1:])
    return exports


def bash_syntax_error(script: Path) -> str:
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    return r.stderr if r.returncode else ""


def read_unit(path: Path) -> configparser.ConfigParser:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # systemd's keys are case-sensitive
    unit.read_string(path.read_text())
    return unit


def unit_paths(value: str) -> list[Path]:
    return [Path(p.lstrip("-").replace("%%", "%")) for p in shlex.split(value)]


def unit_problems(path: Path, writes: list[Path]) -> list[str]:
    """What is wrong with a unit whose process writes ``writes``."""
    try:
        unit = read_unit(path)
    except configparser.Error as exc:
        return [f"does not parse: {exc}"]
    problems = [f"no [{s}]" for s in ("Unit", "Service", "Install") if not unit.has_section(s)]
    if problems:
        return problems
    service = unit["Service"]
    wanted = {"Type": "simple", "Restart": "on-failure", "NoNewPrivileges": "yes", "ProtectSystem": "strict"}
    problems += [f"{k}={service.get(k)}, not {v}" for k, v in wanted.items() if service.get(k) != v]
    if service.get("User", "root") in ("root", "0"):
        problems.append("runs as root")
    start = unit_paths(service.get("ExecStart", ""))
    if not start or not start[0].is_absolute() or not os.access(start[0], os.X_OK):
        problems.append(f"ExecStart {start} is not an executable absolute path")
    elif bash_syntax_error(start[0]):
        problems.append(f"ExecStart {start[0]}: {bash_syntax_error(start[0])}")
    if not Path(service.get("WorkingDirectory", "")).is_dir():
        problems.append(f"WorkingDirectory {service.get('WorkingDirectory')} is not a folder")
    writable = unit_paths(service.get("ReadWritePaths", ""))
    problems += [f"ReadWritePaths {p} does not exist" for p in writable if not p.exists()]
    problems += [
        f"{p} is written but not in ReadWritePaths"
        for p in writes
        if not any(p == w or p.is_relative_to(w) for w in writable)
    ]
    if unit["Install"].get("WantedBy") != "multi-user.target":
        problems.append("not WantedBy=multi-user.target")
    return problems


def written_by_superlink(d) -> list[Path]:
    script = d.operator / "start-superlink.sh"
    (cmd,) = script_commands(script)
    output_dir = tomllib.loads((d.app / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]["output-dir"]
    return [Path(cmd[cmd.index("--database") + 1]).parent, Path(script_exports(script)["FLWR_HOME"]), Path(output_dir)]


def written_by_site(d, site: str) -> list[Path]:
    script = d.site_dir(site) / "start-supernode.sh"
    (cmd,) = script_commands(script)
    node_config = dict(w.split("=", 1) for w in shlex.split(cmd[cmd.index("--node-config") + 1]))
    return [Path(node_config["state-dir"]), Path(script_exports(script)["FLWR_HOME"])]


def units(d) -> dict[Path, list[Path]]:
    found = {
        d.operator / "systemd" / "fedtune-superlink.service": written_by_superlink(d),
        d.operator / "systemd" / "fedtune-app-registry.service": [],
    }
    return found | {d.site_dir(s) / "systemd" / "fedtune-supernode.service": written_by_site(d, s) for s in d.sites}


def test_systemd_units_start_the_scripts_and_may_write_only_what_they_write(deployment):
    d = deployment
    for path, writes in units(d).items():
        assert unit_problems(path, writes) == [], path
    superlink = read_unit(d.operator / "systemd" / "fedtune-superlink.service")
    assert "fedtune-app-registry.service" in superlink["Unit"]["Wants"]
    hidden = unit_paths(superlink["Service"]["InaccessiblePaths"])
    assert hidden == [d.operator / "ca.key", d.operator / "signing.key"] and all(p.exists() for p in hidden)
    assert unit_paths(superlink["Service"]["ReadWritePaths"])[-1] == d.root.parent / "runs"


def test_a_broken_unit_is_rejected(deployment, tmp_path):
    d = deployment
    path = d.site_dir("north") / "systemd" / "fedtune-supernode.service"
    writes = written_by_site(d, "north")

    def problems(old: str, new: str) -> list[str]:
        text = path.read_text()
        assert old in text
        (tmp_path / "broken.service").write_text(text.replace(old, new))
        return unit_problems(tmp_path / "broken.service", writes)

    assert any("[Install]" in p for p in problems("[Install]", "[Instal]"))
    assert any("ExecStart" in p for p in problems("ExecStart=/", "ExecStart=/nowhere/"))
    assert any("ReadWritePaths" in p and "exist" in p for p in problems("ReadWritePaths=/", "ReadWritePaths=/x/"))
    assert any("written but not" in p for p in problems(f" {d.site_dir('north') / 'flwr-home'}", ""))
    assert any("root" in p for p in problems("User=fedtune", "User=root"))
    assert any("Restart" in p for p in problems("Restart=on-failure", "Restart=no"))
    bad_script = tmp_path / "start.sh"
    bad_script.write_text("#!/usr/bin/env bash\nexec flower-supernode 'unclosed\n")
    bad_script.chmod(0o755)
    assert any(
        "ExecStart" in p for p in problems(f"ExecStart={path.parents[1]}/start-supernode.sh", f"ExecStart={bad_script}")
    )


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_itself_accepts_the_units(deployment, tmp_path):
    for path in units(deployment):
        r = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True)
        assert (r.returncode, r.stderr) == (0, ""), path
    broken = tmp_path / "fedtune-supernode.service"
    broken.write_text(path.read_text().replace("ProtectSystem=", "ProtectSystm="))
    r = subprocess.run(["systemd-analyze", "verify", str(broken)], capture_output=True, text=True)
    assert "Unknown key" in r.stderr


def test_every_script_is_valid_bash_and_execs_its_last_command(deployment, tmp_path):
    scripts = sorted(deployment.root.rglob("*.sh"))
    named = {"start-registry.sh", "start-superlink.sh", "register-sites.sh", "sign-app.sh", "run-federation.sh"}
    assert named <= {p.name for p in scripts} and len([p for p in scripts if p.name == "start-supernode.sh"]) == 3
    for script in scripts:
        assert bash_syntax_error(script) == "", script
        assert [line for line in script.read_text().splitlines() if line][-1].startswith("exec "), script
    broken = tmp_path / "broken.sh"
    broken.write_text("#!/usr/bin/env bash\nif true; then exec flwr\n")
    assert "syntax error" in bash_syntax_error(broken)


# ---------------------------------------------------------------- the health probe


class _Health(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.send_response(self.status if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def tls_health_server(deployment):
    """``/health`` over TLS with the SuperLink's own certificate."""
    handler = type("Health", (_Health,), {})
    server = HTTPServer(("127.0.0.1", 0), handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(deployment.operator / "superlink.crt", deployment.operator / "superlink.key")
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server, handler
    server.shutdown()
    server.server_close()


def test_the_probe_checks_the_certificate_and_the_answer(deployment, tls_health_server, tmp_path):
    server, handler = tls_health_server
    url = f"https://127.0.0.1:{server.server_address[1]}/health"
    assert probe(url, deployment.operator / "ca.crt") is None
    other_ca = tmp_path / "other"
    from fedtune.deploy.credentials import make_ca

    make_ca(other_ca)
    assert "CERTIFICATE_VERIFY_FAILED" in probe(url, other_ca / "ca.crt")
    handler.status = 503
    assert "503" in probe(url, deployment.operator / "ca.crt")
    assert probe(f"http://127.0.0.1:{free_port()}/health") is not None


def test_the_image_probe_reads_its_target_from_the_environment(deployment, tls_health_server, monkeypatch):
    server, _ = tls_health_server
    monkeypatch.delenv("FEDTUNE_HEALTHCHECK_URL", raising=False)
    assert healthcheck_main() == 0
    monkeypatch.setenv("FEDTUNE_HEALTHCHECK_URL", f"https://127.0.0.1:{server.server_address[1]}/health")
    monkeypatch.setenv("FEDTUNE_HEALTHCHECK_CA", str(deployment.operator / "ca.crt"))
    assert healthcheck_main() == 0
    monkeypatch.setenv("FEDTUNE_HEALTHCHECK_URL", f"https://127.0.0.1:{free_port()}/health")
    assert healthcheck_main() == 1


def flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, ca: Path | None, timeout: float) -> str | None:
    deadline = time.monotonic() + timeout
    problem = probe(url, ca)
    while problem and time.monotonic() < deadline:
        time.sleep(0.5)
        problem = probe(url, ca)
    return problem


@pytest.mark.e2e
def test_the_compose_probes_pass_against_a_real_superlink_and_supernode(tmp_path):
    """The probe URLs compose configures, with the container's bind address, against Flower itself."""
    cfg = config_from_dict(
        {
            "model": {"name": "tiny-llama"},
            "data": {"task": "question-answer", "path": str(SAMPLES / "medquad" / "medquad_sample.jsonl")},
            "partition": {"num_clients": 2},
        },
        "test",
        tmp_path,
    )
    d = init_deployment(tmp_path / "fed", cfg, port=free_port(), site_ids=["north", "south"], registry_port=free_port())
    services = yaml.safe_load((d.root / "compose.yaml").read_text())["services"]
    procs = []

    def start(cmd: list[str], home: Path, log: str) -> None:
        with open(tmp_path / log, "wb") as out:
            procs.append(
                subprocess.Popen(
                    cmd, env=flower_env(home), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
                )
            )

    try:
        start(superlink_command(replace(d, host="0.0.0.0")), d.operator / "flwr-home", "superlink.log")
        env = services["superlink"]["environment"]
        assert env["FEDTUNE_HEALTHCHECK_CA"] == str(CONTAINER / "operator" / "ca.crt")
        problem = wait_healthy(env["FEDTUNE_HEALTHCHECK_URL"], d.operator / "ca.crt", 90)
        assert problem is None, problem + (tmp_path / "superlink.log").read_text()[-2000:]
        r = subprocess.run(
            register_command(d, "north"),
            env=flower_env(d.operator / "flwr-home"),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 0, r.stdout + r.stderr
        compose_port = flag(services["north"]["command"], "--port")
        assert services["north"]["environment"]["FEDTUNE_HEALTHCHECK_URL"] == f"http://127.0.0.1:{compose_port}/health"
        port = free_port()  # the compose port may be taken on this machine; the probe is the same
        start(supernode_command(d, "north", port=port), d.site_dir("north") / "flwr-home", "north.log")
        problem = wait_healthy(f"http://127.0.0.1:{port}/health", None, 90)
        assert problem is None, problem + (tmp_path / "north.log").read_text()[-2000:]
    finally:
        for p in procs:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(p.pid, sig)
                    p.wait(timeout=15)
                    break
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    continue
