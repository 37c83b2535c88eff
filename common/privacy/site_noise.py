"""The site-level Gaussian mechanism on updates: clip each site's update, then noise the sum.

DP-FedAvg (McMahan et al., ICLR 2018): a site's update is scaled down to an L2 norm of at most S,
so adding or removing one site moves the sum of updates by at most S; Gaussian noise of std
z * S on that sum makes each round a Gaussian mechanism with noise multiplier z
(``common.privacy.site_level`` accounts for it).

Distributed noise (Kairouz et al., "The Distributed Discrete Gaussian Mechanism for Federated
Learning with Secure Aggregation", ICML 2021, here with continuous Gaussian shares added before
SecAgg's quantisation rather than discrete ones): each site adds its own share of std
z * S / sqrt(m), where m is the site's own floor on the sites in a sum it helps reveal (it
counts only finished sites it can vouch for), so the sum over at least m sites carries noise of
std at least z * S and the server never sees it without.
Shares come from the OS CSPRNG: noise derived from anything the server knows could be
subtracted again.
"""

from __future__ import annotations

import math
import secrets

import numpy as np

#: How many share standard deviations (on top of S) SecAgg's per-coordinate range leaves for a
#: noised update: a coordinate past it is clipped, which the Gaussian analysis does not cover;
#: at 7 std that happens about once in 4e11 values.
NOISE_HEADROOM = 7.0


def _csprng() -> np.random.Generator:
    return np.random.default_rng(secrets.randbits(128))


def clip_update(update: np.ndarray, clip_norm: float) -> tuple[np.ndarray, float]:
    """``update`` scaled down to an L2 norm of at most ``clip_norm`` (never up), and its norm before."""
    if not clip_norm > 0:
        raise ValueError(f"the clip norm must be positive, got {clip_norm}")
    x = np.asarray(update, dtype=np.float64)
    norm = float(np.linalg.norm(x))
    if not math.isfinite(norm):
        raise ValueError("the update contains NaN or infinity; it cannot be clipped")
    return (x * (clip_norm / norm) if norm > clip_norm else x), norm


def sites_in_every_revealed_sum(site_floor: int) -> int:
    """m: the fewest sites a sum this site helps unmask can hold, as far as the site itself can tell.

    The site's own ``min_aggregation_sites`` (at least 2), which ``ClientRound.unmask`` checks against
    the finished sites it can vouch for (itself and the neighbours whose shares it holds). Never the
    server's stated minimum: a server could state a large one to shrink every share and then list
    survivors that do not exist; its minimum may only raise the bar for unmasking, not lower the noise.
    """
    return max(2, int(site_floor))


def noise_share_std(noise_multiplier: float, clip_norm: float, sites_in_sum: int) -> float:
    """Std of one site's share: the sum of ``sites_in_sum`` independent shares has std z * S."""
    if sites_in_sum < 1:
        raise ValueError(f"a sum holds at least one site, got {sites_in_sum}")
    return noise_multiplier * clip_norm / math.sqrt(sites_in_sum)


def add_noise(update: np.ndarray, std: float, rng: np.random.Generator | None = None) -> np.ndarray:
    """``update`` plus independent N(0, std^2) in each coordinate, from the OS CSPRNG.

    ``rng`` is for tests only: in a run the noise must come from nothing the server knows.
    """
    x = np.asarray(update, dtype=np.float64)
    if std == 0:
        return x.copy()
    return x + (rng or _csprng()).normal(0.0, std, x.shape)


def masking_range(clip_norm: float, share_std: float) -> float:
    """The per-coordinate range SecAgg needs for a clipped update plus a noise share.

    A clipped update's coordinates are within S (an L2 bound is also a bound on each coordinate);
    the share adds :data:`NOISE_HEADROOM` standard deviations of room.
    """
    return clip_norm + NOISE_HEADROOM * share_std


def masking_range_problem(clip_range: float, clip_norm: float, share_std: float) -> str | None:
    """What is wrong with a round's SecAgg ``clip_range`` for this noised update (None: nothing).

    A range too narrow would clip noised coordinates, and clipped noise is no longer the Gaussian
    the accountant counts on; so a site refuses such a round rather than send.
    """
    needed = clip_norm + (NOISE_HEADROOM - 1) * share_std  # one std of slack below what the server sets
    if clip_range < needed:
        return (
            f"secure_aggregation.clip_range = {clip_range:g} would clip the noised update; site-level DP "
            f"needs at least {needed:g} (clip_norm {clip_norm:g} plus {NOISE_HEADROOM - 1:g} noise stds)"
        )
    return None
