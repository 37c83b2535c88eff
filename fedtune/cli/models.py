"""``fedtune fetch-model``: fetch and cache a built-in model now (e.g. before going offline)."""

from __future__ import annotations

import argparse

from fedtune.cli.exit_codes import ExitCode
from fedtune.common.models.builtin import BUILTIN_WEIGHTS


def register(sub: argparse._SubParsersAction) -> None:
    fetch = sub.add_parser("fetch-model", help=f"fetch and cache a built-in model now ({', '.join(BUILTIN_WEIGHTS)})")
    fetch.add_argument("name")
    fetch.set_defaults(run=run)


def run(args: argparse.Namespace) -> ExitCode:
    from fedtune.common.models.builtin import resolve_builtin

    print(resolve_builtin(args.name))
    return ExitCode.OK
