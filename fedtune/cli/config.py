"""``fedtune config show`` and ``fedtune presets``: the effective config, every field explained."""

from __future__ import annotations

import argparse
from pathlib import Path

from fedtune.cli.exit_codes import ExitCode
from fedtune.common.config import load_config, preset_path
from fedtune.common.config_reference import preset_descriptions, render_config


def register(sub: argparse._SubParsersAction) -> None:
    presets = sub.add_parser("presets", help="list the built-in configs, each with its description")
    presets.set_defaults(run=run_presets)
    config = sub.add_parser("config", help="inspect a config").add_subparsers(dest="config_command", required=True)
    show = config.add_parser(
        "show", help="print the effective config: every field, its value, default and description",
        description="Prints the config a run would use, as TOML (save it and edit it to start your own), with "
                    "each field's description and, where the value differs, its default.",
    )
    source = show.add_mutually_exclusive_group()
    source.add_argument("--config", type=Path, help="TOML config file")
    source.add_argument("--preset", help="built-in config (default: banking77-minilm)")
    show.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a value")
    show.set_defaults(run=run_show)


def run_presets(args: argparse.Namespace) -> ExitCode:
    rows = preset_descriptions()
    width = max(len(name) for name in rows)
    for name, description in rows.items():
        print(f"{name:{width}s}  {description}")
    return ExitCode.OK


def run_show(args: argparse.Namespace) -> ExitCode:
    print(render_config(load_config(args.config or (preset_path(args.preset) if args.preset else None), args.set)))
    return ExitCode.OK
