"""The utility benchmark compares what it says: same data and test set, ledger epsilons, honest ratios."""

from __future__ import annotations

import dataclasses
import json

import pytest

from fedtune.common.data.federation_data import build_site_splits, load_site_files, server_test_set
from fedtune.server.strategies import build_strategy
from tests.benchmarks.scripts import load_benchmark_module, load_benchmark_script
from tests.conftest import SAMPLES

utility = load_benchmark_script("utility")
variants = load_benchmark_module("utility_variants")
BANKING = SAMPLES / "banking77"


@pytest.fixture()
def workload():
    settings = (
        f"data.path='{BANKING / 'train.csv'}'",
        f"data.test_path='{BANKING / 'test.csv'}'",
        f"data.labels_file='{BANKING / 'categories.json'}'",
        "partition.scheme='dirichlet'",
        "partition.num_clients=3",
        "partition.alpha=0.5",
        "data.max_eval_examples=50",
    )
    return variants.Workload(
        "sample",
        "banking77-minilm",
        settings,
        2,
        variants.Schedule(3, 16, 1e-2),
        variants.Schedule(2, 64, 5e-2),
        (8.0, 1.0),
        (1,),
    )


def test_variants_differ_only_where_they_should(workload, tmp_path):
    cfgs = {v: variants.config_for(workload, v, tmp_path) for v in ["centralised", "federated", "dp-eps8", "dp-eps1"]}
    central, fed, dp8, dp1 = cfgs.values()
    assert (central.partition.num_clients, central.privacy.enabled, central.secure_aggregation.enabled) == (
        1,
        False,
        False,
    )
    assert central.train.local_steps == 3 * fed.train.local_steps  # as many records a round as the federation
    assert (fed.partition.num_clients, fed.privacy.enabled, fed.secure_aggregation.enabled) == (3, False, True)
    assert (dp8.privacy.enabled, dp8.privacy.epsilon, dp1.privacy.epsilon) == (True, 8.0, 1.0)
    assert (dp8.train.batch_size, dp8.train.lr, fed.train.batch_size) == (64, 5e-2, 16)
    assert {c.federation.rounds for c in cfgs.values()} == {2}
    assert len({tuple(e.text for e in server_test_set(c)) for c in cfgs.values()}) == 1  # one held-out set
    longer = dataclasses.replace(workload, private_rounds=5)
    assert variants.config_for(longer, "dp-eps8", tmp_path).federation.rounds == 5
    assert variants.config_for(longer, "federated", tmp_path).federation.rounds == 2


def test_server_optimiser_variants_are_the_dp_variant_with_another_server_step(workload, tmp_path):
    banking = dataclasses.replace(variants.WORKLOADS["banking77"], settings=workload.settings)  # sample data

    def server_variants(w):
        return [
            v
            for v in variants.variant_names(w)
            if v.startswith("dp-eps") and v.count("-") == 2 and not v.endswith("-prior")
        ]

    names = server_variants(banking)
    assert names == ["dp-eps8-fedadam", "dp-eps8-fedavgm", "dp-eps1-fedadam", "dp-eps1-fedavgm"]

    def without_server(cfg):
        dump = cfg.model_dump()
        dump["federation"] = {k: v for k, v in dump["federation"].items() if k not in ("strategy", "server_optimizer")}
        return dump | {"run": {**dump["run"], "name": ""}}

    for name in names:
        cfg = variants.config_for(banking, name, tmp_path)
        plain = variants.config_for(banking, name.rsplit("-", 1)[0], tmp_path)
        strategy = build_strategy(cfg.federation)  # a known strategy, with valid hyperparameters
        expected = name.split("-")[2]
        assert (plain.federation.strategy, cfg.federation.strategy, strategy.name) == ("fedavg", expected, expected)
        assert without_server(cfg) == without_server(plain)  # same data, schedule, epsilon and rounds
    adam = variants.config_for(banking, "dp-eps1-fedadam", tmp_path).federation.server_optimizer
    avgm = variants.config_for(banking, "dp-eps8-fedavgm", tmp_path).federation.server_optimizer
    assert (adam.lr, adam.beta1, adam.beta2, adam.tau, avgm.lr, avgm.momentum) == (0.1, 0.9, 0.99, 1e-3, 0.3, 0.9)
    assert server_variants(variants.WORKLOADS["medquad"]) == []
    with pytest.raises(ValueError, match="no server optimiser 'fedyogi'"):
        variants.variant_settings(banking, "dp-eps8-fedyogi", 10)


