"""fedtune: federated, differentially private LoRA fine-tuning with Flower, Opacus and peft.

The package is one namespace over the repository's folders (see ``pyproject.toml``):

- ``fedtune.common``: what server and sites share (config, data, models, privacy maths,
  secure aggregation, the wire contract); it imports no other part of fedtune;
- ``fedtune.server``: the operator's aggregation side; ``fedtune.client``: a site's side;
  neither imports the other;
- ``fedtune.deploy``: the files a real federation is set up with; it imports only common;
- ``fedtune.cli`` and ``fedtune.simulation``: the top floor that wires them together.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fedtune")
except PackageNotFoundError:  # pragma: no cover - running from a tree that was never installed
    __version__ = "0+unknown"
