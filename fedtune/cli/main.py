"""Parse the command line, run one command, and end every expected failure with one line.

Each command lives in its own module with ``register(subparsers)`` and ``run(args)``.
Expected failures (bad config or data, a model that cannot be fetched, a federation that
cannot go on, Ctrl-C) print ``fedtune: <what to do>`` on stderr and exit with a
documented :class:`ExitCode`; only a bug shows a traceback.
"""

from __future__ import annotations

import argparse
import sys

from fedtune import __version__
from fedtune.cli import config as config_command
from fedtune.cli import data as data_command
from fedtune.cli import deploy as deploy_command
from fedtune.cli import evaluate as evaluate_command
from fedtune.cli import models as models_command
from fedtune.cli import plan as plan_command
from fedtune.cli import simulate as simulate_command
from fedtune.cli import site as site_command
from fedtune.cli import try_model as try_model_command
from fedtune.cli.exit_codes import ExitCode
from fedtune.common.config import ConfigError
from fedtune.common.data.readers import DataError
from fedtune.common.logs import configure_logging
from fedtune.common.models.builtin import ModelFetchError
from fedtune.deploy.app_registry import RegistryError
from fedtune.server.messaging import FederationError
from fedtune.simulation import RunInterrupted

COMMANDS = (
    simulate_command,
    plan_command,
    evaluate_command,
    try_model_command,
    config_command,
    data_command,
    deploy_command,
    site_command,
    models_command,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedtune", description="Federated DP-LoRA fine-tuning with Flower.")
    parser.add_argument("--version", action="version", version=f"fedtune {__version__}")
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="show fedtune's INFO lines and Flower's and Ray's logs on the console",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(sub)
    return parser


def _fail(message: object, code: ExitCode) -> int:
    print(f"fedtune: {message}", file=sys.stderr)
    return int(code)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(verbose=args.verbose)
    try:
        return int(args.run(args))
    except RunInterrupted as exc:
        return _fail(exc, ExitCode.INTERRUPTED)
    except KeyboardInterrupt:
        return _fail("interrupted", ExitCode.INTERRUPTED)
    except (ConfigError, DataError, FileExistsError, FileNotFoundError, RegistryError) as exc:
        return _fail(exc, ExitCode.USAGE)
    except ModelFetchError as exc:
        return _fail(exc, ExitCode.MODEL)
    except FederationError as exc:
        return _fail(exc, ExitCode.FAILED)


if __name__ == "__main__":
    sys.exit(main())
