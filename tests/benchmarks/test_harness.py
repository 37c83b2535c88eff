"""The benchmarks' shared harness: flags, report files, plot files, and how the tests load it."""

from __future__ import annotations

import json
import logging
import struct
import sys

import pytest

from tests.benchmarks.scripts import SCRIPTS, load_benchmark_module, load_benchmark_script, sibling_imports

harness = load_benchmark_module("harness")


def test_command_reproduces_the_run(monkeypatch):
    assert harness.command("scale", ["--quick", "--rounds", "4"]) == "python benchmarks/scale.py --quick --rounds 4"
    assert harness.command("scale", []) == "python benchmarks/scale.py"
    monkeypatch.setattr(sys, "argv", ["benchmarks/scale.py", "--probe-only"])
    assert harness.command("scale") == "python benchmarks/scale.py --probe-only"


def test_header_opens_every_report_the_same_way():
    head = harness.header("dp_overhead", ["--quick"], machine_note=", torch 2.x")
    assert list(head) == ["benchmark", "machine", "command"]
    assert head["benchmark"] == "dp_overhead"
    assert head["machine"] == harness.machine() + ", torch 2.x"
    assert head["command"] == "python benchmarks/dp_overhead.py --quick"


def test_smoke_runs_can_keep_their_report_apart():
    assert harness.report_name("utility", quick=False) == "utility"
    assert harness.report_name("utility", quick=True) == "utility-quick"


def test_common_flags():
    parser = harness.benchmark_parser("Why this benchmark.", quick="one model only")
    args = parser.parse_args([])
    assert (args.quick, args.out) == (False, harness.RESULTS)
    assert not hasattr(args, "report")
    args = parser.parse_args(["--quick", "--out", "elsewhere"])
    assert args.quick and str(args.out) == "elsewhere"
    assert "Why this benchmark." in parser.format_help() and "one model only" in parser.format_help()
    with_report = harness.benchmark_parser(None, quick="q", report="from the JSON alone")
    assert with_report.parse_args(["--report"]).report is True


def test_report_round_trip(tmp_path, capsys):
    out = tmp_path / "results"
    assert harness.read_report(out, "scale") == {}
    plotted = []
    report = {"benchmark": "scale", "rows": [{"clients": 10, "wall_s": 1.5}]}
    path = harness.write_report(out, "scale", report, plotted.append, wall_s=12.4)
    assert path == out / "scale.json"
    assert json.loads(path.read_text()) == report == harness.read_report(out, "scale")
    assert plotted == [out / "scale.png"]
    assert f"wrote {path} and .png (12s)" in capsys.readouterr().out


def test_grouped_keeps_every_row_in_order_of_first_appearance():
    rows = [{"model": "b", "i": 0}, {"model": "a", "i": 1}, {"model": "b", "i": 2}]
    groups = harness.grouped(rows, "model")
    assert list(groups) == ["b", "a"]
    assert [r["i"] for r in groups["b"]] == [0, 2] and [r["i"] for r in groups["a"]] == [1]
    assert harness.grouped([], "model") == {}


def test_figure_saves_a_png_and_leaves_no_figure_open(tmp_path):
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    with harness.figure(tmp_path / "a.png", 1, 2, figsize=(4, 2), squeeze=False) as (_, axes):
        assert axes.shape == (1, 2)
        axes[0][0].plot([0, 1], [1, 0])
    png = (tmp_path / "a.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", png[16:24]) == (480, 240)  # 4 x 2 inches at 120 dpi
    with pytest.raises(RuntimeError), harness.figure(tmp_path / "b.png") as (_, ax):
        raise RuntimeError("a plot that fails writes nothing")
    assert not (tmp_path / "b.png").exists()
    assert plt.get_fignums() == before


def test_quiet_sets_the_named_loggers_and_silences_progress_bars(monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    logger = logging.getLogger("fedtune-harness-test")
    harness.quiet({"fedtune-harness-test": logging.ERROR})
    assert logger.level == logging.ERROR
    assert harness.os.environ["TQDM_DISABLE"] == "1"


def test_scripts_see_the_harness_registered_under_its_bare_name():
    assert "harness" in sibling_imports(SCRIPTS / "pooling_probe.py")
    probe = load_benchmark_script("pooling_probe")
    assert probe.write_report is sys.modules["harness"].write_report is harness.write_report
    assert load_benchmark_module("harness") is harness  # loaded once
