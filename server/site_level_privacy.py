"""The server's part in site-level DP (``privacy.site_level``): what the plan asks of sites, the
SecAgg range their noised updates need, uniform weights, the fallback noise, and the epsilon on record.

With ``noise = "distributed"`` the sites clip and add their noise shares before masking
(``client.site_level``); the server only widens the quantisation range to fit them, divides by
the expected number of sites and reports epsilon. With ``noise = "server"`` the sites only clip,
and :func:`site_level_mean` adds
N(0, (z * S)^2) to the sum here: that protects a site from whoever sees the model, not from the
operator, who sees the sum before the noise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import numpy as np

from fedtune.common.config import FedtuneConfig
from fedtune.common.privacy.site_level import site_level_epsilons
from fedtune.common.privacy.site_noise import add_noise, masking_range, noise_share_std
from fedtune.common.wire import SiteNoise

T = TypeVar("T")


def plan_fields(cfg: FedtuneConfig) -> dict[str, Any]:
    """The TrainPlan fields that tell a site what site-level DP asks of it."""
    site = cfg.privacy.site_level
    if not site.enabled:
        return {"site_noise": SiteNoise.OFF}
    return {
        "site_noise": SiteNoise(site.noise),
        "site_clip_norm": site.clip_norm,
        "site_noise_multiplier": site.noise_multiplier,
    }


def masking_clip_range(cfg: FedtuneConfig, clip_range: float) -> float:
    """SecAgg's per-coordinate range, widened under distributed noise to fit a clipped update plus the
    largest share a site adds: sized by a floor of 2 sites (each site sizes it by its own floor, never by
    the server's minimum; a site with a higher floor adds a smaller share)."""
    site = cfg.privacy.site_level
    if not (site.enabled and site.noise == "distributed"):
        return clip_range
    share = noise_share_std(site.noise_multiplier, site.clip_norm, 2)
    return max(clip_range, masking_range(site.clip_norm, share))


def uniform_weights(cfg: FedtuneConfig, updates: Sequence[tuple[T, float]]) -> list[tuple[T, float]]:
    """Each site's update with weight 1 under site-level DP (DP-FedAvg), else as given (example counts)."""
    if not cfg.privacy.site_level.enabled:
        return list(updates)
    return [(update, 1.0) for update, _ in updates]


def site_level_mean(
    cfg: FedtuneConfig, mean: Mapping[str, np.ndarray], contributors: int, rate: float, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Under site-level DP, the sum of the ``contributors``' clipped updates divided by the expected
    number of sites, q * N (``rate`` q, N = partition.num_clients), not by how many contributed:
    with a fixed denominator one hospital more or less moves the result by at most S / (q N)
    (McMahan et al., ICLR 2018), and the count itself is not released through it. Under
    ``noise = "server"`` N(0, (z S)^2) is added to that sum here (scaled like it). ``mean`` is the
    uniform mean over the contributors; unchanged when site-level DP is off.

    ``rng`` comes from the server's secret and the round (``server.site_sampling.round_generator``):
    a round run again after a restart then releases the same noise, not a second draw.
    """
    site = cfg.privacy.site_level
    if not site.enabled:
        return dict(mean)
    expected = rate * cfg.partition.num_clients
    scaled = {name: np.asarray(value) * (contributors / expected) for name, value in mean.items()}
    if site.noise != "server":
        return scaled
    std = site.noise_multiplier * site.clip_norm / expected
    return {name: add_noise(value, std, rng) for name, value in scaled.items()}


def epsilon_record(cfg: FedtuneConfig, rounds: int, sampling_rate: float = 1.0) -> dict[str, Any]:
    """The site-level keys of round ``rounds``'s record in metrics.jsonl ({} when site-level DP is off).

    Every round up to ``rounds`` counts, whether or not its sum was revealed (an upper bound).
    ``sampling_rate``: the share of the federation's sites asked each round (1: no sampling).
    """
    site = cfg.privacy.site_level
    if not site.enabled:
        return {}
    eps = site_level_epsilons(site.noise_multiplier, rounds, site.delta, sampling_rate)
    return eps.record() | {"site-level-noise": site.noise}
