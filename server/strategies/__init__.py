"""Server strategies, one module each; ``federation.strategy`` names one.

A new strategy is one new module in this folder defining a :class:`Strategy` subclass
with a ``name``, plus its tests: it is found here by that name, without a list to edit, and
built with :meth:`Strategy.from_config`, which reads its hyperparameters from the config.
A shared base that sets no ``name`` of its own (``fedopt.FedOpt``) is not selectable.
"""

from __future__ import annotations

import importlib
import pkgutil

from fedtune.common.config import ConfigError, FederationConfig
from fedtune.server.strategies.base import Strategy


def available_strategies() -> dict[str, type[Strategy]]:
    """Every Strategy subclass defined in a module of this package, by name."""
    found: dict[str, type[Strategy]] = {}
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        for value in vars(module).values():
            if (
                isinstance(value, type)
                and issubclass(value, Strategy)
                and value is not Strategy
                and value.__module__ == module.__name__
                and "name" in vars(value)
            ):
                # Annotated: where mypy cannot resolve fedtune.* (the editable install maps it), Strategy is
                # Any to it and ``value`` stays a bare ``type``.
                strategy: type[Strategy] = value
                found[strategy.name] = strategy
    return found


def build_strategy(federation: FederationConfig) -> Strategy:
    """The configured strategy, or a ConfigError naming the known ones."""
    known = available_strategies()
    if federation.strategy not in known:
        raise ConfigError(
            f"federation.strategy = {federation.strategy!r} is not a known strategy; known: {', '.join(sorted(known))}"
        )
    return known[federation.strategy].from_config(federation)


__all__ = ["Strategy", "available_strategies", "build_strategy"]
