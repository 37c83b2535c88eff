"""``fedtune config show`` and ``fedtune presets``: the effective config, every field explained."""

from __future__ import annotations

import argparse

from fedtune.cli.config_options import add_config_options, config_from_args
from fedtune.cli.exit_codes import ExitCode
from fedtune.common.config_reference import preset_descriptions, render_config


def register(sub: argparse._SubParsersAction) -> None:
    presets = sub.add_parser("presets", help="list the built-in configs, each with its description")
    presets.set_defaults(run=run_presets)
    config = sub.add_parser("config", help="inspect a config").add_subparsers(dest="config_command", required=True)
    show = config.add_parser(
        "show",
        help="print the effective config: every field, its value, default and description",
        description="Prints the config a run would use, as TOML (save it and edit it to start your own), with "
        "each field's description and, where the value differs, its default.",
    )
    add_config_options(show)
    show.set_defaults(run=run_show)


def run_presets(args: argparse.Namespace) -> ExitCode:
    rows = preset_descriptions()
    width = max(len(name) for name in rows)
    for name, description in rows.items():
        print(f"{name:{width}s}  {description}")
    return ExitCode.OK


def run_show(args: argparse.Namespace) -> ExitCode:
    print(render_config(config_from_args(args)))
    return ExitCode.OK
