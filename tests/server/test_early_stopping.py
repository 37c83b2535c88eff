"""Early stopping and the best round: the pure decision over the held-out metric history, then a
federation driven through ``FederationServer.run`` and ``finish`` without Flower's engine (scripted
rounds, a real site's ClientApp behind a loopback grid): it stops when told, tells the site, which
then refuses to train for the run; the merged model comes from the best round; a resume trains no
more and keeps the best-round record."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Message, MessageType, RecordDict

from fedtune.common.config import ConfigError, load_config, preset_path
from fedtune.server.early_stopping import (
    BEST_FILE,
    STOPPED_EARLY,
    Watch,
    best_round,
    kept_round,
    metric_history,
    stop_decision,
    stopped_early,
)

ACCURACY = Watch("accuracy", higher_is_better=True, patience=2, min_delta=0.01)
LOSS = Watch("loss", higher_is_better=False, patience=1, min_delta=0.0)


def _history(*values: float) -> list[tuple[int, float]]:
    return list(enumerate(values, start=1))


def test_it_stops_after_patience_rounds_without_an_improvement_of_more_than_min_delta():
    assert stop_decision(_history(0.5, 0.6, 0.605), ACCURACY) is None  # one round without: wait
    decision = stop_decision(_history(0.5, 0.6, 0.605, 0.58), ACCURACY)
    assert decision is not None and (decision.round, decision.reference_round, decision.waited) == (4, 2, 2)
    assert decision.reason == (
        "stopped early at round 4: held-out accuracy did not improve by more than 0.01 for 2 rounds "
        "(patience 2; last improvement: round 2, accuracy 0.6000)"
    )
    # An improvement of more than min_delta resets the count.
    assert stop_decision(_history(0.5, 0.6, 0.605, 0.62), ACCURACY) is None


def test_lower_is_better_for_loss_and_a_non_finite_value_never_improves():
    assert stop_decision(_history(2.0, 1.5), LOSS) is None
    assert stop_decision(_history(2.0, 1.5, 1.5), LOSS).round == 3  # equal is no improvement
    assert stop_decision(_history(2.0, math.nan), LOSS).round == 2
    assert stop_decision(_history(math.nan, 3.0), LOSS) is None  # the first finite value is the reference


def test_the_best_round_is_the_best_value_earliest_on_ties_min_delta_aside():
    assert best_round(_history(0.5, 0.6, 0.605, 0.58), ACCURACY).round == 3
    assert best_round(_history(0.5, 0.7, 0.7), ACCURACY).round == 2
    assert best_round(_history(2.0, math.nan, 1.0), LOSS).round == 3
    assert best_round(_history(math.nan), LOSS) is None


def test_the_history_is_the_servers_held_out_metric_of_trained_rounds():
    records = [
        {"round": 0, "server": {"accuracy": 0.9}},  # the base model: no checkpoint to merge
        {"round": 1, "server": {"accuracy": 0.4}},
        {"round": 2, "server": {}},
        {"round": 3, "server": {"accuracy": 0.5}, STOPPED_EARLY: "stopped early at round 3: ..."},
    ]
    assert metric_history(records, "accuracy") == [(1, 0.4), (3, 0.5)]
    assert stopped_early(records) == (3, "stopped early at round 3: ...")
    assert stopped_early(records[:3]) is None


def test_the_kept_round_is_the_best_checkpointed_one_or_the_last_by_config():
    best = best_round(_history(0.5, 0.7, 0.6), ACCURACY)
    assert kept_round(best, "best", [1, 2, 3]) == (
        2,
        "kept round 2: best held-out accuracy (max): 0.7000 at round 2 (federation.keep = 'best')",
    )
    assert kept_round(best, "last", [1, 2, 3])[0] == 3
    assert kept_round(best, "best", [1, 3])[0] == 3  # no checkpoint of the best round: the newest
    assert kept_round(None, "best", []) == (None, "no round was checkpointed: no merged model")


def test_the_watched_metric_and_its_direction_come_from_the_config():
    cfg = load_config(preset_path("banking77-minilm"))
    assert Watch.of(cfg) == Watch("accuracy", True, 3, 0.0)  # off: the task's headline metric
    cfg = load_config(preset_path("banking77-minilm"), ['federation.early_stopping.metric="loss"'])
    assert not Watch.of(cfg).higher_is_better
    cfg = load_config(preset_path("medquad-smollm2"))
    assert Watch.of(cfg).metric == "loss" and not Watch.of(cfg).higher_is_better
    with pytest.raises(ConfigError, match="early_stopping.metric = 'perplexity' is not measured"):
        load_config(preset_path("banking77-minilm"), ['federation.early_stopping.metric="perplexity"'])


# --- the server's round loop, the site behind a loopback grid ---------------------------------

NODE = 11
RUN_ID = "run-es"
ACCURACIES = {1: 0.5, 2: 0.6, 3: 0.605, 4: 0.58, 5: 0.9, 6: 0.9}


class StubModel:
    """Stands in for server.global_model.GlobalModel: checkpoints are files, the merge says where it came from."""

    a_fingerprint = ""

    def __init__(self) -> None:
        self.merged_from: list[Path] = []
        self.model = self

    def save_pretrained(self, directory: Path) -> None:
        (Path(directory) / "adapter_model.safetensors").write_bytes(b"adapter")

    def state(self) -> dict[str, np.ndarray]:
        return {"w": np.zeros(2, np.float32)}

    def restore(self, directory: Path) -> None:
        pass

    def export_merged(self, checkpoint_dir: Path, out_dir: Path) -> Path:
        self.merged_from.append(Path(checkpoint_dir))
        return out_dir


class LoopbackGrid:
    """A Grid whose one node is a real site's ClientApp, answered in this process."""

    def __init__(self, app, site) -> None:
        self.app, self.sent, self.replies = app, [], []
        self.context = Context(run_id=1, node_id=NODE, node_config={}, state=RecordDict(), run_config={})

    def get_node_ids(self) -> list[int]:
        return [NODE]

    def push_messages(self, messages: list[Message]) -> list[str]:
        for m in messages:
            m.metadata.__dict__["_message_id"] = m.object_id  # as the SuperLink posts it
            self.sent.append(m)
            self.replies.append(self.app(m, self.context))
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, ids: list[str]) -> list[Message]:
        out = [r for r in self.replies if r.metadata.reply_to_message_id in ids]
        self.replies = [r for r in self.replies if r not in out]
        return out


