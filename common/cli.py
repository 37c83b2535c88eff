"""``fedtune``: the command line for simulating a federation and fetching models."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.config import PRESETS_DIR, ConfigError, load_config, preset_path
from common.logs import configure_logging


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedtune", description="Federated DP-LoRA fine-tuning with Flower.")
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser("simulate", help="run a whole federation on this machine (Flower simulation on Ray)")
    source = sim.add_mutually_exclusive_group()
    source.add_argument("--config", type=Path, help="TOML config file")
    source.add_argument("--preset", help="built-in config (see `fedtune presets`); default: banking77-minilm")
    source.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue a run from its last complete round")
    sim.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value")
    sub.add_parser("presets", help="list the built-in configs")
    fetch = sub.add_parser("fetch-model", help="fetch and cache a built-in model now (smollm2-135m, minilm-l6)")
    fetch.add_argument("name")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_logging()
    try:
        if args.command == "presets":
            for path in sorted(PRESETS_DIR.glob("*.toml")):
                print(f"{path.stem:24s} {path}")
            return 0
        if args.command == "fetch-model":
            from common.models.builtin import resolve_builtin

            print(resolve_builtin(args.name))
            return 0
        from server.simulation import load_run_config, simulate

        if args.resume is not None:
            if args.set:
                raise ConfigError("--set cannot change a run being resumed; start a new run instead")
            run_dir = simulate(load_run_config(args.resume), run_dir=args.resume, resume=True)
        else:
            cfg = load_config(args.config or (preset_path(args.preset) if args.preset else None), args.set)
            run_dir = simulate(cfg)
        print(f"\nrun directory: {run_dir}\n  metrics: {run_dir / 'metrics.jsonl'}\n  plot: {run_dir / 'curves.png'}"
              f"\n  merged model: {run_dir / 'merged'}\n  site ledgers: {run_dir / 'sites'}")
        return 0
    except ConfigError as exc:
        print(f"fedtune: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
