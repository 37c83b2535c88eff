"""Experiment tracking (server/tracking.py): TensorBoard event files and MLflow runs, read back.

The event files are read with TensorBoard's own reader, the MLflow run with MLflow's client from
a local file store: what a person opening either tool would see.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import pytest

from fedtune.common.config import load_config, preset_path
from fedtune.server.report import MetricsLog
from fedtune.server.tracking import (
    LOCAL_MLFLOW_DIR,
    ROUND_SECONDS,
    STATE_FILE,
    TENSORBOARD_DIR,
    MlflowBackend,
    TensorBoardBackend,
    Tracker,
    TrackingError,
    TrackingState,
    flatten_config,
    metric_name,
    round_scalars,
)

SITES = ("site-0", "site-1")


def _record(round_: int, accuracy: float | None = None) -> dict[str, Any]:
    """A round's record shaped as FederationServer.run appends it to metrics.jsonl."""
    accuracy = 0.1 * round_ if accuracy is None else accuracy
    if round_ == 0:
        return {"round": 0, "server": {"accuracy": 0.05, "loss": 3.0}, "clients": {}, "status": "base model"}
    return {
        "round": round_,
        "server": {"accuracy": accuracy, "loss": 3.0 - accuracy, "macro-f1": accuracy / 2},
        "clients": {s: {"accuracy": accuracy + i / 100, "loss": 2.0} for i, s in enumerate(SITES)},
        "sampled": 2,
        "connected": 3,
        "train": {
            s: {
                "num-examples": 100,
                "steps": 10,
                "epsilon": 2.0 * round_ + i,
                "noise-multiplier": 1.1,
                "sample-rate": 0.32,
                "bytes-sent": 1000 * (i + 1),
                "bytes-received": 500,
            }
            for i, s in enumerate(SITES)
        },
        "refused": {"site-2": "budget spent"},
        "failed": {},
        "status": "aggregated 2 sites",
        "site-level-epsilon": 0.5 * round_,
        "site-level-epsilon-without-sampling": 0.7 * round_,
        ROUND_SECONDS: 12.5 + round_,
    }


def _scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series TensorBoard would draw from ``log_dir`` (a folder, or one event file)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _event_files(run_dir: Path) -> list[Path]:
    return sorted((run_dir / TENSORBOARD_DIR).glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime_ns)


def _tensorboard(run_dir: Path, metrics: MetricsLog) -> Tracker:
    return Tracker([TensorBoardBackend(run_dir / TENSORBOARD_DIR)], metrics, run_dir / STATE_FILE)


def _rounds(tracker: Tracker, metrics: MetricsLog, rounds: range) -> None:
    """What FederationServer.run does with each round's record: append it, then feed the tracker."""
    for round_ in rounds:
        metrics.append(_record(round_))
        tracker.log_round(_record(round_))


def test_a_rounds_record_becomes_one_scalar_per_metric_site_and_quantity():
    record = _record(2)
    record["train"]["site-1"]["epsilon"] = float("inf")  # a site without DP: no epsilon curve
    record["server"]["early"] = True  # not a number
    scalars = round_scalars(record)
    assert scalars["server/accuracy"] == pytest.approx(0.2)
    assert scalars["server/macro-f1"] == pytest.approx(0.1)
    assert scalars["site-validation/accuracy/site-1"] == pytest.approx(0.21)
    assert scalars["epsilon/site-0"] == 4.0 and "epsilon/site-1" not in scalars
    assert scalars["epsilon/max"] == 4.0
    assert scalars["noise-multiplier/site-1"] == 1.1 and scalars["steps/site-0"] == 10
    assert scalars["bytes-sent/site-1"] == 2000 and scalars["traffic/bytes-sent"] == 3000
    assert scalars["traffic/bytes-received"] == 1000
    assert scalars["round/seconds"] == 14.5
    assert (scalars["round/sites-trained"], scalars["round/sites-refused"], scalars["round/sites-sampled"]) == (2, 1, 2)
    assert scalars["site-level/epsilon"] == 1.0 and scalars["site-level/epsilon-without-sampling"] == 1.4
    assert "server/early" not in scalars
    assert set(round_scalars(_record(0))) == {"server/accuracy", "server/loss"}


def test_a_site_id_with_any_characters_makes_a_name_mlflow_accepts():
    assert metric_name("epsilon", "Hôpital #3 (Lyon)") == "epsilon/H_pital _3 _Lyon_"


