"""The options every command that reads a config shares: ``--config`` or ``--preset``, and ``--set``."""

from __future__ import annotations

import argparse
from pathlib import Path

from fedtune.common.config import FedtuneConfig, load_config, preset_path


def add_config_options(
    parser: argparse.ArgumentParser,
    config_help: str = "TOML config file",
    preset_help: str = "built-in config (see `fedtune presets`); default: banking77-minilm",
    set_help: str = "override a config value",
) -> argparse._MutuallyExclusiveGroup:
    """``--config FILE`` or ``--preset NAME`` (exclusive; returned so a command can add to the group) and ``--set``."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--config", type=Path, help=config_help)
    source.add_argument("--preset", help=preset_help)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help=set_help)
    return source


def config_from_args(args: argparse.Namespace) -> FedtuneConfig:
    """The config the options name (the default preset when neither is given), overrides applied."""
    return load_config(args.config or (preset_path(args.preset) if args.preset else None), args.set)
