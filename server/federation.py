"""The server's round loop: broadcast the global adapter, aggregate, evaluate, checkpoint.

Only adapter tensors and a small training plan go out; only adapter tensors and
aggregate metrics come back. Every round ends with a checkpoint, so a crash loses at most
the round in flight, and ``resume`` continues from the newest complete round.
"""

from __future__ import annotations

import io
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from tqdm.auto import tqdm

from fedtune.common.atomic_files import atomic_write_bytes
from fedtune.common.config import FedtuneConfig
from fedtune.common.data.encoding import EncodedSet
from fedtune.common.models.lora_ranks import refactorise_adapter
from fedtune.common.schedules import round_lr
from fedtune.common.secure_aggregation.protocol import Advertisement, SecureAggregationError
from fedtune.common.secure_aggregation.quantisation import auto_clip_range
from fedtune.common.secure_aggregation.records import SECAGG_NEXT, advertisement_from, masked_from, round_tag
from fedtune.common.update_checks import adapter_update_problem, update_problem, vector_problem
from fedtune.common.wire import (
    ADAPTER,
    MASKED,
    PLAN,
    RUN_ENDED,
    SECAGG,
    EvaluatePlan,
    EvaluationReport,
    RunEnded,
    SiteState,
    SiteStatus,
    TrainPlan,
    TrainReport,
    WireError,
    from_array_record,
    payload_nbytes,
    to_array_record,
    unflatten_adapter,
)
from fedtune.server import early_stopping, site_level_privacy
from fedtune.server.checkpoints import Checkpoint, CheckpointStore
from fedtune.server.global_model import GlobalModel
from fedtune.server.messaging import (
    Availability,
    FederationError,
    by_node,
    every_connected_node,
    send_and_collect,
    wait_for_nodes,
)
from fedtune.server.model_card import write_model_cards
from fedtune.server.report import MetricsLog, plot_curves, summary_table, train_entry
from fedtune.server.robust_aggregation import RobustSettings, TooFewUpdates, robust_delta
from fedtune.server.secure_rounds import (
    PreparedRound,
    SecureExchange,
    SecureSettings,
    already_masked,
    already_masked_note,
    completed_round,
    failed_round,
    finish_round,
    set_up_round,
)
from fedtune.server.site_sampling import SiteSampling, round_generator, sampling_key
from fedtune.server.strategies import Strategy, build_strategy
from fedtune.server.strategies.mean_delta import mean_delta
from fedtune.server.tracking import ROUND_SECONDS, Tracker

log = logging.getLogger("fedtune.server")

#: The round status that ends a federation early: no site was willing to train.
EVERY_SITE_REFUSED = "stopped: every site refused"
#: Round 0's status when the head started from the label names (model.head_init): a model that already classifies.
BASE_MODEL_WITH_LABEL_PRIOR = "base model, head from the label names"

#: How the status of a round begins whose mean update failed its check (the global adapter is kept).
DISCARDED = "discarded"

#: How long the server waits for the sites to acknowledge that a run ended (they are told again on resume).
RUN_ENDED_TIMEOUT_S = 60.0


@dataclass
class RoundReplies:
    """What came back from the sites in one round, by site id."""

    updates: dict[str, tuple[dict, float]] = field(default_factory=dict)
    masked: dict[int, tuple[str, np.ndarray]] = field(default_factory=dict)
    next_keys: dict[int, Advertisement] = field(default_factory=dict)
    names: dict[int, str] = field(default_factory=dict)  # node id -> site id
    train: dict[str, dict[str, float]] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)

    @property
    def contributors(self) -> int:
        """Sites whose update can enter this round's aggregate, in the clear or masked."""
        return len(self.updates) + len(self.masked)

    @property
    def every_site_refused(self) -> bool:
        return bool(self.refused) and not self.contributors and not self.failed


def training_plan(cfg: FedtuneConfig, run_id: str, round_: int, a_fingerprint: str) -> ConfigRecord:
    """Round ``round_``'s :class:`TrainPlan`, as the record that travels; ``lr`` follows train.lr_schedule."""
    t, p = cfg.train, cfg.privacy
    return TrainPlan(
        run_id=run_id,
        round=round_,
        total_rounds=cfg.federation.rounds,
        local_steps=t.local_steps,
        batch_size=t.batch_size,
        lr=round_lr(t.lr_schedule, t.lr, round_, cfg.federation.rounds, t.warmup_rounds, t.min_lr),
        optimizer=t.optimizer,
        dp=p.enabled,
        target_epsilon=p.epsilon,
        delta=p.delta,
        max_grad_norm=p.max_grad_norm,
        a_fingerprint=a_fingerprint,
        secure_aggregation=cfg.secure_aggregation.enabled,
        proximal_mu=t.proximal_mu,
        **site_level_privacy.plan_fields(cfg),
    ).to_record()


