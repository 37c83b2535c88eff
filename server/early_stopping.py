"""Early stopping and the best round, decided from the server's held-out metric history.

Pure functions of the rounds' records (``metrics.jsonl``), so a resumed server decides exactly as
the one before it did, and the run directory's ``best.json`` is a view that can always be rebuilt.

- The watched metric is ``federation.early_stopping.metric``, else the task's headline metric
  (accuracy for classification, loss for generative tasks); lower is better for loss and perplexity.
- Candidates are trained rounds (1 and up), and round 0 when it has a checkpoint: a head started from
  the label names (``model.head_init``) already classifies before any training, and a run whose steps
  are too large for the noise can end below it; the merged model is then never worse than the start.
- A round *improves* when its value beats the reference by more than ``min_delta``; the reference
  is the first round's value, moved only by an improvement (as Keras' ``EarlyStopping`` does). The run
  stops after ``patience`` rounds in a row without one (Prechelt, "Early Stopping - But When?", 1998).
- The best round is the plain best value (earliest on ties), ``min_delta`` aside: ``min_delta``
  says when to give up waiting, not which checkpoint is better. A non-finite value never improves.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedtune.common.atomic_files import atomic_write_json
from fedtune.common.config import FedtuneConfig

#: Metrics where lower is better; every other held-out metric (accuracy, macro-f1) is better higher.
LOWER_IS_BETTER = frozenset({"loss", "perplexity"})

#: The key of a round's record in metrics.jsonl that says the run stopped after it, and why.
STOPPED_EARLY = "stopped-early"

BEST_FILE = "best.json"


@dataclass(frozen=True)
class Watch:
    """What early stopping and the best round look at, and how."""

    metric: str
    higher_is_better: bool
    patience: int = 1
    min_delta: float = 0.0

    @classmethod
    def of(cls, cfg: FedtuneConfig) -> Watch:
        es = cfg.federation.early_stopping
        metric = es.metric or cfg.task.head.headline_metric
        higher = metric not in LOWER_IS_BETTER if es.mode == "auto" else es.mode == "max"
        return cls(metric, higher, es.patience, es.min_delta)

    @property
    def mode(self) -> str:
        return "max" if self.higher_is_better else "min"

    def improves(self, value: float, reference: float, min_delta: float = 0.0) -> bool:
        """``value`` beats ``reference`` by more than ``min_delta`` (never when either is not finite)."""
        if not (math.isfinite(value) and math.isfinite(reference)):
            return math.isfinite(value) and not math.isfinite(reference)
        return value - reference > min_delta if self.higher_is_better else reference - value > min_delta


def metric_history(records: Sequence[dict[str, Any]], metric: str, first_round: int = 1) -> list[tuple[int, float]]:
    """``(round, server held-out metric)`` of every round from ``first_round`` on (0 only when round 0 has a
    checkpoint) whose record holds it."""
    out = []
    for r in records:
        value = r.get("server", {}).get(metric)
        if r.get("round", 0) >= first_round and isinstance(value, (int, float)):
            out.append((int(r["round"]), float(value)))
    return out


@dataclass(frozen=True)
class BestRound:
    round: int
    value: float
    metric: str
    mode: str

    def describe(self) -> str:
        return f"best held-out {self.metric} ({self.mode}): {self.value:.4f} at round {self.round}"

    def to_json(self) -> dict[str, Any]:
        return {"round": self.round, "metric": self.metric, "mode": self.mode, "value": self.value}


def best_round(history: Sequence[tuple[int, float]], watch: Watch) -> BestRound | None:
    """The round of the best finite value (the earliest of equals), or None when there is none."""
    best: tuple[int, float] | None = None
    for round_, value in history:
        if math.isfinite(value) and (best is None or watch.improves(value, best[1])):
            best = (round_, value)
    return None if best is None else BestRound(best[0], best[1], watch.metric, watch.mode)


@dataclass(frozen=True)
class StopDecision:
    """The run stops after round ``round``: ``waited`` rounds without an improvement since ``reference_round``."""

    round: int
    reference_round: int
    reference_value: float
    waited: int
    reason: str


def stop_decision(history: Sequence[tuple[int, float]], watch: Watch) -> StopDecision | None:
    """Stop after the last round of ``history``? Only when its last ``patience`` rounds brought no
    improvement of more than ``min_delta`` over the reference (see the module docstring)."""
    reference: tuple[int, float] | None = None
    waited = 0
    for round_, value in history:
        first = reference is None and math.isfinite(value)
        if first or (reference is not None and watch.improves(value, reference[1], watch.min_delta)):
            reference, waited = (round_, value), 0
        else:
            waited += 1
    if not history or waited < watch.patience:
        return None
    last = history[-1][0]
    since = (
        f"last improvement: round {reference[0]}, {watch.metric} {reference[1]:.4f}"
        if reference is not None
        else f"no finite {watch.metric} yet"
    )
    reason = (
        f"stopped early at round {last}: held-out {watch.metric} did not improve by more than {watch.min_delta:g} "
        f"for {waited} round{'s' if waited != 1 else ''} (patience {watch.patience}; {since})"
    )
    ref_round, ref_value = reference if reference is not None else (0, math.nan)
    return StopDecision(last, ref_round, ref_value, waited, reason)


def stopped_early(records: Sequence[dict[str, Any]]) -> tuple[int, str] | None:
    """The round after which the run stopped early and why, when a round's record says it did
    (a resumed run then trains no more)."""
    for r in records:
        if r.get(STOPPED_EARLY):
            return int(r["round"]), str(r[STOPPED_EARLY])
    return None


def kept_round(best: BestRound | None, keep: str, checkpointed: Sequence[int]) -> tuple[int | None, str]:
    """The checkpoint the merged model is built from (federation.keep), and a sentence saying why."""
    if not checkpointed:
        return None, "no round was checkpointed: no merged model"
    last = checkpointed[-1]
    if keep == "last":
        return last, f"kept round {last}: federation.keep = 'last' (the newest round)"
    if best is None:
        return last, f"kept round {last} (the newest): no round has a finite held-out metric to pick the best by"
    if best.round not in checkpointed:
        return last, f"kept round {last} (the newest): the best round {best.round} has no checkpoint"
    return best.round, f"kept round {best.round}: {best.describe()} (federation.keep = 'best')"


def write_best(run_dir: Path, best: BestRound | None, kept: int | None, why: str, stopped: str | None) -> dict:
    """``RUN_DIR/best.json``: the best round so far, the round the merged model comes from, and why."""
    record = {"best": best.to_json() if best else None, "kept-round": kept, "why": why, STOPPED_EARLY: stopped}
    atomic_write_json(Path(run_dir) / BEST_FILE, record)
    return record
