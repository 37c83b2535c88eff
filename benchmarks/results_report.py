"""What every benchmark script writes: one JSON report and its PNG plot, named after the script.

Imported by the scripts from their own folder (``benchmarks/`` is not a package: opacus' wheel
installs a top-level package of that name).
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fedtune.common.atomic_files import atomic_write_json


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPUs"


def command(script: str, argv: Sequence[str]) -> str:
    """The command line that reproduces the report, as docs/benchmarks.md prints it."""
    return " ".join(["python", f"benchmarks/{script}.py", *argv])


def write_report(out: Path, name: str, report: dict[str, Any], plot: Callable[[Path], None], wall_s: float) -> Path:
    """``out/name.json`` (written atomically) and ``out/name.png``; says where they went."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    atomic_write_json(path, report)
    plot(out / f"{name}.png")
    print(f"wrote {path} and .png ({wall_s:.0f}s)")
    return path
