"""Run a real simulation while recording every message the server sends and every reply it gets."""

from __future__ import annotations

from pathlib import Path

from fedtune.common.config import FedtuneConfig


def simulate_recording_messages(cfg: FedtuneConfig, **simulate_args) -> tuple[Path, list[tuple[list, list]]]:
    """The run directory, and ``(requests, replies)`` for each fan-out of the round loop
    (secure-aggregation steps included)."""
    import fedtune.server.federation as federation
    from fedtune.simulation import simulate

    seen: list[tuple[list, list]] = []
    real = federation.send_and_collect

    def spy(grid, messages, desc, timeout_s):
        messages = list(messages)
        replies = real(grid, messages, desc, timeout_s)
        seen.append((messages, replies))
        return replies

    federation.send_and_collect = spy
    try:
        run_dir = simulate(cfg, **simulate_args)
    finally:
        federation.send_and_collect = real
    return run_dir, seen