def _server(run_dir: Path, changes: list[str]):
    from fedtune.server.federation import FederationServer

    cfg = load_config(
        preset_path("banking77-minilm"),
        [
            "federation.rounds=6",
            "federation.min_sites_to_start=1",
            "federation.min_clients=1",
            "secure_aggregation.enabled=false",
            "federation.early_stopping.enabled=true",
            "federation.early_stopping.patience=2",
            "federation.early_stopping.min_delta=0.01",
            *changes,
        ],
    )
    run_dir.mkdir(exist_ok=True)
    (run_dir / "run.json").write_text(json.dumps({"run-id": RUN_ID}))
    server = FederationServer(cfg, StubModel(), None, run_dir)  # type: ignore[arg-type]
    trained: list[int] = []

    def train_round(grid, connected, round_):
        trained.append(round_)
        return {
            "round": round_,
            "server": {"accuracy": ACCURACIES[round_], "loss": 1.0},
            "clients": {},
            "train": {},
            "status": "aggregated 1 sites",
        }

    server.train_round = train_round  # type: ignore[method-assign]
    server.evaluate_round = lambda grid, nodes, round_: {  # type: ignore[method-assign]
        "round": round_,
        "server": {"accuracy": 0.1, "loss": 2.0},
        "clients": {},
    }
    return server, trained


@pytest.fixture()
def site(tmp_path, tiny_llama_spec):
    from fedtune.client.site import Site
    from fedtune.common.data.federation_data import SiteSplit
    from fedtune.common.data.shapes import Example

    samples = Path(__file__).resolve().parents[2] / "common" / "data" / "samples"
    toml = tmp_path / "c.toml"
    toml.write_text(
        f'[model]\nname = "tiny-llama"\nmax_length = 32\n[data]\ntask = "question-answer"\n'
        f'path = "{samples / "medquad" / "medquad_sample.jsonl"}"\n'
    )
    split = SiteSplit(train=[Example(f"q {i}?", f"a {i}.") for i in range(40)], val=[Example("q?", "a.")] * 2)
    return Site("site-0", load_config(toml), tiny_llama_spec, split, tmp_path / "site-0")


