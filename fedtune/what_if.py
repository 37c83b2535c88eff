"""What-ifs of a simulated federation: sites that connect late, sites whose replies come late.

Flower's simulation engine starts every SuperNode at once and answers as fast as the
machine allows. A real federation has sites that join a running federation and sites on
slow hardware; these wrappers show the server both, so that sampling, deadlines and
dropouts (and secure aggregation's handling of them) run as they would for real. Which
sites are affected is fixed by node order (the engine's node ids are random; the run's
records name the sites once they reply): the ``late`` highest node ids join late, the
``slow`` lowest answer late.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from fedtune.server.messaging import Availability


def late_joiners(count: int, join_round: int) -> Availability:
    """An availability under which the ``count`` highest node ids connect only as ``join_round`` starts."""

    def available(nodes: list[int], round_: int) -> list[int]:
        if count == 0 or round_ >= join_round:
            return nodes
        return sorted(nodes)[:-count]

    return available


class SlowRepliesGrid(Grid):
    """Flower's Grid, except that training replies from the ``count`` lowest node ids arrive ``delay_s`` late.

    The site trains (and spends budget) as usual; only its reply's delivery is held back, as a
    site on slow hardware would deliver it. Past the round's deadline the server counts it as a
    dropout and never pulls it.
    """

    def __init__(self, grid: Grid, count: int, delay_s: float) -> None:
        self._grid, self._count, self._delay_s = grid, count, delay_s
        self._held: dict[str, tuple[float, Message]] = {}  # reply-to message id -> (due, reply)

    def slow_nodes(self) -> set[int]:
        return set(sorted(self._grid.get_node_ids())[: self._count])

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        ids = list(message_ids)
        slow, now = self.slow_nodes(), time.monotonic()
        out: list[Message] = []
        # A held reply has been pulled from Flower already; asking for it again would get an error.
        for reply in self._grid.pull_messages([i for i in ids if i not in self._held]):
            if reply.metadata.src_node_id in slow and reply.metadata.message_type == MessageType.TRAIN:
                self._held[reply.metadata.reply_to_message_id] = (now + self._delay_s, reply)
            else:
                out.append(reply)
        for request_id in [i for i in ids if i in self._held and self._held[i][0] <= now]:
            out.append(self._held.pop(request_id)[1])
        return out

    # Everything else is Flower's.
    @property
    def run(self) -> Run:
        return self._grid.run

    def set_run(self, run: Run) -> None:
        self._grid.set_run(run)

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self._grid.send_and_receive(messages, timeout=timeout)
