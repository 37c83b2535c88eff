"""What a run will spend, before it runs: each site's noise, epsilon round by round, and settings that waste it.

Each site calibrates its own noise multiplier at training time (``client.site``): from its record
count n, the expected batch B = min(train.batch_size, n) (Poisson sampling at rate q = B / n), and
the planned steps R x train.local_steps, so that the whole run stays within privacy.epsilon. The
same arithmetic here, from the partition a run would make, tells an operator what each site will
do and where the settings are known to spend the budget badly: docs/benchmarks.md ("What was tried
on the way to 90 %") found that on Banking77 a fresh Adam taking a few small noisy steps a round
learned little, and full-batch steps with plain SGD over more rounds recovered 90 % of the
non-private accuracy at epsilon 8.

The noise on each step's mean gradient has std sigma * C / B per coordinate (C: the clip norm), while
a record's clipped gradient has norm at most C: with small batches the noise dominates whatever the
budget. Everything here is a pure function of the config and the site sizes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from fedtune.common.config import FedtuneConfig
from fedtune.common.privacy.accounting import StepGroup, calibrate_noise, epsilon_spent
from fedtune.common.privacy.site_level import site_level_epsilons
from fedtune.common.schedules import round_lr

#: Under DP, an expected batch below this leaves each step's mean gradient mostly noise.
SMALL_BATCH = 64
#: A noise multiplier above this drowns the clipped gradients of any batch a site has.
HIGH_NOISE = 5.0
#: A fresh Adam with fewer steps than this a round stays in its sign-descent start-up (see adam_warning).
ADAM_FRESH_STEPS = 100
#: Expected passes over a site's records in the whole run above which the noise pays for many small steps.
MANY_PASSES = 20.0
#: At or below this per-site epsilon a classifier's random head learns slowly under the noise (see label_prior_note).
STRONG_DP_EPSILON = 2.0
#: Rounds shown one by one; a longer run shows about this many, evenly spaced, the last included.
SHOWN_ROUNDS = 24

Severity = Literal["error", "warning", "note"]


@dataclass(frozen=True)
class PlanWarning:
    """A finding about the settings: ``error`` (a site will refuse), ``warning`` (budget wasted), ``note``."""

    code: str
    severity: Severity
    message: str


@dataclass(frozen=True)
class SitePlan:
    """What one site will do over the run, as ``client.site`` computes it at training time."""

    site: str
    records: int  # n: the site's training records
    expected_batch: int  # B = min(train.batch_size, n)
    sample_rate: float  # q = B / n (Poisson sampling under DP)
    steps_per_round: int
    total_steps: int  # calibrated for every planned round
    noise_multiplier: float  # sigma; 0 without DP
    epsilon_by_round: tuple[tuple[int, float], ...]  # (round, epsilon after it), as the site's ledger will say
    problem: str = ""  # why the site will refuse to train (then no noise or epsilon)

    @property
    def noise_on_mean(self) -> float:
        """Std of the noise on a step's mean clipped gradient, per coordinate, in units of the clip norm C."""
        return self.noise_multiplier / self.expected_batch if self.expected_batch else float("inf")

    @property
    def passes(self) -> float:
        """Expected passes over the site's records in the whole run (steps x q)."""
        return self.total_steps * self.sample_rate

    @property
    def final_epsilon(self) -> float:
        return self.epsilon_by_round[-1][1] if self.epsilon_by_round else 0.0


@dataclass(frozen=True)
class SiteLevelPlan:
    """Site-level DP (privacy.site_level): the fixed noise multiplier z and epsilon after each round."""

    noise_multiplier: float
    delta: float
    sampling_rate: float
    epsilon_by_round: tuple[tuple[int, float], ...]
    epsilon_without_sampling_by_round: tuple[tuple[int, float], ...]


