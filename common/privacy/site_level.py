"""Site-level (client-level) epsilon: the Gaussian mechanism on the sum of clipped site updates, per round.

Under DP-FedAvg (McMahan et al., "Learning Differentially Private Recurrent Language Models",
ICLR 2018) every round releases the sum of the sampled sites' updates, each clipped to an L2
norm of S, plus Gaussian noise of std z * S: a subsampled Gaussian mechanism with noise
multiplier z and sampling rate q (sampled sites / sites in the federation) over neighbouring
federations that differ in one whole site. The rounds compose; the same Opacus RDP accountant
that charges a site's DP-SGD steps (``common.privacy.accounting``) does the arithmetic, with
one "step" a round.

Amplification by sampling (q < 1) holds only if the sites of each round really are a uniform
sample that no one can steer: it rests on the operator running the sampling as claimed. Against
a malicious operator take q = 1, which :func:`site_level_epsilons` reports beside the sampled
figure. Every planned round is counted, even one that failed or was skipped, so the figure is an
upper bound.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedtune.common.privacy.accounting import calibrate_noise, epsilon_spent


def site_level_epsilon(noise_multiplier: float, rounds: int, delta: float, sampling_rate: float = 1.0) -> float:
    """Site-level epsilon at ``delta`` after ``rounds`` rounds of noise ``noise_multiplier`` (z) at site rate q.

    z = 0 (no noise) gives infinity: clipping alone bounds a site's influence but hides nothing.
    """
    if not 0 < sampling_rate <= 1:
        raise ValueError(f"the site sampling rate must be in (0, 1], got {sampling_rate}")
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}")
    if rounds == 0:
        return 0.0
    if noise_multiplier <= 0:
        return float("inf")
    return epsilon_spent([(noise_multiplier, sampling_rate, rounds)], delta, "rdp")


def site_level_noise_multiplier(target_epsilon: float, rounds: int, delta: float, sampling_rate: float = 1.0) -> float:
    """The smallest z (to 0.01 in epsilon) whose ``rounds`` rounds stay within ``target_epsilon`` at ``delta``."""
    return calibrate_noise(target_epsilon, delta, sampling_rate, rounds, "rdp")


@dataclass(frozen=True)
class SiteLevelEpsilons:
    """What a round's record says of site-level DP: epsilon with the claimed sampling, and without it."""

    epsilon: float  # at the claimed site sampling rate (trusting the operator's sampling)
    epsilon_without_sampling: float  # q = 1: what holds whoever picks the sites
    delta: float
    sampling_rate: float
    rounds: int

    def record(self) -> dict[str, float | int]:
        """The keys of a round's record in metrics.jsonl."""
        return {
            "site-level-epsilon": self.epsilon,
            "site-level-epsilon-without-sampling": self.epsilon_without_sampling,
            "site-level-delta": self.delta,
            "site-sampling-rate": self.sampling_rate,
            "site-level-rounds": self.rounds,
        }


def site_level_epsilons(
    noise_multiplier: float, rounds: int, delta: float, sampling_rate: float = 1.0
) -> SiteLevelEpsilons:
    """Epsilon after ``rounds`` rounds at the claimed sampling rate and, for a malicious operator, at q = 1."""
    sampled = site_level_epsilon(noise_multiplier, rounds, delta, sampling_rate)
    unsampled = sampled if sampling_rate == 1 else site_level_epsilon(noise_multiplier, rounds, delta, 1.0)
    return SiteLevelEpsilons(sampled, unsampled, delta, sampling_rate, rounds)