def collect_train_replies(
    requests: list[Message], replies: list[Message], next_tag: bytes | None = None
) -> RoundReplies:
    """Sort the train replies; a secure reply carries a masked vector and maybe keys for round ``next_tag``."""
    out = RoundReplies()
    sent = {m.metadata.message_id: payload_nbytes(m.content) for m in requests}
    answered = {r.metadata.reply_to_message_id for r in replies}
    for node_id in [m.metadata.dst_node_id for m in requests if m.metadata.message_id not in answered]:
        out.failed[f"node-{node_id}"] = "no reply before the round timeout"
    for node, reply in by_node(requests, replies):
        if reply.has_error():
            out.failed[f"node-{node}"] = (reply.error.reason or "unknown error").splitlines()[-1][:300]
            continue
        try:
            status = SiteStatus.from_content(reply.content)
        except WireError as exc:
            out.failed[f"node-{node}"] = f"malformed reply: {exc}"
            continue
        site = out.names[node] = status.site_id
        if status.state is not SiteState.TRAINED:
            out.refused[site] = status.reason
            continue
        try:
            report = TrainReport.from_content(reply.content)
        except WireError as exc:
            out.failed[site] = f"malformed reply: {exc}"
            continue
        entry = train_entry(report, sent[reply.metadata.reply_to_message_id], payload_nbytes(reply.content))
        if MASKED in reply.content.array_records:
            try:
                out.masked[node] = (site, masked_from(reply.content.array_records[MASKED]))
            except (KeyError, ValueError) as exc:
                out.failed[site] = f"malformed masked vector: {exc}"
                continue
            if next_tag is not None and SECAGG_NEXT in reply.content.config_records:
                try:
                    out.next_keys[node] = advertisement_from(reply.content.config_records[SECAGG_NEXT], next_tag)
                except (KeyError, ValueError) as exc:
                    log.warning("%s advertised malformed keys for the next round: %s", site, exc)
        elif ADAPTER in reply.content.array_records:
            out.updates[site] = (from_array_record(reply.content.array_records[ADAPTER]), float(report.num_examples))
        else:
            out.failed[site] = "malformed reply: trained, but carries neither an adapter nor a masked vector"
            continue
        out.train[site] = entry
    return out


def restore_strategy(strategy: Strategy, checkpoint: Checkpoint) -> None:
    """The strategy's state (moments, say) as saved with ``checkpoint``, so a resumed run continues exactly.

    A checkpoint written by another strategy (the config changed between runs) leaves it fresh, with a warning.
    """
    saved_by = checkpoint.info.get("strategy", strategy.name)
    if saved_by != strategy.name:
        log.warning(
            "round %d was aggregated by strategy %r, the config names %r: %r starts from a fresh state",
            checkpoint.round,
            saved_by,
            strategy.name,
            strategy.name,
        )
        return
    strategy.load_state_dict(checkpoint.strategy_state())


