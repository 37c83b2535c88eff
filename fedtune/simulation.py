"""A whole federation on one machine, through Flower's simulation engine (Ray).

Each simulated site is a Flower SuperNode whose ClientApp runs in a Ray actor with
``federation.cpus_per_client`` CPUs; Ray is also how the same code scales past one machine.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from flwr.clientapp.typing import Mod
from flwr.serverapp import Grid

from fedtune.client.membership import SIMULATED_ROSTER, simulated_identity_path
from fedtune.common.config import ConfigError, FedtuneConfig
from fedtune.common.data.federation_data import SiteSplit, build_site_splits, load_test_set
from fedtune.common.devices import resolve_device
from fedtune.common.logs import add_log_file
from fedtune.common.models.loading import quantization_problem
from fedtune.common.models.lora import checked_model_spec
from fedtune.common.roster import Roster, load_roster
from fedtune.common.site_identity import SiteIdentity
from fedtune.server.messaging import FederationError
from fedtune.server.run_directory import new_run_dir
from fedtune.server.strategies import build_strategy
from fedtune.what_if import SlowRepliesGrid, late_joiners

log = logging.getLogger("fedtune.simulation")


def check_privacy_feasible(cfg: FedtuneConfig, sites: list[SiteSplit]) -> None:
    """delta must be below 1/n on every site, or the (epsilon, delta) guarantee means little.

    The largest site binds: 1/n is smallest there, and that site would refuse every round.
    """
    if not cfg.privacy.enabled:
        return
    largest = max(len(s.train) for s in sites)
    if cfg.privacy.delta >= 1.0 / largest:
        raise ConfigError(
            f"privacy.delta = {cfg.privacy.delta} must be below 1/n for every site; the largest site has "
            f"n = {largest} training records, so use delta < {1.0 / largest:.2e}"
        )


def simulated_roster(run_dir: Path, members: list[str]) -> Roster:
    """The simulated sites' roster, each member's identity in ``RUN_DIR/identities`` (kept on resume).

    Simulated sites sign their secure-aggregation keys and check each other's as deployed ones
    do, so every simulation runs the authenticated protocol.
    """
    roster_path = run_dir / SIMULATED_ROSTER
    if roster_path.exists():
        return load_roster(roster_path)
    keys = {}
    for member in members:
        identity = SiteIdentity.generate(member)
        identity.save(simulated_identity_path(run_dir, member))
        keys[member] = identity.public
    roster = Roster(federation=run_dir.name, members=keys)
    roster.save(roster_path)
    return roster


def partition_summary(sites: list[SiteSplit], test_size: int) -> str:
    rows = [f"  site-{i}: {len(s.train):5d} train / {len(s.val):4d} val records" for i, s in enumerate(sites)]
    return "\n".join(["data partition (records stay on their site):", *rows, f"  server held-out: {test_size} records"])


class RunInterrupted(Exception):
    """The user stopped a simulation (Ctrl-C); the message says how to resume it."""


def simulate(
    cfg: FedtuneConfig,
    run_dir: Path | None = None,
    resume: bool = False,
    client_mods: Sequence[Mod] = (),
    verbose: bool = False,
) -> Path:
    """Run (or resume) a simulated federation; returns the run directory.

    ``client_mods`` are Flower mods wrapped around every site's ClientApp (logging, fault
    injection for tests). The console shows progress and the summary; the server's and the
    sites' logs go to ``RUN_DIR/logs`` (and to the console too when ``verbose``).
    """
    from flwr.simulation import run_simulation

    from fedtune.client.app import build_client_app, simulated_site_factory
    from fedtune.server.app import build_server_app

    build_strategy(cfg.federation)  # an unknown strategy fails here, before Ray starts
    if cfg.tracking.mlflow_uri and importlib.util.find_spec("mlflow") is None:
        raise ConfigError(
            f"tracking.mlflow_uri = {cfg.tracking.mlflow_uri!r} needs MLflow, which is not installed: "
            "pip install 'fedtune[mlflow]', or set tracking.mlflow_uri = '' (TensorBoard files are written anyway)"
        )
    # The model is checked (and fetched once, so actors only read the cache) before any data is read
    # or the run directory exists: a bad model.path or LoRA target is one line, not a site's traceback.
    spec = checked_model_spec(cfg)
    # train.device = 'cuda' without a GPU, or a quantised base that cannot load here: one line, before Ray starts.
    problem = quantization_problem(spec, resolve_device(cfg.train.device))
    if problem:
        raise ConfigError(problem)
    if cfg.partition.scheme == "files":
        # Each site reads and validates its own files; the server never opens them.
        summary = "\n".join(
            [
                "site data (read and validated on each site only):",
                *[f"  site-{i}: {p}" for i, p in enumerate(cfg.data.site_paths)],
                f"  server held-out: {len(load_test_set(cfg))} records",
            ]
        )
    else:
        sites, test = build_site_splits(cfg)
        check_privacy_feasible(cfg, sites)
        summary = partition_summary(sites, len(test))
    run_dir = Path(run_dir) if run_dir is not None else new_run_dir(cfg)
    print(summary, flush=True)
    print(f"run directory: {run_dir}", flush=True)
    add_log_file(run_dir / "logs" / "server.log")
    if cfg.secure_aggregation.enabled:
        simulated_roster(run_dir, [f"site-{i}" for i in range(cfg.partition.num_clients)])
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # every site's round line, not "repeated 2x"
    what_if = cfg.simulation

    def server_view(grid: Grid) -> Grid:
        return SlowRepliesGrid(grid, what_if.slow_sites, what_if.slow_site_delay_s) if what_if.slow_sites else grid

    available = late_joiners(what_if.late_joiners, what_if.join_round)
    server_app = build_server_app(cfg, spec, run_dir, resume=resume, available=available, grid_view=server_view)
    client_app = build_client_app(simulated_site_factory(cfg, spec, run_dir, verbose), mods=client_mods)
    resume_hint = f"resume with `fedtune simulate --resume {run_dir}`"
    try:
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=cfg.partition.num_clients,
            backend_config={
                "client_resources": {
                    "num_cpus": cfg.federation.cpus_per_client,
                    "num_gpus": cfg.federation.gpus_per_client,  # fractions: sites share a GPU
                },
                # Sites log to RUN_DIR/logs; their console output reaches this one only when verbose.
                "init_args": {"include_dashboard": False, "logging_level": logging.WARNING, "log_to_driver": verbose},
            },
            verbose_logging=verbose,
        )
    except KeyboardInterrupt as exc:
        raise RunInterrupted(f"interrupted; {resume_hint}") from exc
    except FederationError as exc:
        raise FederationError(f"{exc} (details in {run_dir / 'logs'}; {resume_hint})") from exc
    if not (run_dir / "result.json").exists():
        raise FederationError(f"the simulation ended without finishing the run; see {run_dir / 'logs'}; {resume_hint}")
    stopped = json.loads((run_dir / "result.json").read_text()).get("stopped")
    if stopped:
        raise FederationError(f"{stopped}; the run stopped early, its summary and logs are in {run_dir}")
    return run_dir
