"""Send requests to sites through Flower's Grid and collect replies, with a progress bar."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from flwr.app import Message
from flwr.serverapp import Grid
from tqdm.auto import tqdm


class FederationError(RuntimeError):
    """The federation cannot go on (too few sites, timeouts); the message says what to check."""


#: Which of the connected nodes count as available in a round; a simulation hides its late joiners with one.
Availability = Callable[[list[int], int], list[int]]


def every_connected_node(nodes: list[int], round_: int) -> list[int]:
    """A deployment's availability: every SuperNode connected to the SuperLink."""
    return nodes


def wait_for_nodes(
    grid: Grid, count: int, timeout_s: float, available: Availability = every_connected_node, round_: int = 0
) -> list[int]:
    """Block until at least ``count`` SuperNodes are connected (and available in ``round_``); all of them, sorted."""
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = sorted(available(sorted(grid.get_node_ids()), round_))
        if len(nodes) >= count:
            return nodes
        if time.monotonic() > deadline:
            raise FederationError(
                f"only {len(nodes)} of the {count} required sites connected within {timeout_s:.0f}s; "
                "check that the SuperNodes are running and can reach the SuperLink"
            )
        time.sleep(0.2)


def by_node(requests: Iterable[Message], replies: Iterable[Message]) -> list[tuple[int, Message]]:
    """Each reply with the node its request went to.

    A reply is matched to its request, not taken at its word for its sender: the error the
    SuperLink writes for a node that went offline comes from the SuperLink, not that node.
    """
    destination = {m.metadata.message_id: m.metadata.dst_node_id for m in requests}
    return [(destination[r.metadata.reply_to_message_id], r) for r in replies]


def send_and_collect(grid: Grid, messages: Iterable[Message], desc: str, timeout_s: float) -> list[Message]:
    """Push all messages, then pull replies as they arrive (each reply is pulled exactly once).

    The pause between polls is a tenth of the time waited so far (5 ms to 200 ms), so a
    reply is picked up at most about 10% late: quick secure-aggregation steps are not held
    up, and long training rounds do not spin.
    """
    pending = set(grid.push_messages(list(messages)))
    replies: list[Message] = []
    start = time.monotonic()
    deadline = start + timeout_s
    with tqdm(total=len(pending), desc=desc, unit="site", leave=False, dynamic_ncols=True) as bar:
        while pending and time.monotonic() < deadline:
            for reply in grid.pull_messages(list(pending)):
                pending.discard(reply.metadata.reply_to_message_id)
                replies.append(reply)
                bar.update(1)
            if pending:
                time.sleep(min(0.2, max(0.005, 0.1 * (time.monotonic() - start))))
    return replies
