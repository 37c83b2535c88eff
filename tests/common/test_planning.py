"""DP-aware planning (common/privacy/planning.py): the numbers are the site's and the ledger's, each warning fires.

A plan is only worth reading if a site will do exactly what it says: the noise multiplier is checked
against the calibration a site runs (client.site), epsilon round by round against a ledger charged
round by round, as a site's is. Each warning has a config that raises it and one that does not.
"""

from __future__ import annotations

import pytest

from fedtune.common.config import load_config, preset_path
from fedtune.common.privacy.accounting import calibrate_noise
from fedtune.common.privacy.ledger import PrivacyLedger
from fedtune.common.privacy.planning import (
    ADAM_FRESH_STEPS,
    HIGH_NOISE,
    MANY_PASSES,
    SHOWN_ROUNDS,
    SMALL_BATCH,
    STRONG_DP_EPSILON,
    PrivacyPlan,
    SitePlan,
    plan_privacy,
    plan_site,
    plan_warnings,
    shown_rounds,
)
from fedtune.common.privacy.site_level import site_level_epsilons
from fedtune.common.schedules import round_lr

# The default preset's schedule before it was tuned for DP: the case the planner's warnings are about.
OLD_DEMO_SCHEDULE = (
    "train.optimizer='adam'",
    "train.local_steps=20",
    "train.batch_size=64",
    "train.lr=0.02",
    "federation.rounds=4",
    "lora.alpha=16",
)

SIZES = [1000, 1000, 1000]


def _cfg(*overrides: str):
    """The default preset (3 banks, adam, 20 steps of 64, 4 rounds, epsilon 8, delta 1e-4), overridden."""
    return load_config(preset_path("banking77-minilm"), [*OLD_DEMO_SCHEDULE, *overrides])


def _codes(plan) -> set[str]:
    return {w.code for w in plan.warnings}


def test_the_noise_multiplier_is_the_one_the_site_calibrates():
    site = plan_site("site-0", 500, dp=True, target_epsilon=8.0, delta=1e-5, batch_size=32, local_steps=10, rounds=4)
    # client.site.Site.train: batch min(batch_size, n), q = batch / n, calibrated for rounds x local_steps.
    assert (site.expected_batch, site.sample_rate, site.total_steps) == (32, 32 / 500, 40)
    assert site.noise_multiplier == calibrate_noise(8.0, 1e-5, 32 / 500, 40, "rdp")
    assert site.noise_on_mean == pytest.approx(site.noise_multiplier / 32)
    assert site.passes == pytest.approx(40 * 32 / 500)


def test_epsilon_after_each_round_is_what_the_sites_ledger_records(tmp_path):
    site = plan_site("site-0", 500, dp=True, target_epsilon=8.0, delta=1e-5, batch_size=32, local_steps=10, rounds=4)
    ledger = PrivacyLedger.open(tmp_path / "ledger.json", 1e-5)
    for round_, planned in site.epsilon_by_round:
        ledger.record("run", round_, site.noise_multiplier, site.sample_rate, 10)
        assert planned == pytest.approx(ledger.epsilon, rel=1e-9), f"round {round_}"
    assert [r for r, _ in site.epsilon_by_round] == [1, 2, 3, 4]
    assert 8.0 - 0.02 <= site.final_epsilon <= 8.0  # calibrated to 0.01 in epsilon, never over


def test_the_label_histogram_of_balanced_weighting_is_charged_before_training(tmp_path):
    cfg = _cfg("train.class_weighting='balanced'", "privacy.histogram_noise=4.0")
    plan = plan_privacy(cfg, [1000])
    site = plan.sites[0]
    ledger = PrivacyLedger.open(tmp_path / "ledger.json", cfg.privacy.delta)
    ledger.record("run", 1, 4.0, 1.0, 1, mechanism="label-histogram")  # as client.site charges it
    for round_, planned in site.epsilon_by_round:
        ledger.record("run", round_, site.noise_multiplier, site.sample_rate, cfg.train.local_steps)
        assert planned == pytest.approx(ledger.epsilon, rel=1e-9)
    unweighted = plan_privacy(_cfg(), [1000]).sites[0]
    assert site.noise_multiplier > unweighted.noise_multiplier  # the histogram took part of the budget
    assert site.final_epsilon <= cfg.privacy.epsilon