@dataclass(frozen=True)
class PrivacyPlan:
    """A run's privacy, round by round and site by site, with what the settings are likely to waste."""

    dp: bool
    epsilon: float
    delta: float
    accountant: str
    rounds: int
    local_steps: int
    optimizer: str
    lr_by_round: tuple[tuple[int, float], ...]
    sites: tuple[SitePlan, ...]
    site_level: SiteLevelPlan | None
    site_sampling_rate: float
    warnings: tuple[PlanWarning, ...] = field(default=())


def shown_rounds(rounds: int, limit: int = SHOWN_ROUNDS) -> list[int]:
    """Every round of a short run; of a long one about ``limit``, evenly spaced, first and last included."""
    if rounds <= limit:
        return list(range(1, rounds + 1))
    step = rounds / (limit - 1)
    return sorted({1, rounds, *(min(rounds, max(1, round(i * step))) for i in range(1, limit - 1))})


def histogram_prior(cfg: FedtuneConfig) -> list[StepGroup]:
    """The release a site charges before training: the DP label histogram of train.class_weighting = 'balanced'."""
    if cfg.privacy.enabled and cfg.task.classifies and cfg.train.class_weighting == "balanced":
        return [(cfg.privacy.histogram_noise, 1.0, 1)]
    return []


def plan_site(
    site: str,
    records: int,
    *,
    dp: bool,
    target_epsilon: float,
    delta: float,
    batch_size: int,
    local_steps: int,
    rounds: int,
    accountant: str = "rdp",
    prior: Sequence[StepGroup] = (),
) -> SitePlan:
    """One site's noise multiplier and epsilon after each shown round, as its training and ledger will have them."""
    batch = min(batch_size, records)
    plan = SitePlan(
        site=site,
        records=records,
        expected_batch=batch,
        sample_rate=min(1.0, batch / records) if records else 1.0,
        steps_per_round=local_steps,
        total_steps=rounds * local_steps,
        noise_multiplier=0.0,
        epsilon_by_round=(),
    )
    if not dp:
        return plan
    if records == 0 or delta >= 1.0 / records:
        problem = f"privacy.delta = {delta:g} is not below 1/n = 1/{records}: the site refuses to train"
        return replace(plan, problem=problem)
    q = plan.sample_rate
    try:
        sigma = calibrate_noise(target_epsilon, delta, q, plan.total_steps, accountant, prior=prior)
    except ValueError as exc:
        return replace(plan, problem=f"no noise fits the budget: {exc}")
    # The ledger's arithmetic: the prior releases, then one (sigma, q, local_steps) group a round trained.
    epsilons = tuple(
        (r, epsilon_spent([*prior, (sigma, q, r * local_steps)], delta, accountant)) for r in shown_rounds(rounds)
    )
    return replace(plan, noise_multiplier=sigma, epsilon_by_round=epsilons)


def plan_site_level(cfg: FedtuneConfig, sampling_rate: float) -> SiteLevelPlan | None:
    """Site-level epsilon after each shown round (privacy.site_level), with and without site sampling."""
    site = cfg.privacy.site_level
    if not site.enabled:
        return None
    shown = [
        site_level_epsilons(site.noise_multiplier, r, site.delta, sampling_rate)
        for r in shown_rounds(cfg.federation.rounds)
    ]
    return SiteLevelPlan(
        noise_multiplier=site.noise_multiplier,
        delta=site.delta,
        sampling_rate=sampling_rate,
        epsilon_by_round=tuple((e.rounds, e.epsilon) for e in shown),
        epsilon_without_sampling_by_round=tuple((e.rounds, e.epsilon_without_sampling) for e in shown),
    )


