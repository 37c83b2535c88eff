"""An uneven federation in a real Flower simulation: what issue 17 asks a federation to survive.

Five hospitals of different sizes (Dirichlet(0.3) over the NIH sources) and different LoRA
ranks (4, 2, 4, 1, 2 under FFA-LoRA) train a tiny causal LM with record-level DP-SGD and
site-level DP (clipped updates, distributed noise shares), secure aggregation on and FedAdam
on the server. Each site is asked with probability 0.6 a round (Poisson sampling, three of
five expected); one hospital connects only as round 2 starts; one hospital's replies come
100 s late, past the 45 s deadline, whenever it is sampled. The run must complete, improve
the held-out loss, aggregate every round from the sites that answered in time, keep each
site's update to its rank, record the site-level epsilon of the sampled rounds, and charge
each hospital's ledger for exactly the rounds it trained.

The server's sampling secret is fixed so that the sample of each round (drawn from it and the
round) is known in advance: the slow site is sampled in one round, the late joiner in a round
after it joined, and every round asks enough sites to aggregate.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from fedtune.common.config import load_config
from fedtune.common.models.lora_ranks import is_lora_b
from fedtune.common.privacy.site_level import site_level_epsilon
from fedtune.common.wire import ADAPTER, STATUS, SiteStatus, from_array_record
from fedtune.server.messaging import by_node
from fedtune.server.run_directory import start_run_dir
from fedtune.server.site_sampling import SAMPLING_KEY_FILE, SiteSampling
from tests.conftest import SAMPLES
from tests.e2e.message_spy import simulate_recording_messages

pytestmark = pytest.mark.e2e

SITES, ROUNDS, FRACTION, JOIN_ROUND = 5, 4, 0.6, 2  # each site asked with probability 0.6: 3 of 5 expected
DEADLINE_S, SLOW_BY_S = 45, 100
RANKS = [4, 2, 4, 1, 2]  # each site's LoRA rank (by partition id), up to lora.rank = 4
# Site-level DP with distributed noise. Five sites cannot buy a useful site-level epsilon (z = 0.01
# gives a huge one); what is tested is the mechanism: clipping, shares added before masking, accounting.
Z, CLIP = 0.01, 1.0


def _sampling_key() -> bytes:
    """The first server secret whose draws ask at least 2 sites every round and 3 in the slow site's round,
    put the slow site (lowest node id) in exactly one round and the late joiner (highest node id, absent
    from round 1) in a round after it joined."""
    for i in range(1000):
        key = hashlib.sha256(f"uneven-{i}".encode()).digest()
        picks = _picks(key)
        slow_rounds = [r for r, p in picks.items() if 0 in p]
        late_rounds = [r for r, p in picks.items() if SITES - 1 in p]
        enough = all(len(p) >= (3 if r in slow_rounds else 2) for r, p in picks.items())
        if enough and len(slow_rounds) == 1 and late_rounds:
            return key
    raise AssertionError("no key fits")


def _picks(key: bytes) -> dict[int, list[int]]:
    """round -> the positions (in node-id order) the server's draw asks, as server.site_sampling draws them."""
    sampling = SiteSampling(fraction=FRACTION, minimum=2, poisson=True)
    return {
        r: sampling.sample(list(range(SITES if r >= JOIN_ROUND else SITES - 1)), key, r) for r in range(1, ROUNDS + 1)
    }


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("uneven")
    (tmp / "c.toml").write_text(f"""
[run]
name = "uneven"
output_dir = "{tmp / "runs"}"
[model]
name = "tiny-llama"
max_length = 48
[lora]
rank = 4
alpha = 16
ffa = true
site_ranks = {RANKS}
[data]
task = "question-answer"
path = "{SAMPLES / "medquad" / "medquad_sample.jsonl"}"
max_records = 400
max_eval_examples = 24
[partition]
scheme = "dirichlet"
column = "source"
alpha = 0.3
num_clients = {SITES}
min_examples = 12
[federation]
rounds = {ROUNDS}
min_clients = 2
fraction_per_round = {FRACTION}
poisson_sampling = true
min_sites_to_start = {SITES - 1}
strategy = "fedadam"
round_timeout_s = {DEADLINE_S}
server_optimizer = {{ lr = 0.02 }}
[train]
local_steps = 4
batch_size = 8
lr = 0.02
[privacy]
epsilon = 8.0
delta = 1e-3
[privacy.site_level]
enabled = true
clip_norm = {CLIP}
noise_multiplier = {Z}
delta = 0.1
[secure_aggregation]
enabled = true
stage_timeout_s = 120
[simulation]
late_joiners = 1
join_round = {JOIN_ROUND}
slow_sites = 1
slow_site_delay_s = {SLOW_BY_S}
""")
    cfg = load_config(tmp / "c.toml")
    run_dir = start_run_dir(tmp / "runs" / "uneven", cfg, "uneven")
    key = _sampling_key()
    (run_dir / SAMPLING_KEY_FILE).write_text(key.hex())  # the secret the server would otherwise draw itself
    run_dir, seen = simulate_recording_messages(cfg, run_dir=run_dir)
    return cfg, run_dir, seen, _picks(key)


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _train_requests(seen) -> dict[int, dict[int, object]]:
    """round -> {node id: the request's global adapter}, for the train requests the server sent."""
    out: dict[int, dict[int, object]] = {}
    for requests, _ in seen:
        for m in requests:
            if m.metadata.message_type == "train":
                out.setdefault(int(m.content["plan"]["round"]), {})[m.metadata.dst_node_id] = m
    return out


def test_the_run_completes_every_round_aggregated_and_held_out_loss_improves(run):
    _, run_dir, _, _ = run
    records = _records(run_dir)
    assert [r["round"] for r in records] == list(range(ROUNDS + 1))
    assert all(r["status"].startswith("aggregated") for r in records[1:]), [r["status"] for r in records]
    assert records[-1]["server"]["loss"] < records[0]["server"]["loss"]


