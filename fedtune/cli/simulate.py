"""``fedtune simulate``: a whole federation on this machine (Flower's simulation engine on Ray)."""

from __future__ import annotations

import argparse
from pathlib import Path

from fedtune.cli.exit_codes import ExitCode
from fedtune.common.config import ConfigError, load_config, preset_path


def register(sub: argparse._SubParsersAction) -> None:
    sim = sub.add_parser("simulate", help="run a whole federation on this machine (Flower simulation on Ray)")
    source = sim.add_mutually_exclusive_group()
    source.add_argument("--config", type=Path, help="TOML config file")
    source.add_argument("--preset", help="built-in config (see `fedtune presets`); default: banking77-minilm")
    source.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue a run from its last complete round")
    sim.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value")
    sim.set_defaults(run=run)


def run(args: argparse.Namespace) -> ExitCode:
    from fedtune.server.run_directory import load_run_config
    from fedtune.simulation import simulate

    if args.resume is not None:
        if args.set:
            raise ConfigError("--set cannot change a run being resumed; start a new run instead")
        run_dir = simulate(load_run_config(args.resume), run_dir=args.resume, resume=True, verbose=args.verbose)
    else:
        cfg = load_config(args.config or (preset_path(args.preset) if args.preset else None), args.set)
        run_dir = simulate(cfg, verbose=args.verbose)
    print(f"\nrun directory: {run_dir}\n  metrics: {run_dir / 'metrics.jsonl'}\n  plot: {run_dir / 'curves.png'}"
          f"\n  merged model: {run_dir / 'merged'}\n  site ledgers: {run_dir / 'sites'}\n  logs: {run_dir / 'logs'}")
    return ExitCode.OK