def plan_privacy(
    cfg: FedtuneConfig,
    site_records: Sequence[int],
    site_sampling_rate: float = 1.0,
    site_level_sampling_rate: float = 1.0,
) -> PrivacyPlan:
    """The plan of a run whose sites hold ``site_records`` training records (site-0 first).

    ``site_sampling_rate``: the share of sites asked each round (server.site_sampling); a site that
    sits rounds out spends less than shown, which assumes it trains in every round.
    ``site_level_sampling_rate``: the site-sampling rate site-level DP's accountant may use (1 unless
    the sites are Poisson-sampled; ``SiteSampling.accountant_rate``).
    """
    t, p, rounds = cfg.train, cfg.privacy, cfg.federation.rounds
    prior = histogram_prior(cfg)
    by_size: dict[int, SitePlan] = {}
    sites = []
    for i, n in enumerate(site_records):
        if n not in by_size:  # sites of one size plan alike (an iid partition): calibrate once
            by_size[n] = plan_site(
                f"site-{i}",
                n,
                dp=p.enabled,
                target_epsilon=p.epsilon,
                delta=p.delta,
                batch_size=t.batch_size,
                local_steps=t.local_steps,
                rounds=rounds,
                accountant=p.accountant,
                prior=prior,
            )
        sites.append(replace(by_size[n], site=f"site-{i}"))
    lrs = tuple((r, round_lr(t.lr_schedule, t.lr, r, rounds, t.warmup_rounds, t.min_lr)) for r in shown_rounds(rounds))
    plan = PrivacyPlan(
        dp=p.enabled,
        epsilon=p.epsilon,
        delta=p.delta,
        accountant=p.accountant,
        rounds=rounds,
        local_steps=t.local_steps,
        optimizer=t.optimizer,
        lr_by_round=lrs,
        sites=tuple(sites),
        site_level=plan_site_level(cfg, site_level_sampling_rate),
        site_sampling_rate=site_sampling_rate,
    )
    return replace(plan, warnings=tuple(plan_warnings(cfg, plan)))


def _names(sites: Sequence[SitePlan]) -> str:
    names = [s.site for s in sites]
    return ", ".join(names) if len(names) <= 4 else f"{', '.join(names[:3])} and {len(names) - 3} more"


def adam_warning(cfg: FedtuneConfig, plan: PrivacyPlan) -> PlanWarning | None:
    """A fresh Adam each round, few noisy steps: close to sign descent on the noise.

    Adam divides the first moment by the root of the second (Kingma & Ba, ICLR 2015); its first step is
    exactly lr * sign(g), and while both moments hold only a few noisy gradients every coordinate moves
    by about lr whether its gradient is signal or noise, where SGD would move it in proportion.
    """
    t = cfg.train
    if not plan.dp or t.optimizer != "adam" or t.keep_optimizer_state or t.local_steps >= ADAM_FRESH_STEPS:
        return None
    noise = max((s.noise_on_mean for s in plan.sites if not s.problem), default=0.0)
    return PlanWarning(
        "fresh-adam-few-noisy-steps",
        "warning",
        f"train.optimizer = 'adam' starts afresh every round and takes {t.local_steps} noisy steps: a fresh Adam "
        "taking a few noisy steps is close to sign descent (every coordinate moves by about train.lr, signal or "
        f"noise; the noise on a step's mean gradient is up to {noise:.3g} x the clip norm per coordinate). Try "
        "train.optimizer = 'sgd' with full-batch steps (train.batch_size >= the largest site) and more rounds, "
        "as on Banking77 (docs/benchmarks.md), or train.keep_optimizer_state = true",
    )


def label_prior_note(cfg: FedtuneConfig, plan: PrivacyPlan) -> PlanWarning | None:
    """A classifier under strong DP that starts from a random head, when the label names could start it.

    At epsilon 1 on Banking77 the noise on each site's mean gradient outweighs the clipped signal, and a
    random head has 77 labels to learn from it; the label-name prior (common/models/label_prior.py) starts
    near a zero-shot answer from the agreed label list alone, at no cost in epsilon.
    """
    if not (plan.dp and cfg.task.classifies and cfg.model.head_init == "random" and plan.epsilon <= STRONG_DP_EPSILON):
        return None
    return PlanWarning(
        "random-head-strong-dp",
        "note",
        f"privacy.epsilon = {plan.epsilon:g} with a random classification head: the noise leaves little signal to "
        "learn a head from scratch; for an encoder with a linear head (BERT, MiniLM, DeBERTa-v2), model.head_init = "
        "'label_names' starts the head from the label names (zero-shot, no epsilon spent) and with a smaller "
        "train.lr keeps more of it (Banking77 at epsilon 1, docs/benchmarks.md)",
    )


