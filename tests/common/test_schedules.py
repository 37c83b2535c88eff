"""Learning-rate schedules across rounds (common.schedules), against values worked out by hand,
and the config checks that stop a schedule that cannot mean what its fields say."""

from __future__ import annotations

import pytest

from fedtune.common.config import ConfigError, load_config, preset_path
from fedtune.common.schedules import round_lr, schedule_problem

COS_QUARTER = 0.8535533905932737  # (1 + cos(pi / 4)) / 2
COS_THREE_QUARTERS = 0.14644660940672627  # (1 + cos(3 pi / 4)) / 2


@pytest.mark.parametrize(
    ("schedule", "warmup", "min_lr", "total", "expected"),
    [
        ("constant", 0, 0.0, 3, [0.1, 0.1, 0.1]),
        ("linear_warmup", 2, 0.0, 4, [0.05, 0.1, 0.1, 0.1]),
        ("linear_warmup", 4, 0.0, 4, [0.025, 0.05, 0.075, 0.1]),
        ("cosine", 0, 0.0, 4, [0.1, 0.1 * COS_QUARTER, 0.05, 0.1 * COS_THREE_QUARTERS]),
        ("cosine", 1, 0.02, 3, [0.1, 0.1, 0.06]),
        ("cosine", 2, 0.0, 4, [0.05, 0.1, 0.1, 0.05]),
        ("cosine", 0, 0.1, 3, [0.1, 0.1, 0.1]),  # a floor at lr: constant
    ],
)
def test_each_schedule_gives_the_hand_worked_rate_of_every_round(schedule, warmup, min_lr, total, expected):
    rates = [round_lr(schedule, 0.1, r, total, warmup, min_lr) for r in range(1, total + 1)]
    assert rates == pytest.approx(expected, rel=1e-12)


def test_no_round_trains_at_zero_and_none_above_lr():
    for schedule, warmup in (("linear_warmup", 5), ("cosine", 0), ("cosine", 3)):
        rates = [round_lr(schedule, 0.2, r, 10, warmup) for r in range(1, 11)]
        assert all(0 < rate <= 0.2 for rate in rates), (schedule, rates)
    cosine = [round_lr("cosine", 0.2, r, 10, 0, 0.05) for r in range(1, 11)]
    assert cosine == sorted(cosine, reverse=True) and min(cosine) > 0.05


def test_rounds_outside_the_run_and_unknown_schedules_are_errors():
    with pytest.raises(ValueError, match="round 0 is outside 1..3"):
        round_lr("constant", 0.1, 0, 3)
    with pytest.raises(ValueError, match="unknown learning-rate schedule 'step'"):
        round_lr("step", 0.1, 1, 3)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (['train.lr_schedule="constant"', "train.warmup_rounds=2"], "train.warmup_rounds = 2 has no effect"),
        (['train.lr_schedule="linear_warmup"'], "needs train.warmup_rounds >= 1"),
        (['train.lr_schedule="cosine"', "train.warmup_rounds=9", "federation.rounds=4"], "exceeds federation.rounds"),
        (['train.lr_schedule="cosine"', "train.min_lr=100.0"], "train.min_lr = 100.0 is above train.lr"),
        (['train.lr_schedule="linear_warmup"', "train.warmup_rounds=1", "train.min_lr=0.001"], "'cosine' only"),
    ],
)
def test_a_schedule_whose_fields_disagree_is_refused_naming_them(changes, message):
    with pytest.raises(ConfigError, match=message):
        load_config(preset_path("banking77-minilm"), changes)


def test_a_sound_schedule_loads_and_has_no_problem():
    cfg = load_config(
        preset_path("banking77-minilm"), ['train.lr_schedule="cosine"', "train.warmup_rounds=1", "train.min_lr=0.001"]
    )
    t = cfg.train
    assert schedule_problem(t.lr_schedule, t.lr, cfg.federation.rounds, t.warmup_rounds, t.min_lr) is None


def test_the_server_sends_each_round_its_scheduled_rate():
    from fedtune.common.wire import TrainPlan
    from fedtune.server.federation import training_plan

    cfg = load_config(
        preset_path("banking77-minilm"),
        ['train.lr_schedule="linear_warmup"', "train.warmup_rounds=2", "train.lr=0.02", "federation.rounds=3"],
    )
    lrs = [TrainPlan.from_record(training_plan(cfg, "run", r, "")).lr for r in (1, 2, 3)]
    assert lrs == pytest.approx([0.01, 0.02, 0.02])
