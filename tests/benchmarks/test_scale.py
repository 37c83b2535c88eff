"""The scale benchmark's pure parts: completeness, growth and fit, and the engine-polling probe."""

from __future__ import annotations

import pytest

from tests.benchmarks.scripts import load_benchmark_module, load_benchmark_script

scale = load_benchmark_script("scale")
engine_polling = load_benchmark_module("engine_polling")


def test_a_run_that_lost_a_site_in_any_round_is_not_complete():
    assert scale.is_complete(3, ["aggregated 3 sites securely"] * 2)
    assert not scale.is_complete(3, ["aggregated 3 sites securely", "aggregated 2 sites securely"])
    assert not scale.is_complete(3, [])


def test_the_fit_recovers_a_fixed_cost_and_a_cost_per_site():
    rows = [{"clients": n, "median_round_cpu_s": 5.0 + 1.5 * n} for n in (10, 25, 50, 100)]
    fit = scale.linear_fit(rows, "median_round_cpu_s")
    assert fit["per_site_s"] == pytest.approx(1.5) and fit["fixed_s"] == pytest.approx(5.0)
    assert scale.linear_fit(rows[:1], "median_round_cpu_s") == {}


def test_the_polling_probe_runs_flowers_own_scan_once_per_node_and_message(monkeypatch):
    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState

    checked = []
    real = InMemoryLinkState._check_stored_messages
    monkeypatch.setattr(
        InMemoryLinkState,
        "_check_stored_messages",
        lambda self, ids, run_id=None: (checked.extend(ids), real(self, ids, run_id))[1],
    )
    rows = engine_polling.engine_polling_cost([3, 7], sweeps=2)
    # Each node's poll checks every stored message: sites^2 checks a sweep.
    assert len(checked) == 2 * 3 * 3 + 2 * 7 * 7
    assert [r["clients"] for r in rows] == [3, 7]
    assert all(r["cpu_s_per_round_second"] == pytest.approx(10 * r["sweep_cpu_s"]) for r in rows)
