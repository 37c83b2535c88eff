"""Thin Flower glue for a site: decode a request, call :class:`client.site.Site`, encode the reply.

A refusal (privacy budget spent, delta too large, mismatched adapter, a server speaking another
wire protocol) is a normal reply whose status is ``SiteState.REFUSED`` with a reason; it carries no
tensors. What travels, and how it is checked, is ``common.wire``'s contract.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from fedtune.client import secure_aggregation
from fedtune.client.membership import SIMULATED_ROSTER, Membership, load_membership, simulated_identity_path
from fedtune.client.revealed_rounds import AlreadyMasked, MaskedRounds, RevealedRounds
from fedtune.client.site import Site, SiteRefusal
from fedtune.client.site_level import adapter_with_update, check_round, clipped_update, noised_update
from fedtune.common.secure_aggregation.protocol import ClientRound, ProtocolViolation
from fedtune.common.secure_aggregation.records import SECAGG_NEXT, inbox_from, masked_record, round_tag
from fedtune.common.secure_aggregation.share_transport import ShareDecryptionError
from fedtune.common.update_checks import adapter_update_problem, l2_norm, norm_problem
from fedtune.common.wire import (
    ADAPTER,
    MASKED,
    METRICS,
    PLAN,
    RUN_ENDED,
    SECAGG,
    STATUS,
    EvaluatePlan,
    EvaluationReport,
    RunEnded,
    SiteNoise,
    SiteState,
    SiteStatus,
    TrainPlan,
    TrainReport,
    WireError,
    flatten_adapter,
    from_array_record,
    to_array_record,
)

log = logging.getLogger("fedtune.client")

SiteFactory = Callable[[Context], Site]

# All a server learns about a site whose data failed validation; the details stay in the site's log.
DATA_INVALID = "site not ready: data invalid"

NO_METRICS = "site does not share validation metrics (privacy.share_site_metrics)"


P = TypeVar("P", TrainPlan, EvaluatePlan)


class SiteNotReady(RuntimeError):
    """The site cannot serve requests (its data failed validation); ``str()`` is what the server is told."""


def decode_request(content: RecordDict, plan_type: type[P] = TrainPlan) -> P:  # type: ignore[assignment]
    """The request's plan, or a refusal saying what is wrong with it (a server of another version, say)."""
    if PLAN not in content.config_records or ADAPTER not in content.array_records:
        raise SiteRefusal(f"malformed request: expected records {ADAPTER!r} and {PLAN!r}, got {list(content)}")
    try:
        return plan_type.from_content(content)
    except WireError as exc:
        raise SiteRefusal(str(exc)) from exc


def _reply(
    msg: Message, site_id: str, state: SiteState, reason: str = "", content: RecordDict | None = None
) -> Message:
    """A reply whose status says what the site did; ``content`` holds what goes with it."""
    content = RecordDict() if content is None else content
    content[STATUS] = SiteStatus(site_id, state, reason).to_record()
    return Message(content, reply_to=msg)


def site_id_of(context: Context) -> str:
    """The name a site goes by in logs: its node config's ``site-id``, else its partition id."""
    if "site-id" in context.node_config:
        return str(context.node_config["site-id"])
    return f"site-{context.node_config.get('partition-id', context.node_id)}"


def _not_ready(msg: Message, context: Context, exc: SiteNotReady) -> Message:
    return _reply(msg, site_id_of(context), SiteState.REFUSED, str(exc))


def register_secure_aggregation(
    app: ClientApp,
    declare: secure_aggregation.Declaration,
    revealed_for: Callable[[Context], RevealedRounds] | None = None,
    membership_of: secure_aggregation.MembershipSource | None = None,
) -> None:
    """The SecAgg+ steps outside training, as ``train.<action>`` handlers.

    ``declare(context)`` gives what a site states when it sets a round up: its number of
    training examples (its weight) and its floor on the number of sites in a revealed sum.
    ``revealed_for(context)`` is the site's record of the rounds it unmasked (every real
    site has one; only benchmarks of dummy sites go without). ``membership_of(context)`` is the
    roster the site pins and its identity on it, or None in a federation without a roster.
    """
    app.train("secagg_advertise")(
        lambda msg, context: secure_aggregation.advertise_step(
            msg, context, site_id_of(context), declare, membership_of
        )
    )

    def with_site_records(step: Callable[..., Message]) -> Callable[[Message, Context], Message]:
        """``step`` with the site's roster membership and its on-disk round records."""

        def handler(msg: Message, context: Context) -> Message:
            try:
                revealed = revealed_for(context) if revealed_for is not None else None
                membership = membership_of(context) if membership_of is not None else None
            except SiteNotReady as exc:
                return _not_ready(msg, context, exc)
            return step(msg, context, site_id_of(context), membership=membership, revealed=revealed)

        return handler

    app.train("secagg_share_keys")(with_site_records(secure_aggregation.share_keys))
    app.train("secagg_sign_survivors")(with_site_records(secure_aggregation.sign_survivors))
    app.train("secagg_unmask")(with_site_records(secure_aggregation.unmask))


