"""Secure aggregation in a real Flower simulation: 4 sites x 4 rounds with DP-SGD, dropouts injected.

Round 1 is set up before training (two exchanges) and sets round 2 up in its own messages.
Round 2: site-3 trains but loses its connection before its masked reply arrives; 3 sites
remain (min_clients = 3), so the round completes with their sum and names who dropped.
Round 3 is set up anew (the sites differ from those set up); two sites drop, the round
fails loudly and the global adapter stays exactly as it was. Round 4: everyone stays. The
server's view is recorded message by message: it never holds an adapter, each masked vector
is unrelated to its site's update, and the unmasked mean equals the sites' true weighted
mean within the quantisation error. Last, the run is resumed as if the server had crashed
after unmasking round 4: the sites refuse to mask round 4 a second time, so it fails.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from fedtune.common.config import load_config
from fedtune.common.roster import load_roster
from fedtune.common.secure_aggregation.records import ADVERTISE, SECAGG_NEXT, SIGN_SURVIVORS, UNMASK, params_from
from fedtune.common.secure_aggregation.signed_keys import keys_problem
from fedtune.common.wire import ADAPTER, MASKED, SECAGG, SiteStatus, TrainReport, flatten_adapter, from_array_record
from tests.conftest import SAMPLES
from tests.e2e.message_spy import simulate_recording_messages

pytestmark = pytest.mark.e2e

DROPS = {3: {2, 3}, 2: {3}}  # partition id -> rounds in which its masked reply is lost after training


def drop_after_training(plan: dict[int, set[int]]):
    """A Flower mod that loses the planned sites' train replies (a connection lost after training)."""

    def mod(msg, context, call_next):
        reply = call_next(msg, context)
        if msg.metadata.message_type == "train":
            pid, round_ = int(context.node_config["partition-id"]), int(msg.content["plan"]["round"])
            if round_ in plan.get(pid, ()):
                raise ConnectionError(f"simulated: site-{pid} lost its connection in round {round_}")
        return reply

    return mod


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("secagg")
    (tmp / "c.toml").write_text(f"""
[run]
name = "secagg"
output_dir = "{tmp / "runs"}"
[model]
name = "tiny-llama"
max_length = 48
[lora]
rank = 8
ffa = true
[data]
task = "question-answer"
path = "{SAMPLES / "medquad" / "medquad_sample.jsonl"}"
max_records = 400
max_eval_examples = 16
[partition]
scheme = "column"
column = "source"
num_clients = 4
min_examples = 10
[federation]
rounds = 4
min_clients = 3
[train]
local_steps = 3
batch_size = 8
lr = 0.02
[privacy]
epsilon = 6.0
delta = 1e-3
""")
    cfg = load_config(tmp / "c.toml")
    assert cfg.secure_aggregation.enabled, "secure aggregation is the default"
    run_dir, seen = simulate_recording_messages(cfg, client_mods=[drop_after_training(DROPS)])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return cfg, run_dir, seen, records


def _fanouts(seen, message_type):
    return [(req, rep) for req, rep in seen if req and req[0].metadata.message_type == message_type]


def test_dropouts_above_threshold_are_tolerated_below_it_the_round_fails_and_the_model_stays(run):
    _, _, seen, records = run
    assert [r["status"] for r in records[1:]] == [
        "aggregated 4 sites securely",
        "aggregated 3 sites securely",
        "failed: secure aggregation: masked input: only 2 sites remain, fewer than the 3 needed; "
        "the round is abandoned",
        "aggregated 4 sites securely",
    ]
    round2 = records[2]["secure-aggregation"]
    assert round2["survivors"] == ["site-0", "site-1", "site-2"]
    assert list(round2["dropped"]) == ["site-3"]
    assert "lost its connection in round 2" in round2["dropped"]["site-3"]
    assert sorted(records[3]["secure-aggregation"]["dropped"]) == ["site-2", "site-3"]
    assert records[4]["secure-aggregation"]["clipped-values"] == 0
    # The global adapter sent out after the failed round 3 is bit-for-bit the one before it.
    evals = _fanouts(seen, "evaluate")
    after = [from_array_record(req[0].content[ADAPTER]) for req, _ in evals]  # rounds 0..4
    for key in after[1]:
        np.testing.assert_array_equal(after[3][key], after[2][key])
        assert not np.array_equal(after[1][key], after[0][key])
        assert not np.array_equal(after[2][key], after[1][key])
        assert not np.array_equal(after[4][key], after[3][key])


