"""The runs a server said had ended (``common.wire.RunEnded``), kept on the site's disk.

A site refuses every train request of an ended run, replays included: once a server has said a
run is over (early stopping), neither it nor anyone holding its credentials can go on spending the
site's privacy budget on that run. An unreadable record refuses training too, until the operator
restores or removes the file: unknown is treated as ended.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedtune.common.atomic_files import atomic_write_json


class EndedRunsUnreadable(RuntimeError):
    """The record of ended runs cannot be read; the message says which file and what to do."""


class EndedRuns:
    """``STATE_DIR/ended_runs.json``: ``{run id: {"round": last round, "reason": ...}}``, written atomically."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def _read(self) -> dict[str, Any]:
        if not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            return data
        except (OSError, ValueError) as exc:
            raise EndedRunsUnreadable(
                f"{self.path}: cannot read the record of ended runs ({exc}); this site trains for no run until "
                "its operator restores or removes the file"
            ) from exc

    def why_ended(self, run_id: str) -> str | None:
        """A sentence saying the run ended and why, or None while it goes on."""
        entry = self._read().get(run_id)
        if entry is None:
            return None
        reason = f" ({entry.get('reason')})" if entry.get("reason") else ""
        return f"run {run_id!r} ended after round {entry.get('round')}{reason}: this site trains no more for it"

    def record(self, run_id: str, round_: int, reason: str) -> bool:
        """Remember that ``run_id`` ended after ``round_``; False when it was known (the first word stands)."""
        data = self._read()
        if run_id in data:
            return False
        atomic_write_json(self.path, {**data, run_id: {"round": round_, "reason": reason}})
        return True
