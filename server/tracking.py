"""Experiment tracking: every round's record as TensorBoard scalars and, optionally, MLflow metrics.

``metrics.jsonl`` stays the run's record of truth; the trackers are views of it in the tools ML
teams already use to compare runs. The server feeds :class:`Tracker` each round's record right
after appending it to the log (``tracking.*`` in the config says which backends are on).

Each round is written once: ``RUN_DIR/tracking.json`` keeps the last round written, so a resumed
run adds only its new rounds, and the first call of a server process also writes the earlier rounds
of the log not written yet (round 0, the base model, or a run started before tracking was on).
A round redone after a crash is rewritten with TensorBoard's ``purge_step``, which hides what the
lost attempt had written. A tracking backend that fails mid-run (an MLflow server gone away) is
logged and skipped: the federation goes on, and ``metrics.jsonl`` still has every round.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from fedtune.common.atomic_files import atomic_write_json
from fedtune.common.config import FedtuneConfig, config_to_toml_dict
from fedtune.server.report import MetricsLog

log = logging.getLogger("fedtune.tracking")

#: Where a run's TensorBoard event files go, under its run directory.
TENSORBOARD_DIR = "tensorboard"
#: ``tracking.mlflow_uri`` value for a file store inside the run directory.
LOCAL_MLFLOW = "local"
#: Where ``tracking.mlflow_uri = "local"`` keeps its store, under the run directory.
LOCAL_MLFLOW_DIR = "mlruns"
#: The tracker's own state in the run directory: the last round written, the MLflow run continued on resume.
STATE_FILE = "tracking.json"
#: The key of a round's wall time (seconds) in its record.
ROUND_SECONDS = "round-seconds"

#: A site's training entry in a round's ``train``: the keys that become one curve per site.
TRAIN_KEYS = ("epsilon", "noise-multiplier", "sample-rate", "steps", "bytes-sent", "bytes-received")
#: Site-level DP keys of a round's record (server.site_level_privacy.epsilon_record).
SITE_LEVEL_KEYS = ("site-level-epsilon", "site-level-epsilon-without-sampling")
#: What MLflow accepts in a metric or param name; anything else becomes "_".
_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_\-. /:]")
#: MLflow's cap on a param's value (its stores hold 6000 characters since 2.x).
_PARAM_CHARS = 6000
#: MLflow's cap on the entries of one log_batch call.
_BATCH = 1000


class TrackingError(RuntimeError):
    """A tracking backend that cannot start; the message names the ``tracking.*`` field and what to do."""


def metric_name(*parts: str) -> str:
    """A tag TensorBoard groups by its first part and MLflow accepts (a site id may hold any character)."""
    return "/".join(_NAME_UNSAFE.sub("_", str(p)) for p in parts)


def _number(value: Any) -> float | None:
    """A finite float, else None: booleans, text and infinities (epsilon without DP) make no curve."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def round_scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """The scalars of one round's record (as in metrics.jsonl), by tag.

    ``server/<metric>``: held-out metrics; ``site-validation/<metric>/<site>``: what sites share;
    ``<key>/<site>`` for each site's epsilon, noise multiplier, sample rate, steps and bytes, with
    ``epsilon/max`` and ``traffic/bytes-*`` over the sites; ``round/*``: wall time and site counts;
    ``site-level/*``: site-level epsilon when privacy.site_level is on.
    """
    out: dict[str, float] = {}

    def put(tag: str, value: Any) -> None:
        number = _number(value)
        if number is not None:
            out[tag] = number

    for name, value in record.get("server", {}).items():
        put(metric_name("server", name), value)
    for site, metrics in record.get("clients", {}).items():
        for name, value in metrics.items():
            put(metric_name("site-validation", name, site), value)
    train: Mapping[str, Mapping[str, Any]] = record.get("train", {})
    for site, entry in train.items():
        for key in TRAIN_KEYS:
            put(metric_name(key, site), entry.get(key))
    if train:
        epsilons = [e for e in (_number(t.get("epsilon")) for t in train.values()) if e is not None]
        put("epsilon/max", max(epsilons) if epsilons else None)
        put("traffic/bytes-sent", sum(_number(t.get("bytes-sent")) or 0.0 for t in train.values()))
        put("traffic/bytes-received", sum(_number(t.get("bytes-received")) or 0.0 for t in train.values()))
    put("round/seconds", record.get(ROUND_SECONDS))
    if "sampled" in record:
        put("round/sites-sampled", record["sampled"])
        put("round/sites-connected", record.get("connected"))
        put("round/sites-trained", len(train))
        put("round/sites-refused", len(record.get("refused", {})))
        put("round/sites-failed", len(record.get("failed", {})))
    for key in SITE_LEVEL_KEYS:
        put(metric_name("site-level", key.removeprefix("site-level-")), record.get(key))
    put("secure-aggregation/clipped-values", record.get("secure-aggregation", {}).get("clipped-values"))
    return out


def flatten_config(raw: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config as ``section.key`` -> text (lists as JSON), MLflow's flat params."""
    out: dict[str, str] = {}
    for key, value in raw.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out |= flatten_config(value, f"{name}.")
        else:
            text = value if isinstance(value, str) else json.dumps(value)
            out[metric_name(name)] = text if len(text) <= _PARAM_CHARS else text[: _PARAM_CHARS - 1] + "…"
    return out


@dataclass
class TrackingState:
    """What ``tracking.json`` keeps between server processes of one run."""

    last_round: int = -1
    mlflow_run_id: str = ""

    @classmethod
    def read(cls, path: Path) -> TrackingState:
        if not path.exists():
            return cls()
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            return cls(last_round=int(raw["last-round"]), mlflow_run_id=str(raw.get("mlflow-run-id", "")))
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("%s is unreadable (%s): every round of metrics.jsonl is tracked again", path, exc)
            return cls()

    def write(self, path: Path) -> None:
        atomic_write_json(path, {"last-round": self.last_round, "mlflow-run-id": self.mlflow_run_id})


class TrackingBackend(Protocol):
    """One place rounds are written to."""

    name: str

    def write(self, records: Sequence[Mapping[str, Any]]) -> None:
        """Write these rounds (in order; the first may redo a round written before)."""

    def finish(self, artifacts: Sequence[Path]) -> None:
        """The run is over: attach what it left for people, flush and close."""


class TensorBoardBackend:
    """Event files under ``RUN_DIR/tensorboard`` through ``torch.utils.tensorboard``."""

    name = "tensorboard"

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = Path(log_dir)
        self.writer: Any = None

    def write(self, records: Sequence[Mapping[str, Any]]) -> None:
        if not records:
            return
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            first = int(records[0]["round"])
            # purge_step: events an earlier process wrote at this step or later are hidden (a redone round).
            self.writer = SummaryWriter(str(self.log_dir), purge_step=first if first > 0 else None)
        for record in records:
            step = int(record["round"])
            for tag, value in round_scalars(record).items():
                self.writer.add_scalar(tag, value, step)
            if record.get("status"):
                self.writer.add_text("round/status", str(record["status"]), step)
        self.writer.flush()

    def finish(self, artifacts: Sequence[Path]) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def mlflow_store_uri(uri: str, run_dir: Path) -> str:
    """``tracking.mlflow_uri`` as MLflow takes it: ``local`` is a file store in the run directory."""
    if uri == LOCAL_MLFLOW:
        return (Path(run_dir).resolve() / LOCAL_MLFLOW_DIR).as_uri()
    return uri


class MlflowBackend:
    """One MLflow run per fedtune run: the config as params, each round's scalars as metrics, artifacts at the end.

    A file store (``file:``, what ``local`` makes) needs ``MLFLOW_ALLOW_FILE_STORE=true`` since MLflow 3.x put
    it in maintenance mode; it is set here for such a URI (it works and needs no server or database).
    """

    name = "mlflow"

    def __init__(self, uri: str, experiment: str, run_name: str, run_id: str, params: Mapping[str, str]) -> None:
        try:
            from mlflow.tracking import MlflowClient
        except ImportError as exc:
            raise TrackingError(
                f"tracking.mlflow_uri = {uri!r} needs MLflow, which is not installed: pip install 'fedtune[mlflow]' "
                '(or set tracking.mlflow_uri = "" to turn MLflow off)'
            ) from exc
        if uri.startswith("file:") or "://" not in uri:
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        try:
            self.client = MlflowClient(tracking_uri=uri)
            if run_id:
                self.run_id = self.client.get_run(run_id).info.run_id
                self.client.update_run(self.run_id, status="RUNNING")
            else:
                found = self.client.get_experiment_by_name(experiment)
                experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
                self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
                self._log_params(params)
        except Exception as exc:  # MLflow raises its own, requests' and OS errors alike
            why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            resuming = (
                f"resume MLflow run {run_id} (named in {STATE_FILE}; empty its mlflow-run-id to start a new one)"
                if run_id
                else "start the run"
            )
            raise TrackingError(
                f"tracking.mlflow_uri = {uri!r}: MLflow could not {resuming}: {why}; check the URI and that the "
                'tracking server is reachable, or set tracking.mlflow_uri = "" to turn MLflow off'
            ) from exc

    def _log_params(self, params: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(key, value) for key, value in params.items()]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params a batch
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def write(self, records: Sequence[Mapping[str, Any]]) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        metrics = [
            Metric(tag, value, stamp, int(record["round"]))
            for record in records
            for tag, value in round_scalars(record).items()
        ]
        for start in range(0, len(metrics), _BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[start : start + _BATCH])

    def finish(self, artifacts: Sequence[Path]) -> None:
        for path in artifacts:
            if Path(path).is_file():
                self.client.log_artifact(self.run_id, str(path))
        self.client.set_terminated(self.run_id)


class Tracker:
    """Feeds each backend every round of the run once, in order, across restarts of the server."""

    def __init__(
        self,
        backends: Sequence[TrackingBackend],
        metrics: MetricsLog,
        state_path: Path,
        state: TrackingState | None = None,
    ) -> None:
        self.backends, self.metrics, self.state_path = list(backends), metrics, Path(state_path)
        self.state = state if state is not None else TrackingState.read(self.state_path)
        self._caught_up = False

    @classmethod
    def for_run(cls, cfg: FedtuneConfig, run_dir: Path, metrics: MetricsLog) -> Tracker:
        """The backends ``cfg.tracking`` turns on for the run in ``run_dir`` (none: a tracker that does nothing)."""
        run_dir, tracking = Path(run_dir), cfg.tracking
        state = TrackingState.read(run_dir / STATE_FILE)
        backends: list[TrackingBackend] = []
        if tracking.tensorboard:
            backends.append(TensorBoardBackend(run_dir / TENSORBOARD_DIR))
        if tracking.mlflow_uri:
            mlflow = MlflowBackend(
                mlflow_store_uri(tracking.mlflow_uri, run_dir),
                tracking.mlflow_experiment or cfg.run.name,
                run_dir.name,
                state.mlflow_run_id,
                flatten_config(config_to_toml_dict(cfg)),
            )
            backends.append(mlflow)
            if mlflow.run_id != state.mlflow_run_id:  # a new MLflow run: a resumed server continues it
                state.mlflow_run_id = mlflow.run_id
                state.write(run_dir / STATE_FILE)
        return cls(backends, metrics, run_dir / STATE_FILE, state)

    def log_round(self, record: Mapping[str, Any]) -> None:
        """Write ``record`` (just appended to metrics.jsonl), after any earlier round of the log not written yet."""
        round_ = int(record["round"])
        self._write([*self._earlier_than(round_), record])

    def close(self, artifacts: Sequence[Path] = ()) -> None:
        """Write any round not written yet, attach ``artifacts`` (files; MLflow only) and close every backend."""
        self._write(self._earlier_than(None))
        for backend in self.backends:
            try:
                backend.finish(artifacts)
            except Exception as exc:  # tracking must never cost the run its ending
                log.warning("%s tracking could not finish: %s", backend.name, exc)

    def _earlier_than(self, round_: int | None) -> list[dict[str, Any]]:
        """Rounds of the log after the last one written and before ``round_`` (None: all), once a process."""
        if self._caught_up and round_ is not None:
            return []
        self._caught_up = True
        last = self.state.last_round
        return [r for r in self.metrics.read() if last < r["round"] and (round_ is None or r["round"] < round_)]

    def _write(self, records: Sequence[Mapping[str, Any]]) -> None:
        if not records or not self.backends:
            return
        for backend in self.backends:
            try:
                backend.write(records)
            except Exception as exc:  # a tracking outage must not stop a federation; metrics.jsonl has the round
                log.warning("%s tracking skipped round(s) %s: %s", backend.name, [r["round"] for r in records], exc)
        self.state.last_round = int(records[-1]["round"])
        self.state.write(self.state_path)
