"""Bytes per site per round: full fine-tuning, LoRA, FFA-LoRA, and FFA-LoRA under SecAgg+.

Nothing is trained. Each preset's model is built, and one round's messages are the ones
fedtune builds (``server.federation``, ``client.app``), with random values where they carry
an update (so Flower cannot deduplicate equal chunks, as it would for a fresh, all-zero B).
A fedtune round is a train request and its reply, then an evaluate request (carrying the
new global adapter) and its reply. Under secure aggregation a steady round (the second of
a run, set up during the first) is: the train request with the shares addressed to the
site, its reply with the masked vector and the next round's keys, then one unmask exchange
that also carries the next round's set-up. The first round's own set-up (advertise, share
keys) is reported apart. All of it runs for real, in one process, through the sites'
Flower handlers (``client.app.register_secure_aggregation``) and the server's
``server.secure_rounds``, with 10 and 100 sites, and the unmasked mean is checked against
the sites' true mean.

Every message is measured twice: as the values it carries (4 bytes each as float32) and as
Flower 1.41 transfers it, i.e. every nested object (message, record dict, records, arrays,
5 MiB array chunks) deflated and counted once per distinct object id, which is what a
SuperNode pushes and pulls (gRPC, HTTP/2 and TLS framing not included). Full fine-tuning
is not something fedtune does: it is priced as the same messages carrying every weight.

    python benchmarks/communication.py            # MiniLM and SmolLM2-135M presets; SecAgg+ with 10 and 100 sites
    python benchmarks/communication.py --quick    # MiniLM only, 10 sites
    python benchmarks/communication.py --sites 10 50 200
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.task_identity import TaskIdentity
from harness import benchmark_parser, figure, grouped, header, quiet, write_report

from fedtune.client import secure_aggregation
from fedtune.client.app import register_secure_aggregation
from fedtune.common.config import FedtuneConfig, load_config, preset_path
from fedtune.common.secure_aggregation.neighbours import neighbour_count
from fedtune.common.secure_aggregation.quantisation import auto_clip_range
from fedtune.common.secure_aggregation.records import SECAGG_NEXT, advertisement_from, masked_record, round_tag
from fedtune.common.wire import (
    ADAPTER,
    MASKED,
    METRICS,
    PLAN,
    SECAGG,
    STATUS,
    EvaluatePlan,
    EvaluationReport,
    SiteState,
    SiteStatus,
    TrainReport,
    payload_nbytes,
    to_array_record,
)
from fedtune.server.federation import training_plan
from fedtune.server.secure_rounds import PreparedRound, SecureExchange, SecureSettings, finish_round, set_up_round

RUN_ID = 1
RUN_NAME = "communication-benchmark"
FIRST_NODE = 1000
MODELS = {"minilm": "banking77-minilm", "smollm2": "medquad-smollm2"}


@dataclass(frozen=True)
class Exchange:
    """One request from the server to a site and the site's reply."""

    step: str
    down_bytes: int
    up_bytes: int
    down_values: int
    up_values: int


def message_wire_bytes(message: Message) -> int:
    """Bytes of a message as Flower moves it: each nested object deflated, once per distinct object id."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())


def values_in(content: RecordDict) -> int:
    """Number of array values (tensor elements) in a message's content."""
    return sum(int(np.prod(a.shape)) for r in content.array_records.values() for a in r.values())


def exchange(step: str, request: Message, reply: Message) -> Exchange:
    sizes = [
        message_wire_bytes(request),
        message_wire_bytes(reply),
        values_in(request.content),
        values_in(reply.content),
    ]
    return Exchange(step, *sizes)


