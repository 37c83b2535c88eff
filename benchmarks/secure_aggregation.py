"""Round time of secure aggregation (SecAgg+) against plain FedAvg, side by side in one run.

Dummy sites (no model, no data) return a random update of ``--params`` float32 values, so
the figures isolate what aggregation costs: messages through Flower's simulation engine,
masking, Shamir sharing and unmasking. For every federation size one simulation runs the
two kinds of round alternately; the first round of each kind is a warm-up, the rest give
the median. A secure round is what fedtune runs in steady state (``server.secure_rounds``):
the train exchange, whose replies carry the masked vectors and the next round's keys, and
one unmask exchange that also sets the next round up. The first secure round (the warm-up)
is set up with two exchanges of its own. By default the sites are members of a roster, as in
every fedtune simulation: they sign their round keys and check every participant's signature
and the public neighbour graph (issue 15); ``--no-roster`` runs the protocol as it was before.
Prints a table, writes JSON and a PNG.

    python benchmarks/secure_aggregation.py            # 5, 10, 20 sites x 0.1M, 1M values
    python benchmarks/secure_aggregation.py --quick    # 5, 10 sites x 0.1M values
    python benchmarks/secure_aggregation.py --clients 50 --params 1000000
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from pathlib import Path

import numpy as np
from flwr.app import (
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from harness import benchmark_parser, figure, grouped, header, quiet, write_report

from fedtune.client import secure_aggregation
from fedtune.client.app import register_secure_aggregation
from fedtune.client.membership import Membership
from fedtune.common.roster import Roster
from fedtune.common.secure_aggregation.records import (
    SECAGG_NEXT,
    advertisement_from,
    inbox_from,
    masked_from,
    masked_record,
    round_tag,
)
from fedtune.common.site_identity import SiteIdentity
from fedtune.common.wire import MASKED, SECAGG, STATUS, SiteState, SiteStatus, payload_nbytes, to_array_record
from fedtune.server.messaging import send_and_collect, wait_for_nodes
from fedtune.server.secure_rounds import (
    PreparedRound,
    SecureExchange,
    SecureSettings,
    finish_round,
    set_up_round,
)
from fedtune.server.strategies.fedavg import FedAvg
from fedtune.server.strategies.mean_delta import mean_delta

UPDATE_SCALE = 1e-3
CLIP = 0.02


def memberships(n: int) -> dict[int, Membership]:
    """Roster memberships of ``n`` dummy sites, by partition id."""
    identities = {i: SiteIdentity.generate(f"site-{i}") for i in range(n)}
    roster = Roster("bench", {x.member: x.public for x in identities.values()})
    return {i: Membership(roster, x) for i, x in identities.items()}


def client_app(members: dict[int, Membership] | None = None) -> ClientApp:
    app = ClientApp()

    def membership_of(context: Context) -> Membership | None:
        return members[int(context.node_config["partition-id"])] if members else None

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        plan = msg.content["plan"]
        d = int(plan["params"])
        update = np.random.default_rng().normal(0, UPDATE_SCALE, d).astype(np.float32)
        status = SiteStatus(f"site-{context.node_id}", SiteState.TRAINED).to_record()
        metrics = MetricRecord({"num-examples": 100})
        if plan["secure"]:
            tag, inbox = inbox_from(msg.content[SECAGG])
            member = membership_of(context)
            vector = secure_aggregation.mask_update(
                context, tag, inbox, update, f"site-{context.node_id}", membership=member
            )
            keys = secure_aggregation.advertise(context, bytes(plan["next-tag"]), 100, 2, member)
            return Message(
                RecordDict({MASKED: masked_record(vector), SECAGG_NEXT: keys, "metrics": metrics, STATUS: status}),
                reply_to=msg,
            )
        weights = msg.content["adapter"]["w"].numpy()
        adapter = to_array_record({"w": weights + update})
        return Message(RecordDict({"adapter": adapter, "metrics": metrics, STATUS: status}), reply_to=msg)

    register_secure_aggregation(app, lambda context: (100, 2), membership_of=membership_of)
    return app


def train_requests(
    nodes: list[int], weights: np.ndarray, prepared: PreparedRound | None = None, next_tag: bytes = b""
) -> list[Message]:
    plan = ConfigRecord({"params": weights.size, "secure": prepared is not None, "next-tag": next_tag})
    record = to_array_record({"w": weights})
    return [
        Message(
            RecordDict({"adapter": record, "plan": plan, **({SECAGG: prepared.train_record(n)} if prepared else {})}),
            message_type=MessageType.TRAIN,
            dst_node_id=n,
        )
        for n in nodes
    ]


def plain_round(grid: Grid, nodes: list[int], weights: np.ndarray, index: int) -> tuple[np.ndarray, int]:
    """One round in the clear, aggregated as the server does it: the sites' mean delta, applied by FedAvg."""
    replies = send_and_collect(grid, train_requests(nodes, weights), "plain", 600)
    updates = [({"w": r.content["adapter"]["w"].numpy()}, float(r.content["metrics"]["num-examples"])) for r in replies]
    current = {"w": weights}
    return FedAvg().apply(current, mean_delta(updates, current), index)["w"], payload_nbytes(replies[0].content)


