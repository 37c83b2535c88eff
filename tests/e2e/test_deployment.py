"""A real deployment on loopback: SuperLink, the operator's app registry and three SuperNodes as
separate processes, with TLS, site authentication, signed app bundles and a persistent state
database, all set up by ``fedtune deploy init``.

First the app is sent unsigned (``flwr run DIR``): every site refuses to run it. Then the
signed bundle runs by name for two rounds with secure aggregation and DP-SGD; each site reads
only the data its own policy names, and one site is killed in the middle of round 2, as its
train request (which round 1 set up for secure aggregation) arrives, so it never sends its
masked vector and its neighbours' masks with it must be rebuilt from the shares it left. Each
site made its identity key and its Flower authentication key itself (``fedtune site init``; the
operator only ever holds public keys) and pins the roster the operator built from the public
halves, so every key relayed for secure aggregation carries a member's signature. The
server's record of what it received shows masked vectors unrelated to each site's true
update, whose sum is the true sum. Then the refusals: a site whose key was never
registered, and a site that pins another CA.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from fedtune.common.config import config_from_dict
from fedtune.common.wire import flatten_adapter
from fedtune.deploy.app_registry import publish_app
from fedtune.deploy.bundle import init_deployment
from fedtune.deploy.commands import (
    flower_env,
    register_command,
    registry_command,
    run_command,
    superlink_command,
    superlink_env,
    supernode_command,
)
from fedtune.deploy.credentials import make_ca, make_site_auth_key
from fedtune.deploy.layout import Deployment
from tests.conftest import SAMPLES

pytestmark = pytest.mark.e2e

FEDTUNE = [sys.executable, "-m", "fedtune"]
#: What Flower's SuperNode logs for a signed bundle that no key of its trusted entities signed.
UNTRUSTED_SIGNER = (
    "the provided trusted entities could not verify the FAB"  # each role's command line, as the README gives it
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _site_data(tmp: Path) -> tuple[list[Path], Path]:
    rows = [json.loads(line) for line in (SAMPLES / "medquad" / "medquad_sample.jsonl").read_text().splitlines()]
    paths = []
    for i, source in enumerate(["GHR", "GARD", "NIDDK"]):
        mine = [{"question": r["question"], "answer": r["answer"]} for r in rows if r["source"] == source][:60]
        paths.append(tmp / f"hospital-{i}.jsonl")
        paths[-1].write_text("".join(json.dumps(r) + "\n" for r in mine))
    test = tmp / "server-test.jsonl"
    held_out = [{"question": r["question"], "answer": r["answer"]} for r in rows if r["source"] == "CancerGov"]
    test.write_text("".join(json.dumps(r) + "\n" for r in held_out[:16]))
    return paths, test


class Federation:
    """Processes of one loopback deployment; everything is killed on exit."""

    def __init__(self, d: Deployment, logs: Path):
        self.d, self.logs, self.procs = d, logs, {}
        logs.mkdir(exist_ok=True)

    def start(self, name: str, cmd: list[str], home: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "ab")
        self.procs[name] = subprocess.Popen(
            cmd, env=flower_env(home) | (env or {}), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        return self.procs[name]

    def cli(self, cmd: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            cmd, env=flower_env(self.d.operator / "flwr-home"), capture_output=True, text=True, timeout=timeout
        )

    def cli_in_background(self, name: str, cmd: list[str]) -> subprocess.Popen:
        return self.start(name, cmd, self.d.operator / "flwr-home")

    def kill(self, name: str) -> None:
        """SIGKILL the process and its children (the site's ClientApp): a crash, not a shutdown."""
        os.killpg(self.procs[name].pid, signal.SIGKILL)
        self.procs[name].wait(timeout=10)

    def wait_for_log(self, name: str, text: str, count: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.log(name).count(text) >= count:
                return True
            time.sleep(0.1)
        return False

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def wait_until_healthy(self, timeout: float) -> bool:
        """The SuperLink answers ``/health`` over TLS, verified against the federation CA."""
        context = ssl.create_default_context(cafile=str(self.d.operator / "ca.crt"))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"https://{self.d.address}/health", context=context, timeout=2) as r:
                    if r.status == 200:
                        return True
            except OSError:
                time.sleep(0.3)
        return False

    def stop_all(self) -> None:
        for p in self.procs.values():
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(p.pid, sig)
                    p.wait(timeout=10)
                    break
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    continue


def _site_machines(tmp: Path, sites: list[str]) -> tuple[dict[str, Path], list[str]]:
    """Each site makes its identity and its Flower key on its own machine (here, its own folder):
    returns the folders and the public lines for the roster."""
    folders, lines = {}, []
    for site in sites:
        folders[site] = tmp / "machines" / site
        out = subprocess.run(
            [*FEDTUNE, "site", "init", str(folders[site]), "--name", site], capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr
        lines += [line.strip() for line in out.stdout.splitlines() if "=ed25519:" in line]
    return folders, lines


def _approve_bundle(d: Deployment) -> None:
    """Each site reviews and signs the bundle the operator published; the operator adds the approvals."""
    (fab,) = d.registry.glob("*.fab")
    for site in d.sites:
        out = subprocess.run(
            [*FEDTUNE, "site", "approve", str(fab), "--dir", str(d.site_dir(site))], capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr
    approvals = [str(p) for site in d.sites for p in (d.site_dir(site) / "approvals").glob("*.json")]
    assert subprocess.run([*FEDTUNE, "deploy", "add-approval", str(d.root), *approvals]).returncode == 0


def _pinned_roster(d: Deployment, roster: Path, lines: list[str]) -> dict[str, str]:
    """The operator builds the roster from the public lines; each site pins it. Returns each site's policy lines."""
    members = [a for line in lines for a in ("--member", line)]
    build = [*FEDTUNE, "roster", "build", str(roster), "--federation", "loopback", *members]
    assert subprocess.run(build, capture_output=True).returncode == 0
    pins = {}
    for site in d.sites:
        identity = str(d.site_dir(site) / "identity.pem")
        pin = [*FEDTUNE, "site", "pin", str(roster), "--identity", identity]
        out = subprocess.run(pin, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        pins[site] = "".join(line.strip() + "\n" for line in out.stdout.splitlines() if line.startswith("  "))
        assert pins[site].count(" = ") == 3, out.stdout
    return pins


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("deploy")
    paths, test = _site_data(tmp)
    cfg = config_from_dict(
        {
            "run": {"name": "loopback"},
            "model": {"name": "tiny-llama", "max_length": 48},
            "lora": {"rank": 4, "ffa": True},
            "data": {
                "task": "question-answer",
                "site_paths": [str(p) for p in paths],
                "test_path": str(test),
                "max_eval_examples": 16,
            },
            "partition": {"scheme": "files", "num_clients": 3},
            "federation": {"rounds": 2, "min_clients": 2},
            "train": {"local_steps": 2, "batch_size": 8},
            "privacy": {"epsilon": 4.0, "delta": 1e-3},
            # A killed site is noticed when Flower marks it offline (two missed 30 s heartbeats).
            "secure_aggregation": {"record_masked_inputs": True, "stage_timeout_s": 120},
        },
        "test",
        tmp,
    )
    sites = [f"site-{i}" for i in range(3)]
    machines, lines = _site_machines(tmp, sites)
    d = init_deployment(
        tmp / "fed",
        cfg,
        port=_free_port(),
        registry_port=_free_port(),
        site_public_keys={site: machines[site] / "auth.pub" for site in sites},
    )
    # The operator's output holds no site's private key: each site brings its own into its folder.
    assert not any(p.name in ("auth", "identity.pem") for p in d.root.rglob("*"))
    for site in sites:
        # The site's own keys, and its trusted entities: its own approval key, not the operator's.
        for name in ("auth", "identity.pem", "approval.key", "approval.key.id", "trusted_entities.yaml"):
            shutil.copy2(machines[site] / name, d.site_dir(site) / name)
    _approve_bundle(d)
    pins = _pinned_roster(d, tmp / "roster.toml", lines)
    for site, path in zip(d.sites, paths, strict=False):
        policy = d.site_dir(site) / "policy.toml"
        policy.write_text(
            policy.read_text().replace('# data_path = "/srv/fedtune/data/train.jsonl"', f'data_path = "{path}"')
            + pins[site]
        )
    fed = Federation(d, tmp / "logs")
    try:
        fed.start("registry", registry_command(d), d.operator / "flwr-home")
        fed.start("superlink", superlink_command(d), d.operator / "flwr-home", superlink_env(d))
        assert fed.wait_until_healthy(60), fed.log("superlink")[-3000:]
        for site in d.sites:
            r = fed.cli(register_command(d, site))
            assert r.returncode == 0, r.stdout + r.stderr
        for site in d.sites:
            fed.start(site, supernode_command(d, site, port=_free_port()), d.site_dir(site) / "flwr-home")
        yield fed
    finally:
        fed.stop_all()


def test_sites_refuse_an_unsigned_app(deployment, tmp_path):
    fed, d = deployment, deployment.d
    r = fed.cli(run_command(d, signed=False) + ["--run-config", f"output-dir={json.dumps(str(tmp_path))}"], timeout=300)
    assert not (tmp_path / "loopback" / "result.json").exists(), "the unsigned run must not complete"
    for site in d.sites:
        assert "The FAB could not be verified" in fed.log(site), fed.log(site)[-2000:]
        assert not (d.site_dir(site) / "state" / "privacy_ledger.json").exists(), "no site trained"
    assert "every site failed" in r.stdout + r.stderr


def test_a_bundle_the_operator_edited_and_re_signed_is_refused_by_every_site(deployment, tmp_path):
    """The operator changes the client entry point and signs the new version with its own key: sites trust
    only their own approvals, so each refuses it before anything runs. (The app folder is put back after,
    so the next test runs the approved 1.0.0.)"""
    fed, d = deployment, deployment.d
    client_app, pyproject = d.app / "fedtune_app" / "client_app.py", d.app / "pyproject.toml"
    original = {client_app: client_app.read_text(), pyproject: pyproject.read_text()}
    try:
        client_app.write_text("from fedtune.client.deployment import app  # edited\n")
        pyproject.write_text(original[pyproject].replace('version = "1.0.0"', 'version = "1.0.1"'))
        publish_app(d.app, d.operator / "signing.key", d.signing_key_id, d.registry)
        before = {site: fed.log(site).count(UNTRUSTED_SIGNER) for site in d.sites}
        r = fed.cli(run_command(d) + ["--run-config", f"output-dir={json.dumps(str(tmp_path))}"], timeout=600)
    finally:
        for path, text in original.items():
            path.write_text(text)
    assert not (tmp_path / "loopback" / "result.json").exists(), "the re-signed run must not complete"
    for site in d.sites:
        assert fed.log(site).count(UNTRUSTED_SIGNER) > before[site], fed.log(site)[-2000:]
        assert not (d.site_dir(site) / "state" / "privacy_ledger.json").exists(), "no site trained"
    assert "every site failed" in r.stdout + r.stderr


def test_two_signed_secure_dp_rounds_survive_a_site_killed_mid_round(deployment):
    fed, d = deployment, deployment.d
    run = fed.cli_in_background("flwr-run", run_command(d))
    # site-2 is killed when its round-2 train request arrives (the ClientApp takes seconds to start).
    assert fed.wait_for_log("site-2", "Receiving: train message", 2, timeout=480), fed.log("flwr-run")
    fed.kill("site-2")
    assert run.wait(timeout=480) == 0, fed.log("flwr-run")[-3000:]
    run_dir = d.operator / "runs" / "loopback"
    assert (run_dir / "result.json").exists(), fed.log("flwr-run")[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["status"] for r in records[1:]] == ["aggregated 3 sites securely", "aggregated 2 sites securely"]
    round2 = records[2]["secure-aggregation"]
    assert round2["survivors"] == ["site-0", "site-1"] and list(round2["dropped"]) == ["site-2"]
    assert "masked input" in round2["dropped"]["site-2"]
    for site in d.sites:
        ledger = json.loads((d.site_dir(site) / "state" / "privacy_ledger.json").read_text())
        rounds = [e["round"] for e in ledger["entries"]]
        # site-2 was killed as its round-2 request arrived; on a slow machine it may have finished
        # training (and spent round 2's budget) first, but its reply never reached the server.
        assert rounds in ([1], [1, 2]) if site == "site-2" else rounds == [1, 2]
        assert 0 < ledger["epsilon"] <= 4.0
    from safetensors.numpy import load_file

    first = load_file(str(run_dir / "checkpoints" / "round-0001" / "adapter_model.safetensors"))
    second = load_file(str(run_dir / "checkpoints" / "round-0002" / "adapter_model.safetensors"))
    assert any((first[k] != second[k]).any() for k in first), "the global adapter changed"

    # What the server held in round 2: one masked vector per survivor, nothing else of theirs.
    received = sorted(p.stem for p in (run_dir / "masked-inputs" / "round-0002").glob("*.npy"))
    assert received == ["site-0", "site-1"]
    counts = {s: int(records[2]["train"][s]["num-examples"]) for s in received}
    true_updates = {}
    for site in received:
        with np.load(d.site_dir(site) / "state" / "last_update.npz") as saved:  # the site's own copy
            released = {k: saved[k] for k in saved.files if k != "__meta__"}
        true_updates[site] = flatten_adapter(released) - flatten_adapter({k: first[k] for k in released})
    dim = true_updates["site-0"].size
    for site in received:
        vector = np.load(run_dir / "masked-inputs" / "round-0002" / f"{site}.npy")
        assert vector.dtype == np.uint64 and vector.shape == (dim + 1,)
        corr = np.corrcoef(vector[:-1].view(np.int64).astype(np.float64), true_updates[site])[0, 1]
        assert abs(corr) < 5 / np.sqrt(dim), f"{site}'s masked vector correlates with its update ({corr:.3f})"
    total = sum(counts.values())
    expected = sum(counts[s] / total * true_updates[s].astype(np.float64) for s in received)
    got = flatten_adapter({k: second[k] for k in released}).astype(np.float64) - flatten_adapter(
        {k: first[k] for k in released}
    )
    assert np.max(np.abs(got - expected)) < 1e-6, "the unmasked mean is the survivors' true weighted mean"


def test_an_unregistered_site_is_refused(deployment, tmp_path):
    fed, d = deployment, deployment.d
    rogue = tmp_path / "rogue"
    make_site_auth_key(rogue, "rogue")
    p = fed.start("rogue", supernode_command(d, "site-0", port=_free_port(), auth_key=rogue / "auth"), rogue)
    assert p.wait(timeout=60) != 0
    assert "Failed to activate SuperNode" in fed.log("rogue")


def test_a_site_pinning_another_ca_is_refused(deployment, tmp_path):
    fed, d = deployment, deployment.d
    make_ca(tmp_path / "other")
    cmd = supernode_command(d, "site-1", port=_free_port(), root_certificates=tmp_path / "other" / "ca.crt")
    p = fed.start("wrong-ca", cmd, tmp_path)
    assert p.wait(timeout=60) != 0
    assert "CERTIFICATE_VERIFY_FAILED" in fed.log("wrong-ca")
