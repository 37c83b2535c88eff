"""The CPU time Flower's simulation engine spends polling for messages, as federations grow (scale.py).

Kept apart from the script because it times Flower's own code, not fedtune's: the tests
check that it runs Flower's scan as often as the engine does.
"""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace


def engine_polling_cost(sizes: list[int], sweeps: int = 20) -> list[dict]:
    """CPU seconds Flower's simulation engine spends finding each node's messages, per second of a round.

    Every 0.1 s ``flwr.server.superlink.fleet.vce.vce_api.add_messages_to_queue`` asks
    ``InMemoryLinkState.get_message_ins`` for each node's next message, and each call checks
    every message in the store: with one request in flight per site, O(sites^2) work ten
    times a second, in the driver, however long the sites take to train. Timed here on
    Flower's own ``get_message_ins`` over a store of one delivered request per site (the state
    while sites train), with the federation check stubbed to a set copy.
    """
    from flwr.common import now
    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState

    out = []
    for n in sizes:
        state = InMemoryLinkState.__new__(InMemoryLinkState)  # only the fields get_message_ins reads
        state.lock = threading.RLock()
        state._federation_manager = SimpleNamespace(filter_nodes=lambda nodes, _federation: set(nodes))
        state.run_ids = {1: SimpleNamespace(run=SimpleNamespace(federation_id="fedtune"))}
        state.delete_messages = lambda _ids: None
        created = now().timestamp()
        state.message_ins_store = {
            f"m{i}": SimpleNamespace(
                metadata=SimpleNamespace(
                    created_at=created, ttl=1e9, src_node_id=0, dst_node_id=i + 1, run_id=1, delivered_at="yes"
                )
            )
            for i in range(n)
        }
        start = time.process_time()
        for _ in range(sweeps):
            for node in range(1, n + 1):
                state.get_message_ins(node_id=node, limit=1)
        sweep_s = (time.process_time() - start) / sweeps
        out.append({"clients": n, "sweep_cpu_s": sweep_s, "cpu_s_per_round_second": 10 * sweep_s})
    return out
