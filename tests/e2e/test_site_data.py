"""Sites bring their own files, in different formats, by config alone; a site with broken data
fails fast, the server is told only "site not ready: data invalid", and nothing about any
site's raw records reaches the server.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from flwr.app import ConfigRecord, MetricRecord

from fedtune.client.app import DATA_INVALID, NO_METRICS
from fedtune.common.config import load_config
from fedtune.common.secure_aggregation.records import SECAGG_NEXT
from fedtune.common.wire import ADAPTER, MASKED, METRICS, SECAGG, STATUS, SiteState, SiteStatus, TrainReport
from tests.conftest import SAMPLES
from tests.e2e.message_spy import simulate_recording_messages

pytestmark = pytest.mark.e2e


def _rows(source: str, n: int) -> list[dict]:
    rows = [json.loads(line) for line in (SAMPLES / "medquad" / "medquad_sample.jsonl").read_text().splitlines()]
    return [{"question": r["question"], "answer": r["answer"]} for r in rows if r["source"] == source][:n]


def _site_files(tmp: Path) -> tuple[list[Path], Path, list[dict]]:
    a, b, c, test = _rows("GHR", 60), _rows("GARD", 60), _rows("NIDDK", 60), _rows("CancerGov", 16)
    jsonl = tmp / "site0.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in a))
    parquet = tmp / "site1.parquet"
    pq.write_table(pa.Table.from_pylist(b), parquet)
    folder = tmp / "site2"
    folder.mkdir()
    with (folder / "part-1.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["question", "answer"])
        writer.writeheader()
        writer.writerows(c[:30])
    (folder / "part-2.json").write_text(json.dumps(c[30:]))
    broken = tmp / "site3.jsonl"
    broken.write_text(json.dumps(a[0]) + "\n" + '{"question": "Is my data broken?", "answer": \n')
    (tmp / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test))
    return [jsonl, parquet, folder, broken], tmp / "test.jsonl", a + b + c + test


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("byod")
    paths, test, raw = _site_files(tmp)
    (tmp / "c.toml").write_text(f"""
[run]
name = "byod"
output_dir = "{tmp / "runs"}"
[model]
name = "tiny-llama"
max_length = 48
[lora]
rank = 2
ffa = true
[data]
task = "question-answer"
site_paths = {json.dumps([str(p) for p in paths])}
test_path = "{test}"
max_eval_examples = 16
[partition]
scheme = "files"
num_clients = 4
[federation]
rounds = 1
min_clients = 3
[train]
local_steps = 2
batch_size = 8
[privacy]
epsilon = 4.0
delta = 1e-3
""")
    run_dir, seen = simulate_recording_messages(load_config(tmp / "c.toml"))
    return run_dir, [reply for _, replies in seen for reply in replies], raw


def test_sites_train_from_jsonl_parquet_and_a_mixed_folder(run):
    run_dir, _, _ = run
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[1]["status"] == "aggregated 3 sites securely"
    assert set(records[1]["train"]) == {"site-0", "site-1", "site-2"}
    for site in ("site-0", "site-1", "site-2"):
        assert json.loads((run_dir / "sites" / site / "privacy_ledger.json").read_text())["entries"]


def test_broken_site_says_only_data_invalid_and_touches_nothing(run):
    run_dir, seen, _ = run
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[1]["refused"] == {"site-3": DATA_INVALID}
    assert not (run_dir / "sites" / "site-3").exists(), "no ledger, no replay file, no partial training"
    from_broken = [r for r in seen if SiteStatus.from_content(r.content).site_id == "site-3"]
    assert len(from_broken) == 3  # base eval, train, eval
    for reply in from_broken:
        assert list(reply.content.keys()) == [STATUS]
        assert SiteStatus.from_content(reply.content) == SiteStatus("site-3", SiteState.REFUSED, DATA_INVALID)


def test_nothing_about_raw_records_reaches_the_server(run):
    _, seen, raw = run
    fragments = {text[:24] for r in raw for text in (r["question"], r["answer"]) if len(text) >= 24}
    for reply in seen:
        assert not reply.has_error()
        assert set(reply.content.keys()) <= {ADAPTER, METRICS, STATUS, SECAGG, SECAGG_NEXT, MASKED}
        strings = []
        for record in reply.content.values():
            if isinstance(record, ConfigRecord | MetricRecord):
                strings += [str(k) for k in record] + [str(v) for v in record.values()]
        assert not any(f in s for f in fragments for s in strings)
        if METRICS in reply.content:
            assert set(reply.content[METRICS]) == set(TrainReport.keys()), "training metrics only: not opted in"
        elif (status := SiteStatus.from_content(reply.content)).state is SiteState.DECLINED:
            assert status.reason == NO_METRICS
