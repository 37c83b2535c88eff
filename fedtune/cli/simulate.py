"""``fedtune simulate``: a whole federation on this machine (Flower's simulation engine on Ray)."""

from __future__ import annotations

import argparse
from pathlib import Path

from fedtune.cli.config_options import add_config_options, config_from_args
from fedtune.cli.exit_codes import ExitCode
from fedtune.common.config import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    sim = sub.add_parser("simulate", help="run a whole federation on this machine (Flower simulation on Ray)")
    source = add_config_options(sim)
    source.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue a run from its last complete round")
    sim.set_defaults(run=run)


def run(args: argparse.Namespace) -> ExitCode:
    from fedtune.server.run_directory import load_run_config
    from fedtune.simulation import simulate

    if args.resume is not None:
        if args.set:
            raise ConfigError("--set cannot change a run being resumed; start a new run instead")
        run_dir = simulate(load_run_config(args.resume), run_dir=args.resume, resume=True, verbose=args.verbose)
    else:
        run_dir = simulate(config_from_args(args), verbose=args.verbose)
    print(
        f"\nrun directory: {run_dir}\n  metrics: {run_dir / 'metrics.jsonl'}\n  plot: {run_dir / 'curves.png'}"
        f"\n  merged model: {run_dir / 'merged'}\n  site ledgers: {run_dir / 'sites'}\n  logs: {run_dir / 'logs'}"
    )
    return ExitCode.OK
