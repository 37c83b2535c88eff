"""The installed distribution is one namespace, ``fedtune``: built as a wheel, installed into a fresh
environment, imported from there; nothing else lands at the top of site-packages."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO

#: Repository folder -> its place in the namespace (pyproject's [tool.setuptools.package-dir]).
MAPPED = {
    "fedtune": "fedtune",
    "common": "fedtune/common",
    "server": "fedtune/server",
    "client": "fedtune/client",
    "deploy": "fedtune/deploy",
}
NOT_SHIPPED = {"common/data/samples/build_samples.py"}  # a maintainer's script beside the samples


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(REPO)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    (built,) = out.glob("fedtune-*.whl")
    return built


def test_the_wheel_holds_only_fedtune_and_every_module(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    assert {n.split("/")[0] for n in names} == {"fedtune", wheel.name.split("-py")[0] + ".dist-info"}
    expected = {
        f"{MAPPED[path.relative_to(REPO).parts[0]]}/{Path(*path.relative_to(REPO).parts[1:]).as_posix()}"
        for folder in MAPPED
        for path in (REPO / folder).rglob("*.py")
        if "__pycache__" not in path.parts and path.relative_to(REPO).as_posix() not in NOT_SHIPPED
    }
    missing = sorted(expected - names)
    assert not missing, f"modules left out of the wheel (add their package to pyproject's packages): {missing}"
    assert "fedtune/common/presets/banking77-minilm.toml" in names
    assert any(n.startswith("fedtune/common/data/samples/banking77/") for n in names), "the demo's data travels"


def test_the_wheel_installs_into_a_fresh_environment_and_imports_from_there(wheel, tmp_path):
    env_dir = tmp_path / "env"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            "--force-reinstall",
            str(wheel),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,  # not the repository, whose fedtune.egg-info would pass for an installed fedtune
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    purelib = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    top = sorted(p.name for p in purelib.iterdir())
    assert [n for n in top if not n.startswith("fedtune-")] == ["fedtune"], top
    # The dependencies come from this environment's site-packages, appended after the fresh one.
    (purelib / "zz_dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    probe = (
        "import fedtune, fedtune.server.app, fedtune.client.app, fedtune.cli; "
        "print(fedtune.__file__); print(fedtune.server.app.__file__)"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert all(line.startswith(str(purelib)) for line in r.stdout.split()), r.stdout
