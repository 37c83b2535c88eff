"""Sites' real SecAgg+ handlers served in this process, for tests of the protocol's Flower glue
without a simulation: the server's ``server.secure_rounds`` talks to real ClientApps."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from fedtune.client import secure_aggregation
from fedtune.client.app import register_secure_aggregation
from fedtune.client.revealed_rounds import MaskedRounds, RevealedRounds
from fedtune.common.secure_aggregation.protocol import SecureSum
from fedtune.common.wire import SECAGG, SiteState, SiteStatus
from fedtune.server.secure_rounds import SecureExchange, SecureSettings, finish_round, set_up_round

NODES = [11, 12, 13]
EXAMPLES = {11: 100, 12: 250, 13: 400, 14: 300}  # node 14 only where a test asks for it
DIM, CLIP = 500, 0.05
SETTINGS = SecureSettings(CLIP, 2, DIM)


def random_updates(seed: int = 0, nodes: Sequence[int] = NODES) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.uniform(-CLIP / 4, CLIP / 4, DIM).astype(np.float32) for n in nodes}


class Sites:
    """Three sites (or ``nodes``); ``restart`` loses what they hold in memory (context.state), not what is on disk.

    ``keep_record``: each site records the rounds it unmasked (``secagg_revealed.json``);
    ``mask_once``: each site records the rounds it masked (``secagg_masked.json``), and
    :func:`secure_round` hands that record to ``mask_update`` (``masked_for``).

    Messages are built outside a Flower runtime, so a test using this needs TaskIdentity set
    (the ``server_identity`` fixture of tests/conftest.py).
    """

    def __init__(
        self,
        state_dir: Path,
        keep_record: bool = True,
        mods: Sequence[Mod] = (),
        nodes: Sequence[int] = NODES,
        mask_once: bool = True,
    ):
        self.nodes = list(nodes)
        self.revealed = {n: RevealedRounds(Path(state_dir) / f"site-{n}" / "secagg_revealed.json") for n in self.nodes}
        self.masked = {n: MaskedRounds(Path(state_dir) / f"site-{n}" / "secagg_masked.json") for n in self.nodes}
        self.mask_once = mask_once
        self.app = ClientApp(mods=list(mods))
        register_secure_aggregation(
            self.app,
            lambda context: (EXAMPLES[context.node_id], 2),
            (lambda context: self.revealed[context.node_id]) if keep_record else None,
        )
        self.restart()

    def restart(self) -> None:
        self.contexts = {
            n: Context(run_id=1, node_id=n, node_config={"partition-id": n}, state=RecordDict(), run_config={})
            for n in self.nodes
        }

    def masked_for(self, node: int) -> MaskedRounds | None:
        """The site's record of the rounds it masked, as its train handler uses it (None: no record)."""
        return self.masked[node] if self.mask_once else None

    def deliver(self, _grid, requests: list[Message], _step: str, _timeout: float) -> list[Message]:
        replies = []
        for request in requests:
            request.metadata.__dict__["_message_id"] = request.object_id  # as the SuperLink posts it
            replies.append(self.app(request, self.contexts[request.metadata.dst_node_id]))
        return replies

    def exchange(self) -> SecureExchange:
        return SecureExchange(None, {n: f"site-{n}" for n in self.nodes}, 60.0, send=self.deliver)


def secure_round(
    sites: Sites,
    tag: bytes,
    updates: dict[int, np.ndarray],
    arriving: Sequence[int],
    exchange: SecureExchange | None = None,
) -> SecureSum:
    """Set round ``tag`` up with every site; only ``arriving`` sites' masked vectors reach the server."""
    exchange = exchange or sites.exchange()
    prepared = set_up_round(exchange, tag, sites.nodes, SETTINGS)
    masked = {
        n: secure_aggregation.mask_update(
            sites.contexts[n], tag, prepared.inboxes[n], updates[n], f"site-{n}", sites.masked_for(n)
        )
        for n in arriving
        if n in prepared.inboxes
    }
    result, _ = finish_round(exchange, prepared, masked, SETTINGS)
    return result


def weighted_mean(updates: dict[int, np.ndarray], nodes: Sequence[int]) -> np.ndarray:
    total = sum(EXAMPLES[n] for n in nodes)
    return sum(EXAMPLES[n] * updates[n].astype(np.float64) for n in nodes) / total


def secagg_message(record: ConfigRecord, kind: str, node: int) -> Message:
    """A secure-aggregation request to ``node``, as the server sends it."""
    return Message(RecordDict({SECAGG: record}), message_type=kind, dst_node_id=node)


def status_of(reply: Message) -> SiteStatus:
    return SiteStatus.from_content(reply.content)


def ok_content(reply: Message) -> RecordDict:
    """The reply's content, asserting the site answered ok (its reason otherwise)."""
    status = status_of(reply)
    assert status.state is SiteState.OK, status.reason
    return reply.content
