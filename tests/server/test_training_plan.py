"""The training plan the server sends carries the config's local-training settings, FedProx's mu among them."""

from __future__ import annotations

from fedtune.common.config import load_config, preset_path
from fedtune.common.wire import PROTOCOL_VERSION, TrainPlan
from fedtune.server.federation import training_plan


def test_the_plan_carries_proximal_mu_under_the_current_protocol():
    cfg = load_config(preset_path("banking77-minilm"), ["train.proximal_mu=0.05"])
    plan = TrainPlan.from_record(training_plan(cfg, "run-1", 2, ""))
    assert plan.proximal_mu == 0.05 and plan.protocol_version == PROTOCOL_VERSION >= 2
    off = TrainPlan.from_record(training_plan(load_config(preset_path("banking77-minilm")), "run-1", 2, ""))
    assert off.proximal_mu == 0.0
