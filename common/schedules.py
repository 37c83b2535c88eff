"""Learning-rate schedules across the federation: the local learning rate of round r of R.

The schedule moves once a round, not within one: the server puts round r's rate in that round's
train plan (``TrainPlan.lr``), so a site needs no knowledge of the schedule and every site of a
round trains at the same rate. Rounds count from 1 (round 0 is the base model, never trained).

- ``constant``: ``lr`` every round.
- ``linear_warmup``: ``lr * r / W`` over the first ``W = warmup_rounds`` rounds, then ``lr``
  (Goyal et al., "Accurate, Large Minibatch SGD", 2017). Round 1 trains at ``lr / W``, never at 0:
  under DP a round at rate 0 would spend privacy budget for nothing.
- ``cosine``: the same warm-up, then half a cosine from ``lr`` (round W + 1) towards ``min_lr``
  (Loshchilov & Hutter, "SGDR", ICLR 2017, without restarts), which it would reach one round after
  the last: ``min_lr + (lr - min_lr) * (1 + cos(pi * (r - W - 1) / (R - W))) / 2``. So no round
  trains at ``min_lr = 0``, which under DP would spend a round's budget on no step at all.

Every rate lies in ``(0, lr]`` and at or above ``min_lr`` after warm-up: ``lr`` stays the largest step a
site takes, which is what secure aggregation's automatic clip range is derived from.
"""

from __future__ import annotations

import math
from typing import Literal

Schedule = Literal["constant", "linear_warmup", "cosine"]
SCHEDULES: tuple[str, ...] = ("constant", "linear_warmup", "cosine")


def round_lr(
    schedule: str, lr: float, round_: int, total_rounds: int, warmup_rounds: int = 0, min_lr: float = 0.0
) -> float:
    """The learning rate of round ``round_`` (1..``total_rounds``) under ``schedule``."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {schedule!r}: use one of {', '.join(SCHEDULES)}")
    if not 1 <= round_ <= total_rounds:
        raise ValueError(f"round {round_} is outside 1..{total_rounds}")
    if schedule == "constant":
        return lr
    if round_ <= warmup_rounds:
        return lr * (round_ / warmup_rounds)  # exactly lr at round W
    if schedule == "linear_warmup":
        return lr
    progress = (round_ - warmup_rounds - 1) / (total_rounds - warmup_rounds)  # 0 at round W + 1; < 1 at round R
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def schedule_problem(schedule: str, lr: float, total_rounds: int, warmup_rounds: int, min_lr: float) -> str | None:
    """Why these settings make no schedule (a sentence naming the fields), or None."""
    if schedule == "constant" and warmup_rounds:
        return (
            f"train.warmup_rounds = {warmup_rounds} has no effect with train.lr_schedule = 'constant': "
            "set train.lr_schedule = 'linear_warmup' or 'cosine', or train.warmup_rounds = 0"
        )
    if schedule == "linear_warmup" and warmup_rounds < 1:
        return "train.lr_schedule = 'linear_warmup' needs train.warmup_rounds >= 1"
    if warmup_rounds > total_rounds:
        return (
            f"train.warmup_rounds = {warmup_rounds} exceeds federation.rounds = {total_rounds}: the run would end "
            "before the learning rate reached train.lr"
        )
    if min_lr and schedule != "cosine":
        return (
            f"train.min_lr = {min_lr} applies to train.lr_schedule = 'cosine' only (the floor it decays to): "
            "set train.lr_schedule = 'cosine', or train.min_lr = 0"
        )
    if min_lr > lr:
        return f"train.min_lr = {min_lr} is above train.lr = {lr}: the cosine schedule decays from train.lr to it"
    return None