class FederationServer:
    """Rounds over whichever sites are connected: each round a sample of them trains.

    ``available`` says which connected nodes count in a round (a deployment: all of them; a
    simulation hides its late joiners until their round).
    """

    def __init__(
        self,
        cfg: FedtuneConfig,
        model: GlobalModel,
        test_set: EncodedSet,
        run_dir: Path,
        available: Availability = every_connected_node,
    ) -> None:
        self.cfg, self.model, self.test_set, self.run_dir = cfg, model, test_set, Path(run_dir)
        self.store = CheckpointStore(self.run_dir / "checkpoints")
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl")
        self.run_id = json.loads((self.run_dir / "run.json").read_text())["run-id"]
        # The next round's secure-aggregation set-up, done during this round (server.secure_rounds).
        self.prepared: PreparedRound | None = None
        self.strategy = build_strategy(cfg.federation)
        self.site_names: dict[int, str] = {}
        self.sampling = SiteSampling.from_config(cfg.federation)
        self.sampling_key = sampling_key(self.run_dir)  # the server's secret behind its draws; never sent
        self.available = available
        self.known_nodes: set[int] = set()
        # TensorBoard and, by config, MLflow: fed every round's record (server.tracking).
        self.tracker = Tracker.for_run(cfg, self.run_dir, self.metrics)

    def _messages(self, nodes: list[int], message_type: str, plan: ConfigRecord) -> list[Message]:
        adapter = to_array_record(self.model.state())
        return [
            Message(RecordDict({ADAPTER: adapter, PLAN: plan}), message_type=message_type, dst_node_id=n) for n in nodes
        ]

    def evaluate_round(self, grid: Grid, nodes: list[int], round_: int) -> dict[str, Any]:
        plan = EvaluatePlan(round=round_, a_fingerprint=self.model.a_fingerprint).to_record()
        requests = self._messages(nodes, MessageType.EVALUATE, plan)
        replies = send_and_collect(grid, requests, f"round {round_} site eval", self.cfg.federation.round_timeout_s)
        clients = {}
        for node, reply in by_node(requests, replies):
            if reply.has_error():
                reason = reply.error.reason
            else:
                try:
                    status = SiteStatus.from_content(reply.content)
                    if status.state is SiteState.EVALUATED:
                        clients[status.site_id] = dict(EvaluationReport.from_content(reply.content).metrics)
                        continue
                    if status.state is SiteState.DECLINED:
                        log.debug("round %d: %s: %s", round_, status.site_id, status.reason)
                        continue
                    reason = status.reason
                except WireError as exc:
                    reason = f"malformed reply: {exc}"
            log.warning("round %d: node %d did not evaluate: %s", round_, node, str(reason).splitlines()[-1][:300])
        return {"round": round_, "server": self.model.evaluate(self.test_set), "clients": clients}

    def run(self, grid: Grid, resume: bool) -> list[dict[str, Any]]:
        fed = self.cfg.federation
        to_start = fed.min_sites_to_start or self.cfg.partition.num_clients
        nodes = wait_for_nodes(grid, to_start, fed.round_timeout_s, self.available)
        self.known_nodes = set(nodes)
        latest = self.store.latest() if resume else None
        if latest is not None:
            self.model.restore(latest.directory)
            restore_strategy(self.strategy, latest)
            self.metrics.keep_through(latest.round)
            start = latest.round + 1
            log.info("resuming after round %d from %s", latest.round, latest.directory)
        else:
            self.metrics.keep_through(-1)
            prior = self.cfg.task.classifies and self.cfg.model.head_init == "label_names"
            status = BASE_MODEL_WITH_LABEL_PRIOR if prior else "base model"
            if prior:  # round 0 already classifies: it competes for the best round, so it needs a checkpoint
                info = {"status": status, "run-id": self.run_id, "strategy": self.strategy.name}
                self.store.save(0, self.model.model, info, self.strategy.state_dict())
            self.metrics.append(self.evaluate_round(grid, nodes, 0) | {"status": status})
            start = 1
        if (ended := early_stopping.stopped_early(self.metrics.read())) is not None:
            log.info("%s; the run trains no more rounds", ended[1])
            self.tell_sites_run_ended(grid, *ended)  # again: a site may have missed it before the restart
            return self.metrics.read()
        for round_ in tqdm(
            range(start, fed.rounds + 1),
            desc="rounds",
            unit="round",
            initial=start - 1,
            total=fed.rounds,
            dynamic_ncols=True,
        ):
            started = time.monotonic()
            record = self.train_round(grid, self.connected(grid, round_), round_)
            record |= site_level_privacy.epsilon_record(self.cfg, round_, self.sampling.accountant_rate)
            self.store.save(
                round_,
                self.model.model,
                {"status": record["status"], "run-id": self.run_id, "strategy": self.strategy.name},
                self.strategy.state_dict(),
            )
            self._watch_for_best_and_stop(record, round_)
            record[ROUND_SECONDS] = round(time.monotonic() - started, 3)
            self.metrics.append(record)
            self.tracker.log_round(record)
            if record["status"] == EVERY_SITE_REFUSED:
                log.error("every site refused round %d; stopping the federation", round_)
                break
            if early_stopping.STOPPED_EARLY in record:
                log.warning("%s", record[early_stopping.STOPPED_EARLY])
                self.tell_sites_run_ended(grid, round_, record[early_stopping.STOPPED_EARLY])
                break
        return self.metrics.read()

    def _watch_for_best_and_stop(self, record: dict[str, Any], round_: int) -> None:
        """Early stopping's decision joins ``record`` (key ``stopped-early``) and ``best.json`` is rewritten:
        both from the held-out metric history (server.early_stopping), so a resumed run decides alike."""
        fed, watch = self.cfg.federation, early_stopping.Watch.of(self.cfg)
        history = early_stopping.metric_history([*self.metrics.read(), record], watch.metric, self._first_candidate())
        if fed.early_stopping.enabled and round_ < fed.rounds:
            if (decision := early_stopping.stop_decision(history, watch)) is not None:
                record[early_stopping.STOPPED_EARLY] = decision.reason
        best = early_stopping.best_round(history, watch)
        kept, why = early_stopping.kept_round(best, fed.keep, self.store.rounds())
        early_stopping.write_best(self.run_dir, best, kept, why, record.get(early_stopping.STOPPED_EARLY))

    def _first_candidate(self) -> int:
        """The first round that may be kept: 0 when it was checkpointed (a head from the label names), else 1."""
        return 0 if 0 in self.store.rounds() else 1

    def tell_sites_run_ended(self, grid: Grid, round_: int, reason: str) -> None:
        """Every connected site hears that the run ended after ``round_``: it then refuses to train for this
        run id, so no server can spend its budget on the run after saying it ended. Best effort: a site that
        does not answer within a minute is logged, and told again if the run is resumed."""
        plan = RunEnded(run_id=self.run_id, round=round_, reason=reason).to_record()
        requests = [
            Message(RecordDict({PLAN: plan}), message_type=RUN_ENDED, dst_node_id=n)
            for n in sorted(grid.get_node_ids())
        ]
        timeout = min(self.cfg.federation.round_timeout_s, RUN_ENDED_TIMEOUT_S)
        replies = send_and_collect(grid, requests, "telling the sites the run ended", timeout)
        told = []
        for node, reply in by_node(requests, replies):
            try:
                if reply.has_error():
                    raise WireError(str(reply.error.reason).splitlines()[-1][:300])
                status = SiteStatus.from_content(reply.content)
                if status.state is not SiteState.OK:
                    raise WireError(f"{status.state.value}: {status.reason}")
                told.append(status.site_id)
            except WireError as exc:
                log.warning("node %d was not told the run ended: %s", node, exc)
        log.info("told %d of %d sites the run ended: %s", len(told), len(requests), ", ".join(sorted(told)))

    def connected(self, grid: Grid, round_: int) -> list[int]:
        """The sites connected as ``round_`` starts (waiting for at least ``min_clients``); newcomers are logged.

        A site that connected since the last round is asked like any other from now on: every
        request carries the current global adapter, so it needs nothing else to catch up.
        """
        fed = self.cfg.federation
        nodes = wait_for_nodes(grid, fed.min_clients, fed.round_timeout_s, self.available, round_)
        joined = sorted(set(nodes) - self.known_nodes)
        if joined:
            log.info(
                "round %d: %d site(s) joined (nodes %s); they take part from this round", round_, len(joined), joined
            )
        self.known_nodes |= set(joined)
        return nodes

    def train_round(self, grid: Grid, connected: list[int], round_: int) -> dict[str, Any]:
        """One round: a sample of the ``connected`` sites trains, every connected site evaluates."""
        nodes = self.sampling.sample(connected, self.sampling_key, round_)
        if len(nodes) < (needed := self._min_sampled()):
            status = f"skipped: {len(nodes)} sites sampled, fewer than the {needed} a round needs"
            log.warning("round %d %s; nobody trains, the global adapter is unchanged", round_, status)
            return self._untrained_round(grid, nodes, connected, round_, status)
        plan = training_plan(self.cfg, self.run_id, round_, self.model.a_fingerprint)
        secure = self.cfg.secure_aggregation.enabled
        exchange = SecureExchange(
            grid, self.site_names, self.cfg.secure_aggregation.stage_timeout_s, send=send_and_collect
        )
        prepared, settings = None, self._secure_settings()
        if secure:
            prepared, self.prepared = self.prepared, None
            tag = round_tag(self.run_id, round_)
            if prepared is None or prepared.tag != tag or prepared.nodes != sorted(nodes):
                try:
                    prepared = set_up_round(exchange, tag, nodes, settings)
                except SecureAggregationError as exc:
                    return self._set_up_failed(grid, nodes, connected, round_, exchange, exc)
        trainers = prepared.nodes if prepared is not None else nodes
        requests = self._messages(trainers, MessageType.TRAIN, plan)
        if prepared is not None:
            for m in requests:
                m.content[SECAGG] = prepared.train_record(m.metadata.dst_node_id)
        replies = send_and_collect(grid, requests, f"round {round_} training", self.cfg.federation.round_timeout_s)
        # Round r+1's set-up rides on round r's messages only when the same sites train in both.
        steady = secure and round_ < self.cfg.federation.rounds and not self.sampling.samples
        next_tag = round_tag(self.run_id, round_ + 1) if steady else None
        got = collect_train_replies(requests, replies, next_tag)
        self.site_names.update(got.names)
        # Sites that refused or failed the set-up were not asked to train; the round names them too.
        got.refused = {**exchange.refusals, **got.refused}
        got.failed = {**{s: r for s, r in exchange.dropped.items() if s in exchange.failed}, **got.failed}
        for site, reason in {**got.refused, **got.failed}.items():
            log.warning("round %d: %s did not contribute: %s", round_, site, reason)
        if got.failed and not got.contributors and not got.refused:
            raise FederationError(f"round {round_}: every site failed; first error: {next(iter(got.failed.values()))}")
        current = self.model.state()  # the global adapter this round's updates started from
        self._reject_bad_updates(got, current, round_)
        contributed = got.contributors
        summary: dict[str, Any] = {}
        if prepared is not None and got.masked:
            status, summary = self._aggregate_securely(exchange, prepared, got, current, round_, settings, next_tag)
        elif len(got.updates) >= self.cfg.federation.min_clients:
            status = self._aggregate_plainly(got, current, round_)
        elif prepared is not None and (masked_before := already_masked(got.refused)):
            # A resumed round whose sites had sent their masked inputs before the restart: it is
            # abandoned (a second masking could reveal an update by difference), the run goes on.
            status = f"failed: secure aggregation: no masked input; {already_masked_note(masked_before)}"
            log.error("round %d %s; the global adapter is unchanged", round_, status)
        elif got.every_site_refused:
            status = EVERY_SITE_REFUSED
        else:
            status = f"skipped: {contributed} updates < min_clients {self.cfg.federation.min_clients}"
            log.error("round %d %s; the global adapter is unchanged", round_, status)
        record = self.evaluate_round(grid, connected, round_)
        return record | {
            "sampled": len(nodes),
            "connected": len(connected),
            "train": got.train,
            "refused": got.refused,
            "failed": got.failed,
            "status": status,
            **({"secure-aggregation": summary} if summary else {}),
        }

    def _untrained_round(
        self,
        grid: Grid,
        nodes: list[int],
        connected: list[int],
        round_: int,
        status: str,
        refused: dict[str, str] | None = None,
        failed: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """The record of a round in which nobody trained (too few sampled, or no secure set-up)."""
        record = self.evaluate_round(grid, connected, round_)
        return record | {
            "sampled": len(nodes),
            "connected": len(connected),
            "train": {},
            "refused": refused or {},
            "failed": failed or {},
            "status": status,
        }

    def _min_sampled(self) -> int:
        """The fewest sampled sites worth asking: min_clients, and 2 under secure aggregation (a Poisson
        sample is not topped up, so it can fall below)."""
        fed = self.cfg.federation
        return max(2, fed.min_clients) if self.cfg.secure_aggregation.enabled else fed.min_clients

    def _site_level(self, mean: dict[str, np.ndarray], contributors: int, round_: int) -> dict[str, np.ndarray]:
        """Site-level DP's fixed denominator and, under ``noise = "server"``, its noise (the same on a re-run)."""
        rng = round_generator(self.sampling_key, "server noise", round_)
        return site_level_privacy.site_level_mean(self.cfg, mean, contributors, self.sampling.accountant_rate, rng)

    def _set_up_failed(
        self,
        grid: Grid,
        nodes: list[int],
        connected: list[int],
        round_: int,
        exchange: SecureExchange,
        exc: SecureAggregationError,
    ) -> dict[str, Any]:
        """Too few sites answered the set-up: nobody trains, so nobody spends privacy on this round."""
        if len(exchange.failed) == len(nodes):
            raise FederationError(
                f"round {round_}: every site failed; first error: {next(iter(exchange.dropped.values()))}"
            ) from exc
        failed = {site: reason for site, reason in exchange.dropped.items() if site in exchange.failed}
        if len(exchange.refusals) == len(nodes):
            status = EVERY_SITE_REFUSED
        else:
            status = f"failed: secure aggregation: {exc}"
            log.error("round %d: secure aggregation could not be set up: %s; nobody trains this round", round_, exc)
        record = self._untrained_round(grid, nodes, connected, round_, status, dict(exchange.refusals), failed)
        return record | {"secure-aggregation": {"dropped": exchange.dropped, "error": str(exc)}}

    def _reject_bad_updates(self, got: RoundReplies, current: dict[str, np.ndarray], round_: int) -> None:
        """Secure aggregation off: each site's update (adapter minus the global one) must be finite,
        have the global adapter's names and shapes and a norm within ``train.max_update_norm``; a site
        whose update is not is dropped from the round and listed in ``failed``, by name."""
        for site in sorted(got.updates):
            problem = adapter_update_problem(got.updates[site][0], current, self.cfg.train.max_update_norm)
            if problem is not None:
                del got.updates[site]
                got.failed[site] = f"update rejected: {problem}"
                got.train.pop(site, None)
                log.error("round %d: %s's update rejected, left out of the mean: %s", round_, site, problem)

    def _aggregate_plainly(self, got: RoundReplies, current: dict[str, np.ndarray], round_: int) -> str:
        """The mean of the sites' (checked) updates, or what federation.aggregation_rule's robust rule makes
        of them, applied only if it passes the same check; too few updates for a robust rule skip the round."""
        # Sorted by site, so the float sum (and a resumed round) does not depend on arrival order.
        sites = sorted(got.updates)
        updates, fed, how = [got.updates[site] for site in sites], self.cfg.federation, ""
        updates = site_level_privacy.uniform_weights(self.cfg, updates)  # site-level DP: each site counts 1
        if fed.aggregation_rule == "mean":
            delta = self._site_level(mean_delta(updates, current), len(updates), round_)
        else:
            try:
                robust = robust_delta(updates, current, fed.aggregation_rule, RobustSettings.of(fed))
            except TooFewUpdates as exc:
                log.error("round %d skipped: %s; the global adapter is unchanged", round_, exc)
                return f"skipped: {exc}"
            delta, chosen = robust.delta, ", ".join(sites[i] for i in robust.selected)
            how = f" ({robust.description}{f'; selected {chosen}' if chosen else ''})"
            if chosen:
                log.info("round %d: %s selected %s", round_, robust.description, chosen)
        if (problem := update_problem(delta, current, self.cfg.train.max_update_norm)) is not None:
            rule = fed.aggregation_rule.replace("_", " ")
            return self._discard(round_, f"the {rule} update of {len(got.updates)} sites {problem}")
        self._step(current, delta, round_)
        return f"aggregated {len(got.updates)} sites{how}"

    def _discard(self, round_: int, why: str) -> str:
        status = f"{DISCARDED}: {why}; the global adapter is unchanged"
        log.error("round %d %s", round_, status)
        return status

    def _step(self, current: dict[str, np.ndarray], delta: dict[str, np.ndarray], round_: int) -> None:
        """Both aggregation paths end here: the strategy turns the mean delta into the next adapter."""
        state = self.strategy.apply(current, delta, round_)
        if self.cfg.lora.svd_refactorisation:  # sites of lower rank train A: order components by singular value
            state = refactorise_adapter(state)
        self.model.update(state)

    def _secure_settings(self) -> SecureSettings:
        sa, t, p = self.cfg.secure_aggregation, self.cfg.train, self.cfg.privacy
        clip_range = sa.clip_range or auto_clip_range(t.optimizer, t.lr, t.local_steps, p.max_grad_norm)
        min_survivors = max(2, self.cfg.federation.min_clients)
        return SecureSettings(
            # Widened under site-level DP with distributed noise to fit the sites' noise shares.
            clip_range=site_level_privacy.masking_clip_range(self.cfg, clip_range),
            min_survivors=min_survivors,
            vector_length=sum(int(np.size(v)) for v in self.model.state().values()),
            neighbours=sa.neighbours,
            threshold_fraction=sa.threshold_fraction,
        )

    def _aggregate_securely(
        self,
        exchange: SecureExchange,
        prepared: PreparedRound,
        got: RoundReplies,
        current: dict[str, np.ndarray],
        round_: int,
        settings: SecureSettings,
        next_tag: bytes | None,
    ) -> tuple[str, dict[str, Any]]:
        """SecAgg+ steps 3-4 over the masked replies; on failure the global adapter stays as it was."""
        for node, (site, vector) in list(got.masked.items()):
            if (problem := prepared.server.malformed(vector)) is not None:
                del got.masked[node]
                got.failed[site] = f"sent {problem}"
        for node, (site, vector) in got.masked.items():
            exchange.sites[node] = site
            if self.cfg.secure_aggregation.record_masked_inputs:
                buffer = io.BytesIO()
                np.save(buffer, vector, allow_pickle=False)
                atomic_write_bytes(
                    self.run_dir / "masked-inputs" / f"round-{round_:04d}" / f"{site}.npy", buffer.getvalue()
                )
        for node in set(prepared.nodes) - set(got.masked):
            reason = (
                got.failed.get(f"node-{node}")
                or got.failed.get(exchange.site(node))
                or got.refused.get(exchange.site(node))
                or "no masked vector in its train reply"
            )
            exchange.drop(node, "train (masked input)", reason)
        try:
            result, self.prepared = finish_round(
                exchange, prepared, {n: v for n, (_, v) in got.masked.items()}, settings, next_tag, got.next_keys
            )
        except SecureAggregationError as exc:
            log.error("round %d: secure aggregation failed: %s; the global adapter is unchanged", round_, exc)
            return failed_round(exchange, exc)
        # Each coordinate of the revealed mean is off by under one grid step of the fixed-point
        # encoding: allowed for (twice) on top of the bound's relative slack.
        rounding = 2 * np.sqrt(settings.vector_length) * result.grid_step
        # Site-level DP with server noise: added here, to the sum, before anything else sees it.
        mean = self._site_level({"mean": result.mean_update}, len(result.survivors), round_)["mean"]
        problem = vector_problem(mean, settings.vector_length, self.cfg.train.max_update_norm, slack=rounding)
        if problem is None:
            self._step(current, unflatten_adapter(mean, current), round_)
        if result.clipped_values:
            log.warning(
                "round %d: %d update values were clipped to secure_aggregation.clip_range = %g; raise it",
                round_,
                result.clipped_values,
                settings.clip_range,
            )
        for site, received in exchange.bytes_received.items():
            if site in got.train:
                got.train[site]["bytes-received"] += received
        status, summary = completed_round(exchange, result)
        summary |= {"clipped-values": result.clipped_values, "clip-range": settings.clip_range}
        if problem is not None:
            why = f"the unmasked mean update of {len(result.survivors)} sites {problem}"
            return self._discard(round_, why), summary | {"discarded": why}
        return status, summary

    def finish(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        """Merged model from the best (or newest: federation.keep) checkpoint, plus the summary table and plot."""
        task = self.cfg.task
        watch = early_stopping.Watch.of(self.cfg)
        history = early_stopping.metric_history(records, watch.metric, self._first_candidate())
        best = early_stopping.best_round(history, watch)
        kept, why = early_stopping.kept_round(best, self.cfg.federation.keep, self.store.rounds())
        ended = early_stopping.stopped_early(records)
        stopped = ended[1] if ended else None
        early_stopping.write_best(self.run_dir, best, kept, why, stopped)
        merged = None
        if kept is not None:
            merged = self.model.export_merged(self.store.path_for(kept), self.run_dir / "merged")
        write_model_cards(self.run_dir, self.cfg, records)  # README.md in merged/ and in each round's checkpoint
        table = "\n".join([summary_table(records, task), "", *([stopped] if stopped else []), why])
        (self.run_dir / "summary.txt").write_text(table + "\n", encoding="utf-8")
        plot = plot_curves(records, task, self.run_dir / "curves.png")
        artifacts = [self.run_dir / "summary.txt", plot, self.metrics.path, self.run_dir / early_stopping.BEST_FILE]
        self.tracker.close(artifacts)  # MLflow attaches them
        return {
            "table": table,
            "plot": str(plot),
            "merged": str(merged) if merged else None,
            "kept-round": kept,
            "kept-why": why,
            "best": best.to_json() if best else None,
            early_stopping.STOPPED_EARLY: stopped,
        }
