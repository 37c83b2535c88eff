"""What a run leaves for people: metrics as JSON lines, a summary table, and a PNG of the curves."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from fedtune.common.atomic_files import atomic_write_bytes
from fedtune.common.tasks.base import TaskShape
from fedtune.common.wire import TrainReport


class MetricsLog:
    """One JSON object per round in ``metrics.jsonl``; round 0 is the base model before training."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def keep_through(self, last_round: int) -> None:
        """Drop records of rounds after ``last_round`` (they were not checkpointed before a crash)."""
        kept = [r for r in self.read() if r["round"] <= last_round]
        atomic_write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in kept).encode())

    def append(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())


def train_entry(report: TrainReport, bytes_sent: int, bytes_received: int) -> dict[str, float]:
    """A site's entry in a round's ``train`` in metrics.jsonl.

    Its keys predate the wire contract and stay as they were, so runs old and new read alike
    (here and in the benchmarks): ``epsilon`` is the site's ``epsilon_spent``.
    """
    return {
        "num-examples": report.num_examples,
        "steps": report.steps,
        "epsilon": report.epsilon_spent,
        "noise-multiplier": report.noise_multiplier,
        "sample-rate": report.sample_rate,
        "bytes-sent": bytes_sent,
        "bytes-received": bytes_received,
    }


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def summary_table(records: list[dict[str, Any]], task: TaskShape) -> str:
    """A plain-text table: one row per round, the held-out metric, site metrics, epsilon and traffic."""
    metric = task.head.headline_metric
    second = "loss" if metric != "loss" else "perplexity"
    # Site-level DP on: its epsilon (a whole site's participation) beside the per-record one.
    site_level = any("site-level-epsilon" in r for r in records)
    site_eps = f"{'site eps':>8}  " if site_level else ""
    head = (
        f"{'round':>5}  {'held-out ' + metric:>18}  {'held-out ' + second:>18}  {'site val ' + metric:>18}  "
        f"{'max eps':>8}  {site_eps}{'sent/site':>10}  {'recv/site':>10}  status"
    )
    lines = [head, "-" * len(head)]
    for r in records:
        server = r.get("server", {})
        sites = [m.get(metric) for m in r.get("clients", {}).values() if metric in m]
        train = r.get("train", {})
        eps = [t["epsilon"] for t in train.values() if "epsilon" in t]
        sent = [t["bytes-sent"] for t in train.values()]
        recv = [t["bytes-received"] for t in train.values()]
        lines.append(
            f"{r['round']:>5}  {server.get(metric, float('nan')):>18.4f}  {server.get(second, float('nan')):>18.4f}  "
            f"{(sum(sites) / len(sites)) if sites else float('nan'):>18.4f}  "
            f"{max(eps) if eps else 0.0:>8.3f}  "
            + (f"{r.get('site-level-epsilon', 0.0):>8.3f}  " if site_level else "")
            + f"{_fmt_bytes(max(sent)) if sent else '-':>10}  "
            f"{_fmt_bytes(max(recv)) if recv else '-':>10}  {r.get('status', '')}"
        )
    return "\n".join(lines)


def plot_curves(records: list[dict[str, Any]], task: TaskShape, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = task.head.headline_metric
    rounds = [r["round"] for r in records]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot(rounds, [r.get("server", {}).get(metric) for r in records], "o-", label="server held-out")
    sites = sorted({s for r in records for s in r.get("clients", {})})
    for site in sites:
        axes[0].plot(
            rounds,
            [r.get("clients", {}).get(site, {}).get(metric) for r in records],
            ".--",
            alpha=0.6,
            label=f"{site} val",
        )
    axes[0].set(title=f"{metric} per round (round 0 = base model)", xlabel="round", ylabel=metric)
    axes[0].legend(fontsize=7)
    axes[1].plot(rounds, [r.get("server", {}).get("loss") for r in records], "o-")
    axes[1].set(title="held-out loss", xlabel="round", ylabel="loss")
    for site in sites:
        pts = [(r["round"], r["train"][site]["epsilon"]) for r in records if site in r.get("train", {})]
        if pts:
            axes[2].plot(*zip(*pts, strict=False), "o-", label=site)
    axes[2].set(title="epsilon spent per site (accountant)", xlabel="round", ylabel="epsilon")
    if sites:
        axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