def test_a_steady_round_costs_two_exchanges_its_set_up_rides_on_the_previous_round(run):
    _, _, seen, _ = run
    kinds = [req[0].metadata.message_type for req, _ in seen if req and req[0].metadata.message_type != "evaluate"]
    assert kinds == [
        ADVERTISE,
        "train.secagg_share_keys",
        "train",
        UNMASK,  # round 1, set up first
        "train",
        SIGN_SURVIVORS,  # round 2, set up by round 1's messages; site-3 dropped: the survivors sign the list
        UNMASK,
        ADVERTISE,
        "train.secagg_share_keys",
        "train",  # round 3: new set-up, fails unmasked
        ADVERTISE,
        "train.secagg_share_keys",
        "train",
        UNMASK,
    ]  # round 4 (last: sets nothing up)
    unmask_requests = [req for req, _ in _fanouts(seen, UNMASK)]
    assert all("signers" not in m.content[SECAGG] for m in unmask_requests[0]), "no dropout, no signatures"
    assert all(len(m.content[SECAGG]["signers"]) == 3 for m in unmask_requests[1]), "the 3 survivors signed"
    assert all(SECAGG_NEXT in m.content for m in unmask_requests[0]), "round 1 sets round 2 up"
    assert all(SECAGG_NEXT in m.content for m in unmask_requests[1]), "round 2 sets round 3 up"
    assert not any(SECAGG_NEXT in m.content for m in unmask_requests[2]), "the last round sets nothing up"


def test_every_site_spent_privacy_for_every_round_it_trained(run):
    cfg, run_dir, _, _ = run
    for site in range(4):
        ledger = json.loads((run_dir / "sites" / f"site-{site}" / "privacy_ledger.json").read_text())
        assert [e["round"] for e in ledger["entries"]] == [1, 2, 3, 4]  # dropping out later does not refund
        assert 0 < ledger["epsilon"] <= cfg.privacy.epsilon


def test_the_server_never_holds_a_site_update_only_masked_vectors_and_their_sum(run):
    _, run_dir, seen, _ = run
    trains = _fanouts(seen, "train")
    assert len(trains) == 4
    for _requests, replies in seen:
        for reply in replies:
            assert reply.has_error() or ADAPTER not in reply.content, "no site sends its adapter in the clear"
    for round_, (requests, replies) in enumerate(trains, start=1):
        assert all(bytes(m.content[SECAGG]["round-tag"]).endswith(f"/{round_}".encode()) for m in requests), (
            "each train request carries the shares addressed to its site for that round"
        )
        for reply in replies:
            if not reply.has_error():
                assert set(reply.content.array_records) == {MASKED}
                keys = reply.content[SECAGG_NEXT] if round_ < 4 else None
                assert keys is None or all(len(keys[k]) == 32 for k in ("c-public", "s-public"))

    # Round 4: true updates are each site's released adapter (its replay file) minus the global it got.
    train_req, train_rep = trains[3]
    before = from_array_record(train_req[0].content[ADAPTER])
    after = from_array_record(_fanouts(seen, "evaluate")[4][0][0].content[ADAPTER])
    site_of_node = {r.metadata.src_node_id: SiteStatus.from_content(r.content).site_id for r in train_rep}
    counts = {site_of_node[r.metadata.src_node_id]: TrainReport.from_content(r.content).num_examples for r in train_rep}
    d = sum(v.size for v in before.values())
    assert d >= 2_000
    true_updates = {}
    for site in counts:
        with np.load(run_dir / "sites" / site / "last_update.npz") as saved:
            released = {k: saved[k] for k in saved.files if k != "__meta__"}
        true_updates[site] = flatten_adapter(released) - flatten_adapter(before)
    masked = {site_of_node[r.metadata.src_node_id]: r.content[MASKED]["vector"].numpy() for r in train_rep}
    assert sorted(masked) == sorted(counts) and len(masked) == 4
    for site, vector in masked.items():
        assert vector.dtype == np.uint64 and vector.shape == (d + 1,), "64 bits a value, plus the clip count"
        corr = np.corrcoef(vector[:-1].view(np.int64).astype(np.float64), true_updates[site])[0, 1]
        assert abs(corr) < 5 / np.sqrt(d), f"{site}'s masked vector correlates with its update ({corr:.3f})"
    total = sum(counts.values())
    expected = sum(counts[s] / total * true_updates[s].astype(np.float64) for s in counts)
    got = flatten_adapter(after).astype(np.float64) - flatten_adapter(before)
    assert np.sqrt(np.mean((got - expected) ** 2)) / np.sqrt(np.mean(expected**2)) < 1e-3
    assert np.max(np.abs(got - expected)) < 1e-6