def _secure_round(
    msg: Message, request: TrainPlan, context: Context, masked: MaskedRounds, membership: Membership | None
) -> ClientRound:
    """The round set up with this site, its neighbours' shares opened: checked before any
    training (and budget) is spent, as is ``masked``, the site's record of the rounds it already
    sent a masked input for (a resumed server's retry of such a round is refused)."""
    if SECAGG not in msg.content.config_records:
        raise SiteRefusal("secure aggregation requested but the train request carries no shares")
    try:
        tag, inbox = inbox_from(msg.content.config_records[SECAGG])
    except (KeyError, ValueError) as exc:
        raise SiteRefusal(f"secure aggregation: malformed shares in the train request: {exc}") from exc
    if tag != round_tag(request.run_id, request.round):
        raise SiteRefusal(f"secure aggregation: shares for {tag!r} in the request for round {request.round}")
    try:
        return secure_aggregation.open_inbox(context, tag, inbox, masked, membership)
    except AlreadyMasked as exc:  # its reason begins with ALREADY_MASKED, for the server's record
        raise SiteRefusal(str(exc)) from exc
    except (ProtocolViolation, ShareDecryptionError, ValueError) as exc:
        raise SiteRefusal(f"secure aggregation: {exc}") from exc


def check_outgoing_update(
    adapter: dict[str, np.ndarray], global_adapter: dict[str, np.ndarray], max_norm: float
) -> None:
    """Refuse the round unless the update (``adapter`` minus ``global_adapter``) is finite, has the
    global adapter's names and shapes and a norm within ``max_norm`` (0: none): checked before it
    leaves the site, plain or masked, so nothing is sent (``common.update_checks``)."""
    if (problem := adapter_update_problem(adapter, global_adapter, max_norm)) is not None:
        raise SiteRefusal(f"update check failed, nothing sent: the update {problem}")


