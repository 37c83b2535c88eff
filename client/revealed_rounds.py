"""The secure rounds whose sum a site has helped reveal, kept on disk beside its ledger.

A server that crashes after unmasking round r, but before its checkpoint of round r is
written, resumes by running round r again, and every site replays the very update it sent
the first time (no new privacy cost, see ``Site._replay``). If the second sum were revealed
over other survivors than the first (one site did not answer this time), the difference of
the two sums would be that site's update: exactly what secure aggregation promises the
server never learns. So a site helps reveal each round of a run at most once, across
restarts of the server and of the site. A replayed round whose sum was revealed then fails at
its unmask step, the global adapter stays as it was, and the next round proceeds. When the
server stopped partway through the unmask step, the sites that had not answered yet may still
hold enough shares to unmask the replay (their answers are disjoint from the first ones, and
each reconstruction takes more than half the shares, so with the same sites set up only one
attempt can succeed); the server's record says so (``server.secure_rounds.completed_round``).
"""

from __future__ import annotations

import json
from pathlib import Path

from fedtune.common.atomic_files import atomic_write_json
from fedtune.common.secure_aggregation.protocol import ALREADY_REVEALED, ProtocolViolation


class AlreadyRevealed(ProtocolViolation):
    """This site already revealed its shares for the round; a second sum could expose one update."""


class RevealedRounds:
    """Round tags (``round_tag(run_id, round)``) this site has released unmasking shares for."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def tags(self) -> set[str]:
        if not self.path.exists():
            return set()
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            return {str(t) for t in data["revealed"]}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # Unreadable means unknown: refuse to unmask rather than risk a second sum.
            raise ProtocolViolation(
                f"{self.path}: cannot read the record of rounds this site unmasked ({exc}); "
                "it refuses to unmask until the file is restored or removed by its operator"
            ) from exc

    def claim(self, tag: bytes) -> None:
        """Record, before any share leaves, that this site reveals round ``tag``; refuse a second time."""
        revealed = self.tags()
        if tag.hex() in revealed:
            raise AlreadyRevealed(
                f"{ALREADY_REVEALED} for {tag!r} (a resumed server replaying the "
                "round); a second sum of the same updates over other sites could reveal one site's update, so "
                "it refuses"
            )
        atomic_write_json(self.path, {"revealed": sorted(revealed | {tag.hex()})})


__all__ = ["AlreadyRevealed", "RevealedRounds"]
