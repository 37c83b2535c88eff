"""What every benchmark script shares: its common flags, the report it writes, and how it plots.

Each script runs as ``python benchmarks/NAME.py`` and imports this module from its own folder
(``from harness import ...``): ``benchmarks/`` is no package, because opacus' wheel installs a
top-level package of that name. The tests load the scripts by path (``tests/benchmarks/scripts.py``),
which registers this module first.

A script writes one JSON report and its PNG plot into ``--out`` (``benchmarks/results``), named
after the script. The JSON starts with what says where a figure came from: the benchmark, the
machine, and the command line that reproduces it (docs/benchmarks.md prints it).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fedtune.common.atomic_files import atomic_write_json

#: Where the reports go unless ``--out`` says otherwise (relative: the scripts run from the repository root).
RESULTS = Path("benchmarks/results")
#: The full data sets (see /work/shared/data/README.md); FEDTUNE_DATA points elsewhere.
DATA = Path(os.environ.get("FEDTUNE_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


# --- command line ---------------------------------------------------------------------------


def benchmark_parser(doc: str | None, quick: str, report: str | None = None) -> argparse.ArgumentParser:
    """An argument parser that prints the script's docstring, with ``--quick`` (a smoke run, ``quick``
    says what it is), ``--out`` and, if the script can redo its report from its JSON alone, ``--report``."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=quick)
    p.add_argument("--out", type=Path, default=RESULTS, help=f"folder of the JSON and PNG (default: {RESULTS})")
    if report is not None:
        p.add_argument("--report", action="store_true", help=report)
    return p


def quiet(loggers: dict[str, int] | None = None, ignore_warnings: bool = False) -> None:
    """No progress bars, each named logger at its level (libraries chatter), and no warnings if asked."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    for name, level in (loggers or {}).items():
        logging.getLogger(name).setLevel(level)
    if ignore_warnings:
        warnings.filterwarnings("ignore")


# --- the report -----------------------------------------------------------------------------


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPUs"


def command(script: str, argv: Sequence[str] | None = None) -> str:
    """The command line that reproduces the report (``argv`` None: this process's own arguments)."""
    return " ".join(["python", f"benchmarks/{script}.py", *(sys.argv[1:] if argv is None else argv)])


def header(script: str, argv: Sequence[str] | None = None, machine_note: str = "") -> dict[str, str]:
    """The first keys of a report: which benchmark, on what machine, run by which command."""
    return {"benchmark": script, "machine": machine() + machine_note, "command": command(script, argv)}


def report_name(script: str, quick: bool) -> str:
    """The file name (no suffix) of a report; a smoke run's is kept apart where the script says so."""
    return f"{script}-quick" if quick else script


def read_report(out: Path, name: str) -> dict[str, Any]:
    """``out/name.json`` as written before, or an empty report if there is none."""
    path = out / f"{name}.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def write_report(out: Path, name: str, report: dict[str, Any], plot: Callable[[Path], None], wall_s: float) -> Path:
    """``out/name.json`` (written atomically) and ``out/name.png``; says where they went."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    atomic_write_json(path, report)
    plot(out / f"{name}.png")
    print(f"wrote {path} and .png ({wall_s:.0f}s)")
    return path


# --- plots ----------------------------------------------------------------------------------


def grouped(rows: Iterable[dict[str, Any]], key: str) -> dict[Any, list[dict[str, Any]]]:
    """The rows by their value of ``key``, groups in order of first appearance (one panel or line each)."""
    groups: dict[Any, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row[key], []).append(row)
    return groups


@contextmanager
def figure(
    path: Path, nrows: int = 1, ncols: int = 1, figsize: tuple[float, float] = (6.0, 4.0), squeeze: bool = True
) -> Iterator[tuple[Any, Any]]:
    """``(fig, axes)`` of a new figure that is laid out and saved to ``path`` (PNG, 120 dpi) when the block ends.

    Matplotlib draws off-screen (the Agg backend): the benchmarks run on machines with no display.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(nrows, ncols, figsize=figsize, squeeze=squeeze)
    try:
        yield fig, axes
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