def test_every_round_lands_in_tensorboard_once_base_model_included(tmp_path):
    metrics = MetricsLog(tmp_path / "metrics.jsonl")
    metrics.append(_record(0))  # the server appends round 0 before any round's hook
    tracker = _tensorboard(tmp_path, metrics)
    _rounds(tracker, metrics, range(1, 4))
    tracker.close()
    scalars = _scalars(tmp_path / TENSORBOARD_DIR)
    assert [s for s, _ in scalars["server/accuracy"]] == [0, 1, 2, 3]
    assert [v for _, v in scalars["server/accuracy"]] == pytest.approx([0.05, 0.1, 0.2, 0.3])  # float32
    assert [s for s, _ in scalars["epsilon/site-1"]] == [1, 2, 3]
    assert scalars["epsilon/site-1"][-1][1] == 7.0
    assert scalars["site-validation/accuracy/site-0"][0] == (1, pytest.approx(0.1))
    assert scalars["bytes-received/site-0"] == [(1, 500), (2, 500), (3, 500)]
    assert scalars["round/seconds"] == [(1, 13.5), (2, 14.5), (3, 15.5)]
    assert scalars["site-level/epsilon"][-1] == (3, 1.5)
    assert json.loads((tmp_path / STATE_FILE).read_text())["last-round"] == 3


def test_a_resumed_run_writes_only_its_new_rounds(tmp_path):
    metrics = MetricsLog(tmp_path / "metrics.jsonl")
    metrics.append(_record(0))
    _rounds(_tensorboard(tmp_path, metrics), metrics, range(1, 3))  # the server dies after round 2, unclosed
    resumed = _tensorboard(tmp_path, metrics)  # a new server process, same run directory
    _rounds(resumed, metrics, range(3, 5))
    resumed.close()
    first, second = _event_files(tmp_path)
    assert [s for s, _ in _scalars(second)["server/accuracy"]] == [3, 4], "rounds 0-2 must not be written again"
    assert [s for s, _ in _scalars(tmp_path / TENSORBOARD_DIR)["server/accuracy"]] == [0, 1, 2, 3, 4]


def test_a_redone_round_replaces_what_the_lost_attempt_wrote(tmp_path):
    metrics = MetricsLog(tmp_path / "metrics.jsonl")
    metrics.append(_record(0))
    _rounds(_tensorboard(tmp_path, metrics), metrics, range(1, 4))
    metrics.keep_through(2)  # round 3's checkpoint was lost: the resumed server trains it again
    resumed = _tensorboard(tmp_path, metrics)
    metrics.append(_record(3, accuracy=0.9))
    resumed.log_round(_record(3, accuracy=0.9))
    resumed.close()
    series = _scalars(tmp_path / TENSORBOARD_DIR)["server/accuracy"]
    assert [s for s, _ in series] == [0, 1, 2, 3] and series[-1][1] == pytest.approx(0.9)


def test_a_run_started_before_tracking_gets_its_earlier_rounds_at_the_first_hook(tmp_path):
    metrics = MetricsLog(tmp_path / "metrics.jsonl")
    for round_ in range(3):
        metrics.append(_record(round_))
    tracker = _tensorboard(tmp_path, metrics)
    _rounds(tracker, metrics, range(3, 4))
    tracker.close()
    assert [s for s, _ in _scalars(tmp_path / TENSORBOARD_DIR)["server/accuracy"]] == [0, 1, 2, 3]


class _Broken:
    name = "broken"

    def write(self, records):
        raise ConnectionError("tracking server unreachable")

    def finish(self, artifacts):
        raise ConnectionError("tracking server unreachable")


def test_a_failing_backend_is_logged_and_the_others_still_get_every_round(tmp_path, caplog):
    metrics = MetricsLog(tmp_path / "metrics.jsonl")
    tracker = Tracker([_Broken(), TensorBoardBackend(tmp_path / TENSORBOARD_DIR)], metrics, tmp_path / STATE_FILE)
    with caplog.at_level(logging.WARNING, logger="fedtune.tracking"):
        _rounds(tracker, metrics, range(0, 2))
        tracker.close()
    assert "broken tracking skipped round(s) [0]: tracking server unreachable" in caplog.text
    assert [s for s, _ in _scalars(tmp_path / TENSORBOARD_DIR)["server/accuracy"]] == [0, 1]


def _config(*overrides: str):
    return load_config(preset_path("banking77-minilm"), ["train.lr=0.02", *overrides])


def test_the_config_turns_tensorboard_on_by_default_and_off_on_request(tmp_path):
    assert [b.name for b in Tracker.for_run(_config(), tmp_path, MetricsLog(tmp_path / "m.jsonl")).backends] == [
        "tensorboard"
    ]
    off = Tracker.for_run(_config("tracking.tensorboard=false"), tmp_path, MetricsLog(tmp_path / "m.jsonl"))
    off.log_round(_record(0))
    off.close()
    assert off.backends == [] and not (tmp_path / TENSORBOARD_DIR).exists()


