"""The ClientApp a SuperNode runs at a site, configured by the site's own node config and policy.

Node config (set by the site when it starts its SuperNode): ``site-id``, ``partition-id``
(seeds the site's train/validation split), ``state-dir`` (ledger, replay file) and
``policy`` (its local policy file). The records trained on come from the policy's
``data_path`` if set, else the node config's ``data-path``, else the bundle's
``data.site_paths`` entry for this site: the server cannot point a site at other data
than the site allows.
"""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Context

from fedtune.client.app import DATA_INVALID, SiteNotReady, build_client_app
from fedtune.client.policy import PolicyError, SitePolicy, load_policy, policy_membership
from fedtune.client.site import Site
from fedtune.common.config import config_from_run_config
from fedtune.common.data.federation_data import load_examples, split_site
from fedtune.common.data.readers import DataError
from fedtune.common.logs import configure_logging
from fedtune.common.models.loading import model_spec

log = logging.getLogger("fedtune.client")

_SITES: dict[tuple, Site] = {}


def _data_path(policy: SitePolicy, node_config: dict, cfg, index: int) -> Path:
    if policy.data_path is not None:
        return policy.data_path
    if "data-path" in node_config:
        return Path(str(node_config["data-path"]))
    if index < len(cfg.data.site_paths):
        return cfg.data.site_paths[index]
    raise SiteNotReady(DATA_INVALID)


def deployed_site(context: Context) -> Site:
    nc = context.node_config
    key = (context.run_id, context.node_id)
    if key in _SITES:
        return _SITES[key]
    configure_logging(service=True)
    cfg = config_from_run_config(context.run_config)
    site_id = str(nc.get("site-id", f"site-{context.node_id}"))
    index = int(nc.get("partition-id", 0))
    try:
        policy = load_policy(Path(str(nc["policy"]))) if "policy" in nc else SitePolicy()
        membership = policy_membership(policy)
    except PolicyError as exc:
        log.error("%s: %s", site_id, exc)
        raise SiteNotReady("site not ready: local policy invalid") from exc
    path = _data_path(policy, nc, cfg, index)
    try:
        split = split_site(load_examples(path, cfg), cfg, index)
    except DataError as exc:
        log.error("%s: data invalid, not joining the federation:\n%s", site_id, exc)
        raise SiteNotReady(DATA_INVALID) from exc
    state_dir = Path(str(nc.get("state-dir", Path.home() / ".fedtune" / site_id)))
    # The site's own policy sets its LoRA rank; else the run's lora.site_ranks entry for its partition id.
    rank = policy.lora_rank or cfg.lora.site_rank(index)
    _SITES[key] = Site(site_id, cfg, model_spec(cfg), split, state_dir, policy, lora_rank=rank, membership=membership)
    return _SITES[key]


app = build_client_app(deployed_site)
