"""A train plan for tests: every field set to something plausible, any of them overridden by name."""

from __future__ import annotations

from typing import Any

from fedtune.common.wire import TrainPlan


def train_plan(**changes: Any) -> TrainPlan:
    fields: dict[str, Any] = dict(
        run_id="run",
        round=1,
        total_rounds=2,
        local_steps=1,
        batch_size=8,
        lr=0.1,
        optimizer="sgd",
        dp=True,
        target_epsilon=8.0,
        delta=1e-4,
        max_grad_norm=1.0,
    )
    return TrainPlan(**{**fields, **changes})