@pytest.mark.usefixtures("server_identity")
@pytest.mark.parametrize("keep", ["best", "last"])
def test_a_run_stops_early_tells_its_sites_merges_the_kept_round_and_a_resume_trains_no_more(tmp_path, site, keep):
    from fedtune.client.app import build_client_app
    from fedtune.client.site import SiteRefusal
    from fedtune.common.models.lora import adapter_state
    from fedtune.common.wire import ADAPTER, PLAN, RUN_ENDED, to_array_record
    from tests.plans import train_plan

    grid = LoopbackGrid(build_client_app(lambda context: site), site)
    run_dir = tmp_path / "run"
    server, trained = _server(run_dir, [f'federation.keep="{keep}"'])
    records = server.run(grid, resume=False)  # type: ignore[arg-type]
    outcome = server.finish(records)

    # 0.5, 0.6, then 0.605 and 0.58: two rounds without a gain of more than 0.01 -> stop after round 4 of 6.
    assert trained == [1, 2, 3, 4]
    reason = "stopped early at round 4: held-out accuracy did not improve by more than 0.01 for 2 rounds"
    assert records[-1]["round"] == 4 and records[-1][STOPPED_EARLY].startswith(reason)
    kept = 3 if keep == "best" else 4  # the best value (0.605) is round 3's, min_delta aside
    assert server.model.merged_from == [run_dir / "checkpoints" / f"round-{kept:04d}"]
    best = json.loads((run_dir / BEST_FILE).read_text())
    assert best["best"]["round"] == 3 and best["kept-round"] == kept and best[STOPPED_EARLY].startswith(reason)
    assert outcome["kept-round"] == kept and outcome[STOPPED_EARLY].startswith(reason)
    summary = (run_dir / "summary.txt").read_text()
    assert reason in summary and f"kept round {kept}" in summary

    # The site was told, and refuses every further train request of the run: no more budget is spent.
    assert [m.metadata.message_type for m in grid.sent] == [RUN_ENDED]
    assert "run 'run-es' ended after round 4" in site.ended_runs.why_ended(RUN_ID)
    request = Message(
        RecordDict(
            {
                ADAPTER: to_array_record(adapter_state(site.model, ffa=False)),
                PLAN: train_plan(run_id=RUN_ID, round=5, total_rounds=6, delta=1e-3).to_record(),
            }
        ),
        message_type=MessageType.TRAIN,
        dst_node_id=NODE,
    )
    grid.push_messages([request])
    (reply,) = grid.pull_messages([request.metadata.message_id])
    assert reply.content["status"]["state"] == "refused" and "ended after round 4" in reply.content["status"]["reason"]
    assert not site.ledger_path.exists(), "a site that was told the run ended spent budget on it"
    with pytest.raises(SiteRefusal, match="ended after round 4"):  # another run id would train as usual
        site.train(train_plan(run_id=RUN_ID, round=5, total_rounds=6, delta=1e-3), adapter_state(site.model, False))

    # Resumed: no round is trained, the site is told again, the best-round record and the merge stay.
    again, trained_again = _server(run_dir, [f'federation.keep="{keep}"'])
    records_again = again.run(grid, resume=True)  # type: ignore[arg-type]
    again.finish(records_again)
    assert trained_again == [] and [r["round"] for r in records_again] == [0, 1, 2, 3, 4]
    assert grid.sent[-1].metadata.message_type == RUN_ENDED
    assert json.loads((run_dir / BEST_FILE).read_text()) == best
    assert again.model.merged_from == [run_dir / "checkpoints" / f"round-{kept:04d}"]


def test_a_head_from_the_label_names_makes_round_0_a_candidate_that_can_be_kept(tmp_path):
    class NoSites:
        def get_node_ids(self):
            return [NODE]

    def zero_shot(grid, nodes, round_):  # the label-name head before training: better than every trained round
        return {"round": round_, "server": {"accuracy": 0.95, "loss": 2.0}, "clients": {}}

    changes = ["federation.early_stopping.enabled=false"]
    server, trained = _server(tmp_path / "run", [*changes, "model.head_init='label_names'"])
    server.evaluate_round = zero_shot  # type: ignore[method-assign]
    records = server.run(NoSites(), resume=False)  # type: ignore[arg-type]
    outcome = server.finish(records)
    assert trained == [1, 2, 3, 4, 5, 6] and records[0]["status"] == "base model, head from the label names"
    assert (tmp_path / "run" / "checkpoints" / "round-0000" / "round.json").exists()
    assert outcome["kept-round"] == 0
    assert (
        "kept round 0: best held-out accuracy (max): 0.9500 at round 0"
        in (tmp_path / "run" / "summary.txt").read_text()
    )
    assert server.model.merged_from == [tmp_path / "run" / "checkpoints" / "round-0000"]

    # Without the prior round 0 is the base model: no checkpoint, and the best trained round is kept.
    plain, _ = _server(tmp_path / "plain", changes)
    plain.evaluate_round = zero_shot  # type: ignore[method-assign]
    assert plain.finish(plain.run(NoSites(), resume=False))["kept-round"] == 5  # type: ignore[arg-type]
    assert not (tmp_path / "plain" / "checkpoints" / "round-0000").exists()


def test_round_0_in_the_history_is_the_reference_that_training_must_beat():
    records = [{"round": r, "server": {"accuracy": a}} for r, a in enumerate([0.62, 0.5, 0.6, 0.625])]
    assert metric_history(records, "accuracy", first_round=0)[0] == (0, 0.62)
    with_zero = stop_decision(metric_history(records, "accuracy", first_round=0), Watch("accuracy", True, 3, 0.01))
    assert with_zero is not None and with_zero.reference_round == 0  # 0.625 is not 0.01 above 0.62
    assert stop_decision(metric_history(records, "accuracy"), Watch("accuracy", True, 3, 0.01)) is None


def test_without_early_stopping_every_round_trains_and_the_best_is_still_merged(tmp_path):
    server, trained = _server(tmp_path / "run", ["federation.early_stopping.enabled=false"])

    class NoSites:
        def get_node_ids(self):
            return [NODE]

    records = server.run(NoSites(), resume=False)  # type: ignore[arg-type]
    server.finish(records)
    assert trained == [1, 2, 3, 4, 5, 6] and not any(STOPPED_EARLY in r for r in records)
    assert server.model.merged_from == [tmp_path / "run" / "checkpoints" / "round-0005"]  # 0.9, the earliest best
