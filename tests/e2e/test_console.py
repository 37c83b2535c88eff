"""`fedtune simulate` as a user runs it: a quiet console, the details in the run's log files,
and a federation in which every site refuses ending with one line and exit status 1."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import SAMPLES

pytestmark = pytest.mark.e2e
BANKING = SAMPLES / "banking77"


def _fedtune(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    return subprocess.run(
        [sys.executable, "-m", "fedtune", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=900
    )


def _tiny(tmp_path: Path, *extra: str) -> list[str]:
    return [
        "simulate",
        "--set",
        "model.name='tiny-bert'",
        "--set",
        "federation.rounds=1",
        "--set",
        "train.local_steps=2",
        "--set",
        "data.max_eval_examples=32",
        "--set",
        f"run.output_dir='{tmp_path / 'runs'}'",
        *extra,
    ]


def test_the_console_shows_progress_and_summary_and_the_logs_go_to_the_run_directory(tmp_path):
    r = _fedtune(*_tiny(tmp_path), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    console = r.stdout + r.stderr
    for noise in ("DEBUG", "INFO :", "ClientAppActor", "Traceback", "WARNING"):
        assert noise not in console, f"{noise!r} reached the console:\n{console[-3000:]}"
    assert "data partition" in r.stdout and "held-out accuracy" in r.stdout and "run directory:" in r.stdout
    (run_dir,) = (tmp_path / "runs").iterdir()
    server_log = (run_dir / "logs" / "server.log").read_text()
    sites_log = (run_dir / "logs" / "sites.log").read_text()
    assert "flwr" in server_log  # Flower's own lines are kept, in the file
    assert "site-0 round 1" in sites_log and "site-1 round 1" in sites_log


def test_a_federation_where_every_site_refuses_ends_with_one_line_and_status_1(tmp_path):
    bad = tmp_path / "site.csv"
    bad.write_text("foo,bar\n1,2\n3,4\n")  # no text or category column: every site's data is invalid
    r = _fedtune(
        *_tiny(
            tmp_path,
            "--set",
            "partition.scheme='files'",
            "--set",
            "partition.num_clients=2",
            "--set",
            f"data.site_paths=['{bad}', '{bad}']",
        ),
        cwd=tmp_path,
    )
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    # Warnings name the sites as rounds go; the run ends with one line that says why.
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("fedtune: every site refused round 1"), r.stderr[-2000:]
    assert "site-0: site not ready: data invalid" in last and "Traceback" not in r.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert "no column 'text'" in (run_dir / "logs" / "sites.log").read_text()  # the details stay on the site