def test_a_batch_larger_than_the_site_uses_every_record_each_step():
    site = plan_site("site-0", 40, dp=True, target_epsilon=8, delta=1e-3, batch_size=64, local_steps=2, rounds=2)
    assert (site.expected_batch, site.sample_rate) == (40, 1.0)
    assert site.noise_multiplier == calibrate_noise(8, 1e-3, 1.0, 4, "rdp")


def test_sites_of_one_size_share_a_plan_and_keep_their_names():
    plan = plan_privacy(_cfg(), [1000, 1000, 800])
    assert [s.site for s in plan.sites] == ["site-0", "site-1", "site-2"]
    assert plan.sites[0].noise_multiplier == plan.sites[1].noise_multiplier != plan.sites[2].noise_multiplier


def test_a_delta_not_below_one_over_n_is_an_error_naming_the_site():
    plan = plan_privacy(_cfg("privacy.delta=0.002"), [100, 1000])  # the larger site is bound first
    assert plan.sites[1].problem and not plan.sites[0].problem
    errors = [w for w in plan.warnings if w.severity == "error"]
    assert [w.code for w in errors] == ["site-refuses"] and "site-1 (1000 records)" in errors[0].message
    assert plan.warnings[0] is errors[0], "errors come first"


def _site(records: int = 1000, batch: int = 64, noise: float = 1.0, steps: int = 80, problem: str = "") -> SitePlan:
    """A site's plan as plan_site would make it, without the seconds a calibration takes."""
    return SitePlan(
        site="site-0",
        records=records,
        expected_batch=min(batch, records),
        sample_rate=min(1.0, batch / records),
        steps_per_round=steps // 4,
        total_steps=steps,
        noise_multiplier=noise,
        epsilon_by_round=((4, 8.0),),
        problem=problem,
    )


def _warned(cfg, *sites: SitePlan) -> set[str]:
    """The warning codes of a plan of ``sites`` under ``cfg`` (its other figures do not matter here)."""
    plan = PrivacyPlan(
        dp=cfg.privacy.enabled,
        epsilon=cfg.privacy.epsilon,
        delta=cfg.privacy.delta,
        accountant="rdp",
        rounds=4,
        local_steps=cfg.train.local_steps,
        optimizer=cfg.train.optimizer,
        lr_by_round=(),
        sites=sites,
        site_level=None,
        site_sampling_rate=1.0,
    )
    return {w.code for w in plan_warnings(cfg, plan)}


def test_a_fresh_adam_taking_few_noisy_steps_is_flagged():
    warned = plan_privacy(_cfg(), SIZES)  # the demo's settings: adam, 20 steps a round, a fresh optimiser
    adam = next(w for w in warned.warnings if w.code == "fresh-adam-few-noisy-steps")
    assert adam.severity == "warning" and "close to sign descent" in adam.message and "sgd" in adam.message
    assert "fresh-adam-few-noisy-steps" not in _warned(_cfg("train.optimizer='sgd'"), _site())
    assert "fresh-adam-few-noisy-steps" not in _warned(_cfg("train.keep_optimizer_state=true"), _site())
    assert "fresh-adam-few-noisy-steps" not in _warned(_cfg("privacy.enabled=false"), _site())
    assert "fresh-adam-few-noisy-steps" not in _warned(_cfg(f"train.local_steps={ADAM_FRESH_STEPS}"), _site())


def test_a_random_classifier_head_under_strong_dp_gets_the_label_prior_note():
    strong = plan_privacy(_cfg(f"privacy.epsilon={STRONG_DP_EPSILON}", "train.optimizer='sgd'"), SIZES)
    note = next(w for w in strong.warnings if w.code == "random-head-strong-dp")
    assert note.severity == "note" and "model.head_init = 'label_names'" in note.message
    assert "random-head-strong-dp" not in _codes(plan_privacy(_cfg("privacy.epsilon=4.0"), SIZES))
    with_prior = _cfg("privacy.epsilon=1.0", "model.head_init='label_names'")
    assert "random-head-strong-dp" not in _codes(plan_privacy(with_prior, SIZES))
    generative = load_config(preset_path("medquad-smollm2"), ["privacy.epsilon=1.0"])
    assert "random-head-strong-dp" not in _codes(plan_privacy(generative, [100] * 9))


