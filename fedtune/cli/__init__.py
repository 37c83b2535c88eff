"""``fedtune``: the command line, one module a command (see :mod:`fedtune.cli.main`)."""

from fedtune.cli.main import main

__all__ = ["main"]