def build_client_app(site_for: SiteFactory, mods: Sequence[Mod] = ()) -> ClientApp:
    """A ClientApp whose site (data, model, ledger) is found by ``site_for(context)``."""
    app = ClientApp(mods=list(mods))

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        try:
            site = site_for(context)
        except SiteNotReady as exc:
            return _not_ready(msg, context, exc)
        try:
            request = decode_request(msg.content)
            if request.secure_aggregation:
                secure_round = _secure_round(msg, request, context, site.masked_rounds, site.membership)
            # Site-level DP's refusals need only the plan and the round: made before training spends budget.
            check_round(
                request, secure_round.params if request.secure_aggregation else None, site.policy.min_aggregation_sites
            )
            global_adapter = from_array_record(msg.content.array_records[ADAPTER])
            outcome = site.train(request, global_adapter)
            site_level = request.site_noise is not SiteNoise.OFF
            # Under site-level DP the norm bound applies to the clipped update, the one that leaves the site.
            check_outgoing_update(outcome.adapter, global_adapter, 0.0 if site_level else site.max_update_norm)
            update = clipped_update(
                flatten_adapter(outcome.adapter) - flatten_adapter(global_adapter), request, site.site_id
            )
            if site_level and (problem := norm_problem(l2_norm(update), site.max_update_norm)) is not None:
                raise SiteRefusal(
                    "update check failed, nothing sent: clipped to site_clip_norm = "
                    f"{request.site_clip_norm:g}, {problem}"
                )
            # Distributed site-level noise: this site's share, added before masking.
            update = noised_update(update, request, site.policy.min_aggregation_sites)
            if request.secure_aggregation:
                # The update leaves the site only masked; its keys for the next round ride along.
                try:
                    vector = secure_aggregation.mask_opened(
                        context, secure_round, update, site.site_id, site.masked_rounds
                    )
                except AlreadyMasked as exc:
                    raise SiteRefusal(str(exc)) from exc
                except (ProtocolViolation, ValueError) as exc:
                    raise SiteRefusal(f"secure aggregation: {exc}") from exc
        except SiteRefusal as exc:
            log.warning("%s refused round: %s", site.site_id, exc)
            return _reply(msg, site.site_id, SiteState.REFUSED, str(exc))
        # The training loss is computed on raw training records without noise, so it is not
        # covered by the DP guarantee: it stays in the site's log and is never sent.
        report = TrainReport(
            num_examples=outcome.num_examples,
            steps=outcome.steps,
            epsilon_spent=outcome.epsilon_spent,
            noise_multiplier=outcome.noise_multiplier,
            sample_rate=outcome.sample_rate,
        )
        content = RecordDict({METRICS: report.to_record()})
        if request.secure_aggregation:
            content[MASKED] = masked_record(vector)
            if request.round < request.total_rounds:
                content[SECAGG_NEXT] = secure_aggregation.advertise(
                    context,
                    round_tag(request.run_id, request.round + 1),
                    # Its weight in the next round: 1 under site-level DP (as Site.aggregation_weight).
                    1 if request.site_noise is not SiteNoise.OFF else outcome.num_examples,
                    site.policy.min_aggregation_sites,
                    site.membership,
                )
        else:
            # Under site-level DP the global adapter plus the clipped update, not the trained adapter.
            clipped = request.site_noise is not SiteNoise.OFF
            content[ADAPTER] = to_array_record(
                adapter_with_update(global_adapter, update) if clipped else outcome.adapter
            )
        return _reply(msg, site.site_id, SiteState.TRAINED, content=content)

    def declare(context: Context) -> tuple[int, int]:
        site = site_for(context)
        return site.aggregation_weight, site.policy.min_aggregation_sites

    register_secure_aggregation(
        app, declare, lambda context: site_for(context).revealed_rounds, lambda context: site_for(context).membership
    )

    @app.train(RUN_ENDED.removeprefix("train."))
    def run_ended(msg: Message, context: Context) -> Message:
        """The server ended the run (early stopping): the site records it and refuses to train for it again."""
        try:
            site = site_for(context)
        except SiteNotReady as exc:
            return _not_ready(msg, context, exc)
        if PLAN not in msg.content.config_records:
            return _reply(msg, site.site_id, SiteState.REFUSED, f"malformed request: expected a {PLAN!r} record")
        try:
            ended = RunEnded.from_content(msg.content)
        except WireError as exc:
            return _reply(msg, site.site_id, SiteState.REFUSED, str(exc))
        site.end_run(ended.run_id, ended.round, ended.reason)
        return _reply(msg, site.site_id, SiteState.OK)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        try:
            site = site_for(context)
        except SiteNotReady as exc:
            return _not_ready(msg, context, exc)
        try:
            # The plan first: a server of another protocol version hears so even from a site that declines.
            plan = decode_request(msg.content, EvaluatePlan)
            if not (site.cfg.privacy.share_site_metrics and site.policy.allow_site_metrics):
                return _reply(msg, site.site_id, SiteState.DECLINED, NO_METRICS)
            report = EvaluationReport(
                site.evaluate(from_array_record(msg.content.array_records[ADAPTER]), plan.a_fingerprint)
            )
        except SiteRefusal as exc:
            log.warning("%s refused to evaluate: %s", site.site_id, exc)
            return _reply(msg, site.site_id, SiteState.REFUSED, str(exc))
        return _reply(msg, site.site_id, SiteState.EVALUATED, content=RecordDict({METRICS: report.to_record()}))

    return app


def simulated_site_factory(cfg, spec, run_dir: Path, verbose: bool = False) -> SiteFactory:
    """Sites of a simulation: each derives its own share of the data from its partition id.

    Their logs go to ``RUN_DIR/logs/sites.log`` (lines name the site).
    """
    cache: dict[int, Site] = {}

    def site_for(context: Context) -> Site:
        from fedtune.common.data.federation_data import build_site_splits, load_site_files
        from fedtune.common.data.readers import DataError
        from fedtune.common.logs import configure_logging

        configure_logging(verbose, Path(run_dir) / "logs" / "sites.log")
        pid = int(context.node_config["partition-id"])
        if pid not in cache:
            try:
                split = load_site_files(cfg, pid) if cfg.partition.scheme == "files" else build_site_splits(cfg)[0][pid]
            except DataError as exc:
                log.error("site-%d: data invalid, not joining the federation:\n%s", pid, exc)
                raise SiteNotReady(DATA_INVALID) from exc
            state_dir = Path(run_dir) / "sites" / f"site-{pid}"
            roster = Path(run_dir) / SIMULATED_ROSTER
            identity = simulated_identity_path(run_dir, f"site-{pid}")
            membership = load_membership(roster, identity) if roster.exists() else None
            cache[pid] = Site(
                site_id_of(context),
                cfg,
                spec,
                split,
                state_dir,
                lora_rank=cfg.lora.site_rank(pid),
                membership=membership,
            )
        return cache[pid]

    return site_for