def test_a_small_expected_batch_under_dp_is_flagged():
    cfg = _cfg()
    assert "small-batch" in _warned(cfg, _site(batch=SMALL_BATCH - 1))
    assert "small-batch" not in _warned(cfg, _site(batch=SMALL_BATCH))
    assert "small-batch" not in _warned(_cfg("privacy.enabled=false"), _site(batch=16))
    plan = plan_privacy(cfg, [1000, 50])  # site-1 has fewer records than the batch: every record a step already
    message = next(w.message for w in plan.warnings if w.code == "small-batch")
    assert "site-1" in message and "already use every record in each step" in message


def test_a_noise_multiplier_above_five_is_flagged():
    cfg = _cfg()
    assert "high-noise" in _warned(cfg, _site(noise=HIGH_NOISE + 0.1))
    assert "high-noise" not in _warned(cfg, _site(noise=HIGH_NOISE))


def test_many_passes_over_the_data_are_flagged():
    cfg = _cfg()
    assert "many-passes" in _warned(cfg, _site(records=1000, batch=500, steps=100))  # 50 passes
    assert "many-passes" not in _warned(cfg, _site(records=1000, batch=250, steps=int(MANY_PASSES * 4)))  # 20
    assert "many-passes" not in _warned(_cfg("privacy.enabled=false"), _site(batch=500, steps=100))


def test_a_site_that_will_refuse_raises_no_budget_warning():
    assert _warned(_cfg(), _site(batch=8, noise=9.0, problem="delta too large")) == {"site-refuses"}


def test_no_dp_is_a_note_with_no_noise_or_epsilon():
    plan = plan_privacy(_cfg("privacy.enabled=false"), SIZES)
    assert _codes(plan) == {"no-dp"} and plan.warnings[0].severity == "note"
    assert all(s.noise_multiplier == 0 and s.epsilon_by_round == () for s in plan.sites)


def test_site_sampling_is_a_note_and_site_level_epsilon_follows_its_accountant():
    cfg = _cfg(
        "privacy.site_level.enabled=true",
        "privacy.site_level.noise_multiplier=1.5",
        "federation.fraction_per_round=0.7",
        "federation.poisson_sampling=true",
    )
    plan = plan_privacy(cfg, SIZES, site_sampling_rate=0.7, site_level_sampling_rate=0.7)
    assert "sites-sampled" in _codes(plan)
    level = plan.site_level
    assert level is not None and level.noise_multiplier == 1.5 and level.sampling_rate == 0.7
    for r, eps in level.epsilon_by_round:
        expected = site_level_epsilons(1.5, r, cfg.privacy.site_level.delta, 0.7)
        assert eps == expected.epsilon
        assert dict(level.epsilon_without_sampling_by_round)[r] == expected.epsilon_without_sampling
    assert level.epsilon_by_round[-1][1] < level.epsilon_without_sampling_by_round[-1][1]
    assert plan_privacy(_cfg(), SIZES).site_level is None


def test_site_level_dp_without_noise_is_flagged():
    cfg = _cfg("privacy.site_level.enabled=true", "privacy.site_level.noise_multiplier=0")
    assert "site-level-no-noise" in _codes(plan_privacy(cfg, SIZES))


def test_the_learning_rate_of_each_round_follows_the_schedule():
    cfg = _cfg("train.lr_schedule='cosine'", "train.warmup_rounds=1", "train.min_lr=0.001")
    plan = plan_privacy(cfg, SIZES)
    assert plan.lr_by_round == tuple((r, round_lr("cosine", 0.02, r, 4, 1, 0.001)) for r in range(1, 5))
    assert len({lr for _, lr in plan.lr_by_round}) > 1


def test_a_long_run_shows_a_bounded_number_of_rounds_first_and_last_included():
    assert shown_rounds(5) == [1, 2, 3, 4, 5]
    long = shown_rounds(1000)
    assert long[0] == 1 and long[-1] == 1000 and len(long) <= SHOWN_ROUNDS and long == sorted(set(long))