def test_a_round_resumed_after_its_masked_inputs_were_sent_fails_and_the_run_goes_on(run, tmp_path):
    """The server crashed after unmasking round 4 but before writing its checkpoint. Resumed, it
    sets round 4 up again with fresh keys: every site had sent its masked input for round 4
    already and refuses to mask it again (a second sum of its update, under other keys and over
    other sites, could give it away by difference), before training or replaying anything."""
    from safetensors.numpy import load_file

    from fedtune.simulation import simulate

    cfg, run_dir, _, _ = run
    resumed = tmp_path / run_dir.name  # a copy, so the other tests keep their run
    shutil.copytree(run_dir, resumed)
    shutil.rmtree(resumed / "checkpoints" / "round-0004")
    ledgers = {p: p.read_bytes() for p in (resumed / "sites").glob("*/privacy_ledger.json")}
    simulate(cfg, run_dir=resumed, resume=True)

    records = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1, 2, 3, 4]
    sites = [f"site-{i}" for i in range(4)]
    assert records[4]["status"] == (
        "failed: secure aggregation: no masked input; site-0, site-1, site-2, site-3 had already sent their "
        "masked update for this round before the server restarted and refused to mask it again"
    )
    refused = records[4]["refused"]
    assert sorted(refused) == sites
    assert all(reason.startswith("this site already sent its masked update for ") for reason in refused.values())
    assert all((resumed / "sites" / s / "secagg_masked.json").exists() for s in sites)
    third = load_file(str(resumed / "checkpoints" / "round-0003" / "adapter_model.safetensors"))
    fourth = load_file(str(resumed / "checkpoints" / "round-0004" / "adapter_model.safetensors"))
    for key in third:
        np.testing.assert_array_equal(fourth[key], third[key])
    for path, before in ledgers.items():
        assert path.read_bytes() == before, "the replay spent no privacy"


def test_every_key_relayed_was_signed_by_a_member_of_the_simulations_roster(run):
    """Simulated sites are roster members: each round's parameters list every participant's signed keys,
    and the signatures check against the roster in the run directory (the sites refuse anything else)."""
    _, run_dir, seen, _ = run
    roster = load_roster(run_dir / "roster.toml")
    assert sorted(roster.members) == [f"site-{i}" for i in range(4)]
    checked = 0
    for requests, _ in seen:
        for message in requests:
            for name in (SECAGG, SECAGG_NEXT):
                record = message.content.config_records.get(name)
                if record is None or "member-ids" not in record:
                    continue
                params = params_from(record)
                assert sorted(params.members) == list(range(1, params.num_participants + 1))
                for keys in params.members.values():
                    assert keys_problem(roster, params.round_tag, keys) is None
                    checked += 1
    assert checked >= 4 * 4, "every round's set-up carries signed keys"