def random_like(state: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random float32 tensors of the same names and shapes: a trained state's size, no repeated chunks."""
    return {k: rng.normal(0.0, 0.02, np.shape(v)).astype(np.float32) for k, v in state.items()}


def full_weights(model: Any) -> dict[str, np.ndarray]:
    """Every weight of a base model as float32 (tied weights once): what full fine-tuning would send."""
    return {name: p.detach().float().cpu().numpy() for name, p in model.named_parameters()}


def posted(message: Message) -> Message:
    """The message with the id the SuperLink gives it (its object id), which replies then refer to."""
    message.metadata.__dict__["_message_id"] = message.object_id
    return message


def status(site_id: str, state: SiteState) -> ConfigRecord:
    return SiteStatus(site_id, state).to_record()


def train_request(
    cfg: FedtuneConfig,
    node: int,
    state: dict[str, np.ndarray],
    fingerprint: str,
    prepared: PreparedRound | None = None,
    round_: int = 1,
) -> Message:
    plan = training_plan(cfg, RUN_NAME, round_, fingerprint)
    content = RecordDict({ADAPTER: to_array_record(state), PLAN: plan})
    if prepared is not None:
        content[SECAGG] = prepared.train_record(node)
    return posted(Message(content, message_type=MessageType.TRAIN, dst_node_id=node))


def evaluate_exchange(node: int, state: dict[str, np.ndarray], fingerprint: str, metrics: dict[str, float]) -> Exchange:
    """As ``FederationServer.evaluate_round`` asks and a site that shares its metrics answers."""
    plan = EvaluatePlan(round=1, a_fingerprint=fingerprint).to_record()
    content = RecordDict({ADAPTER: to_array_record(state), PLAN: plan})
    request = posted(Message(content, message_type=MessageType.EVALUATE, dst_node_id=node))
    answer = RecordDict(
        {METRICS: EvaluationReport(metrics).to_record(), STATUS: status(f"site-{node}", SiteState.EVALUATED)}
    )
    return exchange("evaluate", request, Message(answer, reply_to=request))


def plain_round(
    cfg: FedtuneConfig,
    down: dict[str, np.ndarray],
    up: dict[str, np.ndarray],
    fingerprint: str,
    train_metrics: TrainReport,
    eval_metrics: dict[str, float],
) -> list[Exchange]:
    """One site's round without secure aggregation: the update travels as float32 tensors."""
    request = train_request(cfg, FIRST_NODE, down, fingerprint)
    reply = Message(
        RecordDict(
            {
                ADAPTER: to_array_record(up),
                METRICS: train_metrics.to_record(),
                STATUS: status(f"site-{FIRST_NODE}", SiteState.TRAINED),
            }
        ),
        reply_to=request,
    )
    return [exchange("train", request, reply), evaluate_exchange(FIRST_NODE, down, fingerprint, eval_metrics)]


@dataclass
class SecureRound:
    """Every site's exchanges in a steady SecAgg+ round, the first round's set-up, and how far
    the unmasked mean is from the truth."""

    exchanges: dict[int, list[Exchange]]
    setup: dict[int, list[Exchange]]
    neighbours: int
    relative_error: float


def secure_round(
    cfg: FedtuneConfig,
    down: dict[str, np.ndarray],
    fingerprint: str,
    num_sites: int,
    train_metrics: TrainReport,
    eval_metrics: dict[str, float],
    rng: np.random.Generator,
) -> SecureRound:
    """Two real SecAgg+ rounds between ``num_sites`` sites' Flower handlers and the server's
    protocol code; the second (steady) one is measured."""
    nodes = list(range(FIRST_NODE, FIRST_NODE + num_sites))
    contexts = {
        n: Context(run_id=RUN_ID, node_id=n, node_config={"partition-id": n}, state=RecordDict(), run_config={})
        for n in nodes
    }
    examples = {n: 100 + i for i, n in enumerate(nodes)}
    app = ClientApp()
    register_secure_aggregation(app, lambda context: (examples[context.node_id], 2))
    d = sum(int(np.size(v)) for v in down.values())
    t, p, sa = cfg.train, cfg.privacy, cfg.secure_aggregation
    clip = sa.clip_range or auto_clip_range(t.optimizer, t.lr, t.local_steps, p.max_grad_norm)
    settings = SecureSettings(clip, max(2, cfg.federation.min_clients), d, sa.neighbours, sa.threshold_fraction)
    updates = {n: rng.uniform(-clip / 2, clip / 2, d).astype(np.float32) for n in nodes}
    setup: dict[int, list[Exchange]] = {n: [] for n in nodes}
    out: dict[int, list[Exchange]] = {n: [] for n in nodes}
    record = setup

    def deliver(_grid: Any, requests: list[Message], step: str, _timeout: float) -> list[Message]:
        replies = []
        for request in requests:
            node = posted(request).metadata.dst_node_id
            reply = app(request, contexts[node])
            record[node].append(exchange(step.removeprefix("secagg "), request, reply))
            replies.append(reply)
        return replies

    def train_and_finish(round_: int, prepared: PreparedRound) -> tuple[Any, PreparedRound | None]:
        next_tag = round_tag(RUN_NAME, round_ + 1)
        masked, next_keys = {}, {}
        for n in nodes:
            request = train_request(cfg, n, down, fingerprint, prepared, round_)
            masked[n] = secure_aggregation.mask_update(
                contexts[n], prepared.tag, prepared.inboxes[n], updates[n], f"site-{n}"
            )
            keys = secure_aggregation.advertise(contexts[n], next_tag, examples[n], 2)
            next_keys[n] = advertisement_from(keys, next_tag)
            reply = Message(
                RecordDict(
                    {
                        MASKED: masked_record(masked[n]),
                        SECAGG_NEXT: keys,
                        METRICS: replace(train_metrics, num_examples=examples[n]).to_record(),
                        STATUS: status(f"site-{n}", SiteState.TRAINED),
                    }
                ),
                reply_to=request,
            )
            record[n].append(exchange("train", request, reply))
        return finish_round(exchange_, prepared, masked, settings, next_tag, next_keys)

    exchange_ = SecureExchange(None, {n: f"site-{n}" for n in nodes}, 60.0, send=deliver)
    prepared = set_up_round(exchange_, round_tag(RUN_NAME, 1), nodes, settings)
    _, prepared = train_and_finish(1, prepared)  # round 1's own exchanges are not counted
    setup = {n: ex[:2] for n, ex in setup.items()}
    record = out
    result, _ = train_and_finish(2, prepared)
    total = sum(examples.values())
    truth = sum(examples[n] * updates[n].astype(np.float64) for n in nodes) / total
    error = float(np.sqrt(np.mean((result.mean_update - truth) ** 2)) / np.sqrt(np.mean(truth**2)))
    for n in nodes:
        out[n].append(evaluate_exchange(n, down, fingerprint, eval_metrics))
    return SecureRound(out, setup, neighbour_count(num_sites, sa.neighbours), error)


def round_row(model_key: str, scheme: str, exchanges: list[Exchange], **extra: Any) -> dict[str, Any]:
    up_values = sum(e.up_values for e in exchanges)
    return {
        "model": model_key,
        "scheme": scheme,
        "up_values": up_values,
        "up_float32_bytes": 4 * up_values,
        "down_values": sum(e.down_values for e in exchanges),
        "upload_bytes": sum(e.up_bytes for e in exchanges),
        "download_bytes": sum(e.down_bytes for e in exchanges),
        "train_upload_bytes": sum(e.up_bytes for e in exchanges if e.step != "evaluate"),
        "train_download_bytes": sum(e.down_bytes for e in exchanges if e.step != "evaluate"),
        "exchanges": [asdict(e) for e in exchanges],
        **extra,
    }


def evaluation_metrics(cfg: FedtuneConfig, model: Any, tokenizer: Any) -> dict[str, float]:
    """The metric names and types a site really returns, from two records of the preset's data."""
    from fedtune.common.data.federation_data import load_examples, load_label_set

    labels = load_label_set(cfg.data) if cfg.task.classifies else []
    data = cfg.task.head.encode(load_examples(cfg.data.path, cfg)[:2], tokenizer, labels, cfg.model.max_length)
    return cfg.task.head.evaluate(model, data, 2)


def measure_model(model_key: str, sites: list[int], seed: int) -> list[dict[str, Any]]:
    from fedtune.common.models.loading import load_base_model, model_spec
    from fedtune.common.models.lora import adapter_state, build_adapted_model, frozen_a_fingerprint

    cfg = load_config(preset_path(MODELS[model_key]))
    plain = load_config(preset_path(MODELS[model_key]), ["secure_aggregation.enabled=false"])
    plain_lora = load_config(preset_path(MODELS[model_key]), ["secure_aggregation.enabled=false", "lora.ffa=false"])
    spec = model_spec(cfg)
    model, tokenizer = build_adapted_model(spec, cfg.lora)
    fingerprint = frozen_a_fingerprint(model)
    rng = np.random.default_rng(seed)
    train_metrics = TrainReport(
        num_examples=1000, steps=cfg.train.local_steps, epsilon_spent=2.0, noise_multiplier=1.1, sample_rate=0.064
    )
    eval_metrics = evaluation_metrics(cfg, model, tokenizer)
    rows = []
    full = full_weights(load_base_model(spec, pad_token_id=tokenizer.pad_token_id))
    for scheme, run_cfg, down, fp in (
        ("full fine-tuning", plain_lora, full, ""),
        ("LoRA", plain_lora, random_like(adapter_state(model, ffa=False), rng), ""),
        ("FFA-LoRA", plain, random_like(adapter_state(model, ffa=True), rng), fingerprint),
    ):
        rows.append(
            round_row(
                model_key,
                scheme,
                plain_round(run_cfg, down, random_like(down, rng), fp, train_metrics, eval_metrics),
                product_payload_bytes=payload_nbytes(RecordDict({ADAPTER: to_array_record(down)})),
            )
        )
        print(f"  {model_key} {scheme}: {rows[-1]['up_values']:,} values up", flush=True)
    del full
    down = random_like(adapter_state(model, ffa=True), rng)
    for n in sites:
        start = time.time()
        secure = secure_round(cfg, down, fingerprint, n, train_metrics, eval_metrics, rng)
        if secure.relative_error > 1e-5:
            raise RuntimeError(f"SecAgg+ round with {n} sites: unmasked mean is off by {secure.relative_error:.2e}")
        per_site = list(secure.exchanges.values())
        row = round_row(
            model_key,
            f"FFA-LoRA + SecAgg+, {n} sites",
            per_site[0],
            sites=n,
            neighbours=secure.neighbours,
            relative_error=secure.relative_error,
            max_upload_bytes=max(sum(e.up_bytes for e in ex) for ex in per_site),
            max_download_bytes=max(sum(e.down_bytes for e in ex) for ex in per_site),
            first_round_setup_upload_bytes=sum(e.up_bytes for e in next(iter(secure.setup.values()))),
            first_round_setup_download_bytes=sum(e.down_bytes for e in next(iter(secure.setup.values()))),
        )
        rows.append(row)
        print(
            f"  {model_key} SecAgg+ with {n} sites ({secure.neighbours} neighbours): {time.time() - start:.1f}s, "
            f"unmasked mean within {secure.relative_error:.1e} (relative RMS)",
            flush=True,
        )
    return rows


def print_rows(rows: list[dict[str, Any]]) -> None:
    print(
        f"  {'model':8s} {'scheme':30s} {'values up':>12s} {'4 B/value':>11s} {'upload':>11s} {'download':>11s}"
        f" {'(train only)':>12s}"
    )
    for r in rows:
        print(
            f"  {r['model']:8s} {r['scheme']:30s} {r['up_values']:12,d} {r['up_float32_bytes'] / 1e6:9.3f}MB "
            f"{r['upload_bytes'] / 1e6:9.3f}MB {r['download_bytes'] / 1e6:9.3f}MB "
            f"{r['train_download_bytes'] / 1e6:10.3f}MB"
        )


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    models = grouped(rows, "model")
    with figure(path, 1, len(models), figsize=(6 * len(models), 4.2), squeeze=False) as (_, axes):
        for ax, (key, sel) in zip(axes[0], models.items(), strict=True):
            x = np.arange(len(sel))
            for offset, key_bytes, label in ((-0.2, "upload_bytes", "upload"), (0.2, "download_bytes", "download")):
                heights = [r[key_bytes] for r in sel]
                ax.bar(x + offset, heights, 0.4, label=label)
                for xi, h in zip(x + offset, heights, strict=True):
                    ax.text(xi, h * 1.08, f"{h / 1e6:.4g}", ha="center", va="bottom", fontsize=6)
            ax.set_yscale("log")
            ax.set_ylim(top=max(r["download_bytes"] for r in sel) * 4)
            ax.set_xticks(x, [r["scheme"].replace(" + ", "\n+ ").replace(", ", "\n") for r in sel], fontsize=7)
            ax.set_ylabel("bytes per site per round (labels: MB)")
            ax.set_title(MODELS[key], fontsize=9)
            ax.legend(fontsize=7)


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__, quick="MiniLM only, SecAgg+ with 10 sites")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["minilm", "smollm2"])
    parser.add_argument("--sites", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.sites = ["minilm"], [10]
    quiet({"transformers": logging.ERROR, "fedtune": logging.ERROR}, ignore_warnings=True)
    # Messages are built as the ServerApp builds them, so this process takes the ServerApp's identity.
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, RUN_ID, SUPERLINK_NODE_ID
    started = time.time()
    load_before = os.getloadavg()
    print(f"bytes per site per round, {', '.join(MODELS[m] for m in args.models)}; SecAgg+ with {args.sites} sites")
    rows = [row for key in args.models for row in measure_model(key, args.sites, args.seed)]
    print_rows(rows)
    wall_s = time.time() - started
    report = {
        **header("communication", argv),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "wall_s": wall_s,
        "rows": rows,
    }
    write_report(args.out, "communication", report, lambda path: plot(rows, path), wall_s)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