def test_the_config_is_flattened_into_mlflow_params():
    params = flatten_config({"train": {"lr": 0.02, "optimizer": "adam"}, "lora": {"target_modules": ["q", "v"]}})
    assert params == {"train.lr": "0.02", "train.optimizer": "adam", "lora.target_modules": '["q", "v"]'}


def test_mlflow_missing_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)  # import fails as if not installed
    with pytest.raises(TrackingError, match=r"pip install 'fedtune\[mlflow\]'"):
        Tracker.for_run(_config("tracking.mlflow_uri='local'"), tmp_path, MetricsLog(tmp_path / "m.jsonl"))


def test_mlflow_unreachable_fails_at_start_naming_the_field(tmp_path):
    pytest.importorskip("mlflow", reason="MLflow is optional: pip install 'fedtune[mlflow]'")
    with pytest.raises(TrackingError, match="tracking.mlflow_uri = 'nosuchscheme://x'"):
        MlflowBackend("nosuchscheme://x", "e", "r", "", {})


def test_mlflow_local_store_holds_params_round_metrics_and_artifacts_across_a_resume(tmp_path):
    pytest.importorskip("mlflow", reason="MLflow is optional: pip install 'fedtune[mlflow]'")
    from mlflow.tracking import MlflowClient

    cfg = _config("tracking.mlflow_uri='local'", "tracking.mlflow_experiment='hospitals'", "tracking.tensorboard=false")
    metrics = MetricsLog(tmp_path / "metrics.jsonl")
    metrics.append(_record(0))
    _rounds(Tracker.for_run(cfg, tmp_path, metrics), metrics, range(1, 3))  # the server dies after round 2
    resumed = Tracker.for_run(cfg, tmp_path, metrics)
    _rounds(resumed, metrics, range(3, 4))
    (tmp_path / "summary.txt").write_text("round table\n")
    (tmp_path / "curves.png").write_bytes(b"\x89PNG")
    resumed.close([tmp_path / "summary.txt", tmp_path / "curves.png", tmp_path / "absent.json"])

    client = MlflowClient(tracking_uri=(tmp_path / LOCAL_MLFLOW_DIR).as_uri())
    experiment = client.get_experiment_by_name("hospitals")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, "the resumed server must continue the same MLflow run"
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == tmp_path.name
    assert run.data.params["train.lr"] == "0.02" and run.data.params["privacy.epsilon"] == "8.0"
    assert run.data.params["federation.rounds"] == str(cfg.federation.rounds)
    history = client.get_metric_history(run.info.run_id, "server/accuracy")
    assert sorted((m.step, round(m.value, 6)) for m in history) == [(0, 0.05), (1, 0.1), (2, 0.2), (3, 0.3)]
    assert [m.value for m in client.get_metric_history(run.info.run_id, "epsilon/site-0")] == [2.0, 4.0, 6.0]
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"summary.txt", "curves.png"}


def test_the_server_feeds_the_tracker_every_round_with_its_wall_time(tmp_path, monkeypatch):
    """FederationServer.run and finish, their Flower calls stubbed: the hook writes rounds 0..N and closes."""
    from fedtune.server import federation
    from fedtune.server.federation import FederationServer

    cfg = _config("federation.rounds=2", "secure_aggregation.enabled=false")
    (tmp_path / "run.json").write_text(json.dumps({"run-id": "r"}))
    monkeypatch.setattr(federation, "wait_for_nodes", lambda *a, **k: [1, 2, 3])
    server = FederationServer(cfg, model=_StubModel(), test_set=None, run_dir=tmp_path)  # type: ignore[arg-type]
    monkeypatch.setattr(server, "evaluate_round", lambda grid, nodes, r: _record(0) | {"round": r})
    tracked_before: list[int] = []  # the last round tracked as each round starts: the hook runs every round

    def train_round(grid, nodes, round_):
        tracked_before.append(TrackingState.read(tmp_path / STATE_FILE).last_round)
        return {**_record(round_), ROUND_SECONDS: None}

    monkeypatch.setattr(server, "train_round", train_round)
    monkeypatch.setattr(server.store, "save", lambda *a, **k: None)
    server.finish(server.run(grid=None, resume=False))  # type: ignore[arg-type]
    records = MetricsLog(tmp_path / "metrics.jsonl").read()
    assert all(isinstance(r[ROUND_SECONDS], float) and r[ROUND_SECONDS] >= 0 for r in records[1:])
    scalars = _scalars(tmp_path / TENSORBOARD_DIR)
    assert [s for s, _ in scalars["server/accuracy"]] == [0, 1, 2]
    assert [s for s, _ in scalars["round/seconds"]] == [1, 2]
    assert tracked_before == [-1, 1], "each round is tracked as it ends, not only when the run finishes"


class _StubModel:
    """Stands in for GlobalModel where FederationServer.finish touches it."""

    model = None

    def export_merged(self, *args):
        return None