def test_the_label_prior_variant_is_the_dp_variant_with_a_label_name_head_and_its_own_step(workload, tmp_path):
    banking = dataclasses.replace(variants.WORKLOADS["banking77"], settings=workload.settings)  # sample data
    assert [v for v in variants.variant_names(banking) if v.endswith("-prior")] == ["dp-eps1-prior"]
    cfg = variants.config_for(banking, "dp-eps1-prior", tmp_path)
    plain = variants.config_for(banking, "dp-eps1", tmp_path)
    assert (plain.model.head_init, cfg.model.head_init, cfg.model.head_init_scale) == ("random", "label_names", 3.0)
    assert (plain.train.lr, cfg.train.lr) == (60.0, 20.0)
    dump, plain_dump = cfg.model_dump(), plain.model_dump()
    for section, keys in (("model", ("head_init", "head_init_scale")), ("train", ("lr",)), ("run", ("name",))):
        for key in keys:
            dump[section].pop(key), plain_dump[section].pop(key)
    assert dump == plain_dump  # same data, privacy, schedule and rounds
    assert [v for v in variants.variant_names(variants.WORKLOADS["medquad"]) if v.endswith("-prior")] == []


def test_local_site_trains_on_exactly_its_federated_records(workload, tmp_path):
    extra = variants.site_files(workload, 1, tmp_path)
    cfg = variants.config_for(workload, "local-site-1", tmp_path, extra)
    federated_sites, federated_test = build_site_splits(variants.config_for(workload, "federated", tmp_path))
    alone = load_site_files(cfg, 0)
    assert [(e.text, e.target) for e in alone.train] == [(e.text, e.target) for e in federated_sites[1].train]
    assert [e.text for e in server_test_set(cfg)] == [e.text for e in federated_test]
    assert (cfg.partition.num_clients, cfg.privacy.enabled) == (1, False)


def _fake_run(path, accuracies, epsilons=()):
    (path / "sites").mkdir(parents=True)
    lines = [
        {
            "round": i,
            "status": "base model" if i == 0 else "aggregated 3 sites",
            "server": {"loss": 1.0, "accuracy": a, "macro-f1": a / 2},
        }
        for i, a in enumerate(accuracies)
    ]
    (path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (path / "config.json").write_text("{}")
    for k, eps in enumerate(epsilons):
        (path / "sites" / f"site-{k}").mkdir()
        (path / "sites" / f"site-{k}" / "privacy_ledger.json").write_text(
            json.dumps({"delta": 1e-4, "epsilon": eps, "entries": []})
        )
    return {**utility.read_run(path), "done": True, "wall_s": 1.0}


def test_summary_reads_epsilon_from_ledgers_and_ratios_against_centralised(workload, tmp_path):
    runs = {
        "centralised": _fake_run(tmp_path / "c", [0.0, 0.5, 0.8]),
        "dp-eps8": _fake_run(tmp_path / "d", [0.0, 0.3, 0.6], epsilons=(7.91, 7.99)),
        "local-site-1": _fake_run(tmp_path / "l1", [0.0, 0.2, 0.4]),
        "local-site-2": _fake_run(tmp_path / "l2", [0.0, 0.1, 0.2]),
    }
    rows = {r["variant"].split(" ")[0]: r for r in utility.summarise(workload, runs)}
    assert rows["dp-eps8"]["epsilon"] == 7.99 and rows["centralised"]["epsilon"] is None
    assert rows["dp-eps8"]["pct_of_centralised"] == pytest.approx(75.0)
    assert (rows["local"]["accuracy"], rows["local"]["accuracy_min"], rows["local"]["accuracy_max"]) == pytest.approx(
        (0.3, 0.2, 0.4)
    )
    assert rows["base"]["accuracy"] == 0.0
    assert "75.0%" in utility.format_table(workload, list(rows.values()))


def test_a_run_with_a_lost_round_is_neither_resumed_nor_counted(tmp_path):
    run = tmp_path / "run"
    _fake_run(run, [0.0, 0.3])
    (run / "run.json").write_text("{}")
    assert utility._resumable(run)  # unfinished, every round so far aggregated
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lost = json.loads(lines[1]) | {"status": "failed: secure aggregation: masked input: only 0 sites remain"}
    (run / "metrics.jsonl").write_text("\n".join([lines[0], json.dumps(lost)]) + "\n")
    assert not utility._resumable(run)
    (run / "result.json").write_text("{}")
    assert not utility._resumable(run)
