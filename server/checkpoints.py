"""Per-round checkpoints of the global adapter, in peft's own format, written atomically.

``round-0003/`` holds ``adapter_model.safetensors`` and ``adapter_config.json`` (so
``PeftModel.from_pretrained`` loads it), ``round.json`` and ``strategy.npz`` (the server
strategy's state, e.g. optimiser moments). A round directory appears
only once complete (staged, then renamed), so the newest one is always safe to resume from.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedtune.common.atomic_files import atomic_write_bytes, atomic_write_json, write_dir_atomically

_ROUND_DIR = re.compile(r"^round-(\d{4})$")
STRATEGY_FILE = "strategy.npz"


@dataclass(frozen=True)
class Checkpoint:
    round: int
    directory: Path
    info: dict[str, Any]

    def strategy_state(self) -> dict[str, np.ndarray]:
        """The strategy state saved with this round (empty for checkpoints written before strategies kept one)."""
        path = self.directory / STRATEGY_FILE
        if not path.exists():
            return {}
        with np.load(path, allow_pickle=False) as saved:
            return {k: saved[k] for k in saved.files}


class CheckpointStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path_for(self, round_: int) -> Path:
        return self.root / f"round-{round_:04d}"

    def save(
        self, round_: int, peft_model: Any, info: dict[str, Any], strategy_state: Mapping[str, np.ndarray] | None = None
    ) -> Path:
        def build(staging: Path) -> None:
            peft_model.save_pretrained(staging)
            buffer = io.BytesIO()
            # allow_pickle (numpy's default) is named so that no state key can be taken for it.
            np.savez(buffer, allow_pickle=True, **dict(strategy_state or {}))
            atomic_write_bytes(staging / STRATEGY_FILE, buffer.getvalue())
            atomic_write_json(staging / "round.json", {"round": round_, **info})

        return write_dir_atomically(self.path_for(round_), build)

    def rounds(self) -> list[int]:
        if not self.root.exists():
            return []
        found = []
        for child in self.root.iterdir():
            match = _ROUND_DIR.match(child.name)
            if match and (child / "round.json").exists() and (child / "adapter_model.safetensors").exists():
                found.append(int(match.group(1)))
        return sorted(found)

    def latest(self) -> Checkpoint | None:
        rounds = self.rounds()
        if not rounds:
            return None
        directory = self.path_for(rounds[-1])
        return Checkpoint(rounds[-1], directory, json.loads((directory / "round.json").read_text()))
