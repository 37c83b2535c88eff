"""Thin Flower glue for a site: decode a request, call :class:`client.site.Site`, encode the reply.

A refusal (privacy budget spent, delta too large, mismatched adapter) is a normal reply
with ``status.state = "refused"`` and a reason; it carries no tensors.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.site import RoundRequest, Site, SiteRefusal
from common.wire import ADAPTER, METRICS, PLAN, STATUS, from_array_record, to_array_record

log = logging.getLogger("fedtune.client")

SiteFactory = Callable[[Context], Site]

# All a server learns about a site whose data failed validation; the details stay in the site's log.
DATA_INVALID = "site not ready: data invalid"

NO_METRICS = "site does not share validation metrics (privacy.share_site_metrics)"


class SiteNotReady(RuntimeError):
    """The site cannot serve requests (its data failed validation); ``str()`` is what the server is told."""

# Everything a trained reply's metrics may hold: public plan values and DP accounting.
TRAIN_REPLY_METRICS = ("num-examples", "steps", "epsilon", "noise-multiplier", "sample-rate")


def decode_request(content: RecordDict) -> RoundRequest:
    """The round plan, or a refusal naming what is missing (a server of another version, say)."""
    if PLAN not in content or ADAPTER not in content:
        raise SiteRefusal(f"malformed request: expected records {ADAPTER!r} and {PLAN!r}, got {list(content)}")
    plan = content[PLAN]
    values = {name: plan[name.replace("_", "-")] for name in RoundRequest.__dataclass_fields__
              if name.replace("_", "-") in plan}
    try:
        return RoundRequest(**values)
    except TypeError as exc:
        raise SiteRefusal(f"malformed request plan: {exc}") from exc


def _status(site_id: str, state: str, reason: str = "") -> ConfigRecord:
    return ConfigRecord({"site-id": site_id, "state": state, "reason": reason})


def _not_ready(msg: Message, context: Context, exc: SiteNotReady) -> Message:
    site_id = f"site-{context.node_config.get('partition-id', context.node_id)}"
    return Message(RecordDict({STATUS: _status(site_id, "refused", str(exc))}), reply_to=msg)


def build_client_app(site_for: SiteFactory) -> ClientApp:
    """A ClientApp whose site (data, model, ledger) is found by ``site_for(context)``."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        try:
            site = site_for(context)
        except SiteNotReady as exc:
            return _not_ready(msg, context, exc)
        try:
            request = decode_request(msg.content)
            outcome = site.train(request, from_array_record(msg.content[ADAPTER]))
        except SiteRefusal as exc:
            log.warning("%s refused round: %s", site.site_id, exc)
            return Message(RecordDict({STATUS: _status(site.site_id, "refused", str(exc))}), reply_to=msg)
        # The training loss is computed on raw training records without noise, so it is not
        # covered by the DP guarantee: it stays in the site's log and is never sent.
        metrics = MetricRecord({
            "num-examples": outcome.num_examples, "steps": outcome.steps, "epsilon": outcome.epsilon,
            "noise-multiplier": outcome.noise_multiplier, "sample-rate": outcome.sample_rate,
        })
        content = RecordDict({
            ADAPTER: to_array_record(outcome.adapter), METRICS: metrics, STATUS: _status(site.site_id, "trained"),
        })
        return Message(content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        try:
            site = site_for(context)
        except SiteNotReady as exc:
            return _not_ready(msg, context, exc)
        if not site.cfg.privacy.share_site_metrics:
            return Message(RecordDict({STATUS: _status(site.site_id, "declined", NO_METRICS)}), reply_to=msg)
        fingerprint = str(msg.content[PLAN].get("a-fingerprint", "")) if PLAN in msg.content else ""
        try:
            metrics = site.evaluate(from_array_record(msg.content[ADAPTER]), fingerprint)
        except SiteRefusal as exc:
            return Message(RecordDict({STATUS: _status(site.site_id, "refused", str(exc))}), reply_to=msg)
        return Message(
            RecordDict({METRICS: MetricRecord(metrics), STATUS: _status(site.site_id, "evaluated")}), reply_to=msg
        )

    return app


def simulated_site_factory(cfg, spec, run_dir: Path) -> SiteFactory:
    """Sites of a simulation: each derives its own share of the data from its partition id."""
    cache: dict[int, Site] = {}

    def site_for(context: Context) -> Site:
        from common.data.federation_data import build_site_splits, load_site_files
        from common.data.readers import DataError
        from common.logs import configure_logging

        configure_logging()
        pid = int(context.node_config["partition-id"])
        if pid not in cache:
            try:
                split = load_site_files(cfg, pid) if cfg.partition.scheme == "files" else build_site_splits(cfg)[0][pid]
            except DataError as exc:
                log.error("site-%d: data invalid, not joining the federation:\n%s", pid, exc)
                raise SiteNotReady(DATA_INVALID) from exc
            cache[pid] = Site(f"site-{pid}", cfg, spec, split, Path(run_dir) / "sites" / f"site-{pid}")
        return cache[pid]

    return site_for