def test_the_sites_the_servers_draw_picks_are_asked_each_round(run):
    _, run_dir, seen, picks = run
    asked = _train_requests(seen)
    records = _records(run_dir)
    for round_ in range(1, ROUNDS + 1):
        connected = sorted(set().union(*asked.values()))[: SITES - 1 if round_ < JOIN_ROUND else SITES]
        assert sorted(asked[round_]) == [connected[i] for i in picks[round_]]
        assert records[round_]["sampled"] == len(picks[round_])
        assert records[round_]["connected"] == (SITES - 1 if round_ < JOIN_ROUND else SITES)
    everyone = set().union(*asked.values())
    assert len(everyone) == SITES  # over the run every site, the late joiner included, was asked


def test_the_late_joiner_is_asked_only_after_it_joined_with_the_current_global_adapter(run):
    _, _, seen, _ = run
    asked = _train_requests(seen)
    late = max(set().union(*asked.values()))
    rounds = sorted(r for r, nodes in asked.items() if late in nodes)
    assert rounds and rounds[0] >= JOIN_ROUND
    first = rounds[0]
    sent = {n: from_array_record(m.content.array_records[ADAPTER]) for n, m in asked[first].items()}
    initial = from_array_record(next(iter(asked[1].values())).content.array_records[ADAPTER])
    for key, value in sent[late].items():
        assert all(np.array_equal(value, other[key]) for other in sent.values())  # the same global adapter
    assert any(not np.array_equal(sent[late][k], initial[k]) for k in initial)  # already trained by earlier rounds


def test_the_slow_site_is_a_dropout_of_the_round_it_was_sampled_in(run):
    _, run_dir, seen, _ = run
    asked = _train_requests(seen)
    slow = min(set().union(*asked.values()))
    records = _records(run_dir)
    slow_rounds = [r for r, nodes in asked.items() if slow in nodes]
    assert len(slow_rounds) == 1
    record = records[slow_rounds[0]]
    sampled = len(asked[slow_rounds[0]])
    assert record["status"].startswith(f"aggregated {sampled - 1} sites"), record["status"]
    assert record["failed"] == {f"node-{slow}": "no reply before the round timeout"}
    assert len(record["secure-aggregation"]["survivors"]) == sampled - 1


def _site_names(seen) -> dict[int, str]:
    """node id -> the site id its replies gave (any reply: evaluation replies come from every site)."""
    names: dict[int, str] = {}
    for requests, replies in seen:
        for node, reply in by_node(requests, replies):
            if not reply.has_error() and STATUS in reply.content.config_records:
                names[node] = SiteStatus.from_content(reply.content).site_id
    return names


def test_each_ledger_is_charged_for_exactly_the_rounds_its_site_was_asked_to_train(run):
    """Not for rounds it was not sampled in or had not joined yet; the slow site is charged for its late
    round (it trained, and its masked update left the site), conservatively."""
    _, run_dir, seen, _ = run
    names = _site_names(seen)
    assert len(names) == SITES
    asked_rounds = {node: {r for r, nodes in _train_requests(seen).items() if node in nodes} for node in names}
    assert sum(len(rounds) for rounds in asked_rounds.values()) == sum(len(p) for p in run[3].values())
    for node, site in names.items():
        asked = asked_rounds[node]
        ledger = json.loads((run_dir / "sites" / site / "privacy_ledger.json").read_text())
        charged = [e["round"] for e in ledger["entries"] if e["mechanism"] == "dp-sgd"]
        assert sorted(charged) == sorted(asked), (site, charged, asked)


def test_each_sites_update_is_zero_beyond_its_rank(run):
    """Read from the site's own replay file against the global adapter it was sent that round."""
    _, run_dir, seen, _ = run
    asked = _train_requests(seen)
    for node, site in _site_names(seen).items():
        rank = RANKS[int(site.removeprefix("site-"))]
        last = max(r for r, nodes in asked.items() if node in nodes)
        sent = from_array_record(asked[last][node].content.array_records[ADAPTER])
        with np.load(run_dir / "sites" / site / "last_update.npz", allow_pickle=False) as saved:
            for key, value in sent.items():
                update = saved[key] - value
                if is_lora_b(key):
                    assert np.all(update[:, rank:] == 0) and np.any(update[:, :rank] != 0), (site, key)


def test_every_round_records_the_site_level_epsilon_of_sampled_rounds_beside_the_record_level_one(run):
    cfg, run_dir, _, _ = run
    records = _records(run_dir)[1:]
    q = FRACTION  # Poisson sampling: the accountant's rate
    for r in records:
        assert r["site-level-epsilon"] == pytest.approx(site_level_epsilon(Z, r["round"], 0.1, q))
        assert r["site-level-epsilon-without-sampling"] == pytest.approx(site_level_epsilon(Z, r["round"], 0.1))
        assert r["site-sampling-rate"] == pytest.approx(q) and r["site-level-noise"] == "distributed"
        assert r["secure-aggregation"]["clipped-values"] == 0
        assert all(0 < t["epsilon"] <= cfg.privacy.epsilon for t in r["train"].values())
    assert records[0]["site-level-epsilon"] < records[-1]["site-level-epsilon"]
    assert records[-1]["site-level-epsilon"] < records[-1]["site-level-epsilon-without-sampling"]
    assert "site eps" in (run_dir / "summary.txt").read_text()
    log = (run_dir / "logs" / "sites.log").read_text()
    trainings = sum(len(p) for p in run[3].values())
    assert log.count(f"clipped to site_clip_norm {CLIP:.4g}") == trainings  # every training, the slow one's too
