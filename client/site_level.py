"""A site's part in site-level DP: clip its update and, for distributed noise, add its share before masking.

The maths is ``common.privacy.site_noise``; this module decides, from the train plan and the
secure-aggregation round the site set up, what applies, and refuses a round in which the noise
could not do its job: distributed noise without secure aggregation, a round whose weights are
not uniform, or a quantisation range that would clip the noised update. Those checks need only
the plan and the round's parameters (:func:`check_round`), so the site makes them before it
trains: a refused round costs no privacy budget.

The share is sized by the site's own floor ``min_aggregation_sites`` (at least 2), which the
site checks, when asked to unmask, against the finished sites it can vouch for; the server's
stated minimum only raises the bar for unmasking (``common.secure_aggregation.protocol``).
"""

from __future__ import annotations

import logging

import numpy as np

from fedtune.client.site import SiteRefusal
from fedtune.common.privacy.site_noise import (
    add_noise,
    clip_update,
    masking_range_problem,
    noise_share_std,
    sites_in_every_revealed_sum,
)
from fedtune.common.secure_aggregation.protocol import RoundParameters
from fedtune.common.wire import SiteNoise, TrainPlan, flatten_adapter, unflatten_adapter

log = logging.getLogger("fedtune.site")


def share_std_for_round(plan: TrainPlan, site_floor: int) -> float:
    """The std of this site's noise share in a secure round: sized by the site's own floor (at least 2)
    on the sites it can vouch for in a sum it unmasks, never by the server's stated minimum."""
    return noise_share_std(plan.site_noise_multiplier, plan.site_clip_norm, sites_in_every_revealed_sum(site_floor))


def check_round(plan: TrainPlan, params: RoundParameters | None, site_floor: int) -> None:
    """Refuse (SiteRefusal) a round in which ``plan``'s site-level DP could not protect the site.

    Depends only on the plan and the round's parameters, so the site calls it before training:
    a refusal then costs no privacy budget. ``params``: the secure round set up with this site
    (None in the clear).
    """
    if plan.site_noise is SiteNoise.OFF:
        return
    if not plan.site_clip_norm > 0:
        raise SiteRefusal(f"site-level DP with site_clip_norm = {plan.site_clip_norm:g}; the plan is malformed")
    if plan.site_noise is SiteNoise.SERVER:
        return
    if params is None or not plan.secure_aggregation:
        raise SiteRefusal(
            "site-level DP with distributed noise needs secure aggregation: one site's share alone is too small "
            "to protect it in the clear"
        )
    if params.total_examples != params.num_participants:
        raise SiteRefusal(
            f"site-level DP weighs every site 1, but the round's total weight is {params.total_examples} over "
            f"{params.num_participants} sites; the shares would not add up to the planned noise"
        )
    std = share_std_for_round(plan, site_floor)
    if (problem := masking_range_problem(params.clip_range, plan.site_clip_norm, std)) is not None:
        raise SiteRefusal(problem)


def clipped_update(update: np.ndarray, plan: TrainPlan, site_id: str) -> np.ndarray:
    """``update`` scaled down to ``plan``'s site_clip_norm under site-level DP (unchanged when it is off);
    the norm before clipping goes to the site's log only."""
    if plan.site_noise is SiteNoise.OFF:
        return update
    clipped, norm = clip_update(update, plan.site_clip_norm)
    log.info(
        "%s round %d: update norm %.4g, clipped to site_clip_norm %.4g%s",
        site_id,
        plan.round,
        norm,
        plan.site_clip_norm,
        "" if norm > plan.site_clip_norm else " (untouched)",
    )
    return clipped


def noised_update(
    clipped: np.ndarray, plan: TrainPlan, site_floor: int, rng: np.random.Generator | None = None
) -> np.ndarray:
    """``clipped`` plus this site's noise share when the noise is distributed (unchanged otherwise).

    ``rng`` is for tests only (the noise comes from the OS CSPRNG). Call :func:`check_round` first.
    """
    if plan.site_noise is not SiteNoise.DISTRIBUTED:
        return clipped
    return add_noise(clipped, share_std_for_round(plan, site_floor), rng)


def adapter_with_update(global_adapter: dict[str, np.ndarray], update: np.ndarray) -> dict[str, np.ndarray]:
    """The adapter a site sends in the clear: the global adapter plus its (clipped) update."""
    return unflatten_adapter(flatten_adapter(global_adapter) + update, global_adapter)