def secure_round(
    grid: Grid, nodes: list[int], weights: np.ndarray, index: int, prepared: PreparedRound | None
) -> tuple[np.ndarray, int, PreparedRound | None]:
    """One steady-state secure round (set up first if the previous one did not set it up)."""
    settings = SecureSettings(CLIP, 2, weights.size)
    exchange = SecureExchange(grid, {n: f"site-{n}" for n in nodes}, 600)
    tag, next_tag = round_tag("bench", index), round_tag("bench", index + 1)
    if prepared is None or prepared.tag != tag:
        prepared = set_up_round(exchange, tag, nodes, settings)
    replies = send_and_collect(grid, train_requests(nodes, weights, prepared, next_tag), "secure: train", 600)
    masked = {r.metadata.src_node_id: masked_from(r.content[MASKED]) for r in replies}
    next_keys = {r.metadata.src_node_id: advertisement_from(r.content[SECAGG_NEXT], next_tag) for r in replies}
    result, upcoming = finish_round(exchange, prepared, masked, settings, next_tag, next_keys)
    uploaded = sum(exchange.bytes_received.values()) / len(nodes) + payload_nbytes(replies[0].content)
    return weights + result.mean_update.astype(np.float32), int(uploaded), upcoming


def server_app(sizes: list[int], rounds: int, n: int, results: list[dict]) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        nodes = wait_for_nodes(grid, n, 120)
        for d in sizes:
            weights = np.zeros(d, dtype=np.float32)
            times: dict[str, list[float]] = {"plain": [], "secure": []}
            upload: dict[str, int] = {}
            prepared = None
            for r in range(rounds):
                order = ("plain", "secure") if r % 2 == 0 else ("secure", "plain")
                for kind in order:
                    start = time.perf_counter()
                    if kind == "plain":
                        weights, upload[kind] = plain_round(grid, nodes, weights, r)
                    else:
                        weights, upload[kind], prepared = secure_round(grid, nodes, weights, r, prepared)
                    times[kind].append(time.perf_counter() - start)
            plain, secure = statistics.median(times["plain"][1:]), statistics.median(times["secure"][1:])
            row = {
                "clients": n,
                "params": d,
                "plain_s": plain,
                "secure_s": secure,
                "ratio": secure / plain,
                "plain_upload_bytes": upload["plain"],
                "secure_upload_bytes": upload["secure"],
                "secure_bits_per_value": 8 * upload["secure"] / d,
                "rounds_timed": rounds - 1,
                "plain_rounds_s": times["plain"][1:],
                "secure_rounds_s": times["secure"][1:],
            }
            results.append(row)
            print(
                f"  {n:3d} sites x {d / 1e6:4.1f}M: plain {plain:6.3f}s  secure {secure:6.3f}s  "
                f"ratio {secure / plain:4.2f}x  upload {upload['plain'] / 1e6:5.2f} MB -> "
                f"{upload['secure'] / 1e6:5.2f} MB",
                flush=True,
            )

    return app


def plot(rows: list[dict], path: Path) -> None:
    with figure(path, figsize=(6, 3.5)) as (_, ax):
        for d, sel in sorted(grouped(rows, "params").items()):
            ax.plot([r["clients"] for r in sel], [r["ratio"] for r in sel], marker="o", label=f"{d / 1e6:g}M values")
        ax.axhline(1.5, color="grey", ls="--", lw=0.8)
        ax.set_xlabel("sites")
        ax.set_ylabel("secure / plain round time")
        ax.set_title("SecAgg+ overhead (median of timed rounds)")
        ax.legend()


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__, quick="5 and 10 sites, 0.1M values, 3 rounds")
    parser.add_argument("--clients", type=int, nargs="+", default=[5, 10, 20])
    parser.add_argument("--params", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--rounds", type=int, default=12, help="rounds of each kind per size (the first is warm-up)")
    parser.add_argument(
        "--no-roster", action="store_true", help="the protocol without roster signatures (before issue 15)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.clients, args.params, args.rounds = [5, 10], [100_000], 3
    from flwr.simulation import run_simulation

    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    quiet({"fedtune": logging.ERROR})
    rows: list[dict] = []
    started = time.time()
    print(f"secure vs plain round time, {os.cpu_count()} CPUs, {args.rounds - 1} timed rounds of each kind")
    for n in args.clients:
        run_simulation(
            server_app=server_app(args.params, args.rounds, n, rows),
            client_app=client_app(None if args.no_roster else memberships(n)),
            num_supernodes=n,
            backend_config={
                "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                "init_args": {"include_dashboard": False, "logging_level": logging.ERROR},
            },
        )
    wall_s = time.time() - started
    report = {
        **header("secure_aggregation", argv),
        "roster": not args.no_roster,
        "wall_s": wall_s,
        "rows": rows,
    }
    write_report(args.out, "secure_aggregation", report, lambda path: plot(rows, path), wall_s)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