def plan_warnings(cfg: FedtuneConfig, plan: PrivacyPlan) -> list[PlanWarning]:
    """Where these settings are known to waste the budget, or will not run; most serious first."""
    out: list[PlanWarning] = []
    refusing = [s for s in plan.sites if s.problem]
    for s in refusing:
        out.append(PlanWarning("site-refuses", "error", f"{s.site} ({s.records} records): {s.problem}"))
    if not plan.dp:
        out.append(
            PlanWarning(
                "no-dp",
                "note",
                "privacy.enabled = false: no record-level guarantee; the sites' updates carry their records unnoised",
            )
        )
    working = [s for s in plan.sites if not s.problem]
    if plan.dp and working:
        if (adam := adam_warning(cfg, plan)) is not None:
            out.append(adam)
        small = [s for s in working if s.expected_batch < SMALL_BATCH]
        if small:
            worst = max(small, key=lambda s: s.noise_on_mean)
            capped = [s for s in small if s.expected_batch == s.records]
            out.append(
                PlanWarning(
                    "small-batch",
                    "warning",
                    f"expected batch below {SMALL_BATCH} under DP on {_names(small)}: the noise on a step's mean "
                    f"gradient is sigma / B = {worst.noise_on_mean:.3g} x the clip norm per coordinate on "
                    f"{worst.site} (B = {worst.expected_batch}, sigma = {worst.noise_multiplier:.3g}); raise "
                    "train.batch_size"
                    + (" (up to a whole site: sample rate 1) and lower train.local_steps" if not capped else "")
                    + (
                        f"; {_names(capped)} already use every record in each step (n below train.batch_size): only "
                        "fewer steps (federation.rounds x train.local_steps) or a larger privacy.epsilon lower their "
                        "noise"
                        if capped
                        else ""
                    ),
                )
            )
        noisy = [s for s in working if s.noise_multiplier > HIGH_NOISE]
        if noisy:
            worst = max(noisy, key=lambda s: s.noise_multiplier)
            out.append(
                PlanWarning(
                    "high-noise",
                    "warning",
                    f"noise multiplier above {HIGH_NOISE:g} on {_names(noisy)} (up to {worst.noise_multiplier:.3g} on "
                    f"{worst.site}): {worst.total_steps} steps at sample rate {worst.sample_rate:.3g} must share "
                    f"epsilon {plan.epsilon:g}; fewer steps (federation.rounds x train.local_steps) or a larger "
                    "privacy.epsilon lower it",
                )
            )
        many = [s for s in working if s.passes > MANY_PASSES]
        if many:
            worst = max(many, key=lambda s: s.passes)
            out.append(
                PlanWarning(
                    "many-passes",
                    "warning",
                    f"{worst.total_steps} steps of expected batch {worst.expected_batch} pass over {worst.site}'s "
                    f"{worst.records} records {worst.passes:.0f} times ({_names(many)} above {MANY_PASSES:g}): every "
                    "step pays noise; fewer, larger steps (lower train.local_steps, raise train.batch_size) spend "
                    "the same epsilon with less noise on each",
                )
            )
    if (prior := label_prior_note(cfg, plan)) is not None:
        out.append(prior)
    if plan.site_sampling_rate < 1:
        out.append(
            PlanWarning(
                "sites-sampled",
                "note",
                f"{plan.site_sampling_rate:.0%} of the sites train each round: a site calibrates for every round, "
                "so one that sits rounds out ends below the epsilon shown",
            )
        )
    if plan.site_level is not None and plan.site_level.noise_multiplier == 0:
        out.append(
            PlanWarning(
                "site-level-no-noise",
                "warning",
                "privacy.site_level.noise_multiplier = 0: updates are clipped but no noise is added, "
                "so the site-level epsilon is infinite",
            )
        )
    order = {"error": 0, "warning": 1, "note": 2}
    return sorted(out, key=lambda w: order[w.severity])
