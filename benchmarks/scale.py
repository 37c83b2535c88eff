"""Wall time per round and peak memory of a simulated federation as it grows from 10 to 100 sites.

Each federation size is one real ``fedtune simulate`` run (``fedtune.simulation.simulate``:
Flower's simulation engine, one Ray actor per ``federation.cpus_per_client`` CPUs) of the
random-initialised ``tiny-bert`` classifier with FFA-LoRA on Banking77 intents, in two
variants run alternately at each size: ``dp``, the product's defaults (DP-SGD at epsilon 8 per
site, SecAgg+ secure aggregation), and ``no-dp`` (SecAgg+ only), which shows what the
per-site privacy accounting costs. Every site holds the same number of records (IID), so the
work per site is fixed and only the number of sites grows. Each run is its own child process,
so memory is measured from a clean start: a background thread samples the resident memory
(RSS, and PSS, which shares pages fairly between processes) of the child's whole process tree
(driver, Ray's GCS and raylet, the actors). A round's wall time is the gap between the
checkpoints of consecutive rounds (local training on every site, the SecAgg+ exchanges,
held-out evaluation on the server, the checkpoint); round 1 also loads every site's data and
is left out of the median.
Next to it, the CPU seconds the whole process tree spent in the same interval: Ray runs its
actors at nice 15, so on a shared machine other people's work stretches wall time, not CPU.
Prints a table, writes JSON and a PNG.

    python benchmarks/scale.py             # 10, 25, 50, 100 sites x {dp, no-dp}, 3 rounds each
    python benchmarks/scale.py --quick     # 10 and 25 sites
    python benchmarks/scale.py --clients 10 200 --rounds 5 --variants dp
    python benchmarks/scale.py --probe-only   # only the engine's polling cost, into scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from engine_polling import engine_polling_cost
from harness import DATA, benchmark_parser, command, figure, machine, read_report, write_report
from process_usage import TreeSampler

REPO = Path(__file__).resolve().parents[1]
SHARED_BANKING77 = DATA / "banking77"
SAMPLE_BANKING77 = REPO / "common" / "data" / "samples" / "banking77"


def data_dir() -> Path:
    """The full Banking77 set when this machine has it, else the shipped sample."""
    return SHARED_BANKING77 if (SHARED_BANKING77 / "train.csv").exists() else SAMPLE_BANKING77


VARIANTS = ("dp", "no-dp")


def federation_config(clients: int, records_per_site: int, rounds: int, out: Path, variant: str) -> dict:
    """A raw fedtune config: tiny-bert, secure aggregation on, DP-SGD on unless ``variant`` is ``no-dp``."""
    data = data_dir()
    return {
        "run": {"name": f"scale-{clients}-{variant}", "output_dir": str(out), "seed": 0},
        "model": {"name": "tiny-bert", "max_length": 32},
        "lora": {"rank": 4, "alpha": 16, "ffa": True},
        "data": {
            "path": str(data / "train.csv"),
            "test_path": str(data / "test.csv"),
            "labels_file": str(data / "categories.json"),
            "task": "classification",
            "fields": {"text": "text", "label": "category"},
            "max_records": records_per_site * clients,
            "max_eval_examples": 256,
        },
        "partition": {"scheme": "iid", "num_clients": clients, "min_examples": 20},
        "federation": {"rounds": rounds, "min_clients": 2, "cpus_per_client": 1.0},
        "train": {"local_steps": 5, "batch_size": 16, "lr": 2e-2, "optimizer": "adam", "torch_threads": 1},
        "privacy": {"enabled": variant == "dp", "epsilon": 8.0, "delta": 1e-4, "share_site_metrics": False},
        "secure_aggregation": {"enabled": True},
    }


def run_one(clients: int, records_per_site: int, rounds: int, out: Path, variant: str) -> None:
    """Child process: one simulated federation; its run directory is all the parent reads."""
    import logging

    from fedtune.common.config import config_from_dict
    from fedtune.simulation import simulate

    os.environ.setdefault("TQDM_DISABLE", "1")
    logging.getLogger("fedtune").setLevel(logging.ERROR)
    raw = federation_config(clients, records_per_site, rounds, out, variant)
    cfg = config_from_dict(raw, "scale benchmark", REPO)
    simulate(cfg)


def round_ends(run_dir: Path) -> dict[int, float]:
    """When each round's checkpoint was written (its last step)."""
    return {
        int(p.parent.name.split("-")[1]): p.stat().st_mtime
        for p in (run_dir / "checkpoints").glob("round-*/round.json")
    }


def per_round(ends: dict[int, float], clock) -> dict[int, float]:
    """``clock`` (wall or CPU seconds) spent between consecutive checkpoints; round 1 has no predecessor."""
    return {r: clock(ends[r]) - clock(ends[r - 1]) for r in sorted(ends) if r - 1 in ends}


def is_complete(clients: int, statuses: list[str]) -> bool:
    """Every round aggregated every site: a run that lost sites (Ray's memory monitor kills actors when the
    machine runs short of memory) did not measure this federation size."""
    return bool(statuses) and all(s == f"aggregated {clients} sites securely" for s in statuses)


def measure(clients: int, variant: str, records_per_site: int, rounds: int, work: Path) -> dict:
    """Run one federation in a child process and read its run directory and memory peaks."""
    out = work / f"clients-{clients}-{variant}"
    work.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        __file__,
        "--one",
        str(clients),
        "--variant",
        variant,
        "--records-per-site",
        str(records_per_site),
        "--rounds",
        str(rounds),
        "--work",
        str(out),
    ]
    load_before = os.getloadavg()
    started = time.time()
    log_path = work / f"clients-{clients}-{variant}.log"
    with log_path.open("w") as log, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO) as child:
        with TreeSampler(child.pid) as memory:
            child.wait()
    wall = time.time() - started
    if child.returncode != 0:
        raise RuntimeError(
            f"{clients} sites, {variant}: the simulation failed (exit {child.returncode}); see {log_path}"
        )
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    ends = round_ends(run_dir)
    wall_rounds, cpu_rounds = per_round(ends, lambda t: t), per_round(ends, memory.cpu_at)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = records[-1]
    eps = [t["epsilon"] for t in last.get("train", {}).values()]
    return {
        "clients": clients,
        "variant": variant,
        "records_per_site": records_per_site,
        "rounds": rounds,
        "round_s": wall_rounds,
        "median_round_s": statistics.median(wall_rounds.values()),
        "median_round_s_per_site": statistics.median(wall_rounds.values()) / clients,
        "round_cpu_s": cpu_rounds,
        "median_round_cpu_s": statistics.median(cpu_rounds.values()),
        "process_cpu_s": memory.cpu_series[-1][1] if memory.cpu_series else None,
        "process_wall_s": wall,
        "peak_tree_rss_mb": memory.peak_rss / 2**20,
        "peak_tree_pss_mb": memory.peak_pss / 2**20,
        "peak_driver_rss_mb": memory.peak_root_rss / 2**20,
        "peak_processes": memory.peak_processes,
        "statuses": [r.get("status") for r in records[1:]],
        "complete": is_complete(clients, [r.get("status") for r in records[1:]]),
        "contributors_last_round": len(last.get("train", {})),
        "max_epsilon_last_round": max(eps) if eps else None,
        "final_accuracy": last["server"].get("accuracy"),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
    }


def accounting_cost(records_per_site: int, rounds: int) -> dict:
    """Seconds a dp site spends on privacy maths each round, timed in this process with the sites' own numbers.

    Every round a site calibrates its noise for the whole plan and asks its ledger for epsilon
    twice (the budget check before training, the entry after); see ``client.site.Site.train``.
    """
    from fedtune.common.config import DataConfig
    from fedtune.common.privacy.accounting import calibrate_noise, epsilon_spent

    cfg = federation_config(1, records_per_site, rounds, Path("."), "dp")
    train, privacy = cfg["train"], cfg["privacy"]
    n = records_per_site - round(records_per_site * DataConfig.model_fields["val_fraction"].default)
    q = min(1.0, train["batch_size"] / n)
    start = time.perf_counter()
    sigma = calibrate_noise(privacy["epsilon"], privacy["delta"], q, rounds * train["local_steps"])
    calibrate_s = time.perf_counter() - start
    start = time.perf_counter()
    epsilon_spent([(sigma, q, train["local_steps"])] * rounds, privacy["delta"])
    ledger_s = (time.perf_counter() - start) / rounds
    return {
        "sample_rate": q,
        "noise_multiplier": sigma,
        "calibrate_noise_s": calibrate_s,
        "epsilon_per_ledger_entry_s": ledger_s,
    }


def growth(rows: list[dict]) -> dict:
    """Largest over smallest federation of one variant: the factor each figure grows by."""
    small, large = rows[0], rows[-1]
    keys = ("median_round_s", "median_round_cpu_s", "peak_tree_rss_mb", "peak_tree_pss_mb", "peak_driver_rss_mb")
    return {
        "from_clients": small["clients"],
        "to_clients": large["clients"],
        "sites_factor": large["clients"] / small["clients"],
        **{k: large[k] / small[k] for k in keys},
    }


def linear_fit(rows: list[dict], key: str) -> dict:
    """Least-squares ``round time = fixed + per_site * sites``: what one more site costs, and what does not grow."""
    if len(rows) < 2:
        return {}
    n = np.array([r["clients"] for r in rows], dtype=float)
    per_site, fixed = np.polyfit(n, np.array([r[key] for r in rows]), 1)
    return {"per_site_s": float(per_site), "fixed_s": float(fixed)}


def plot(rows: list[dict], path: Path) -> None:
    lines = (  # panel, figure, line style, label
        (0, "median_round_s", "-", "wall"),
        (0, "median_round_cpu_s", ":", "CPU (all processes)"),
        (1, "peak_tree_pss_mb", "-", "PSS, whole tree"),
        (1, "peak_tree_rss_mb", ":", "RSS, whole tree"),
        (1, "peak_driver_rss_mb", "-.", "driver RSS"),
    )
    with figure(path, 1, 2, figsize=(10, 3.8)) as (fig, axes):
        for variant, marker, color in zip(VARIANTS, ("o", "s"), ("C0", "C1"), strict=True):
            sel = [r for r in rows if r["variant"] == variant and is_complete(r["clients"], r["statuses"])]
            if not sel:
                continue
            n = [r["clients"] for r in sel]
            for panel, key, style, label in lines:
                axes[panel].plot(
                    n, [r[key] for r in sel], marker=marker, color=color, ls=style, label=f"{variant}: {label}"
                )
        left, right = axes
        left.set(xlabel="sites", ylabel="seconds", title="time per round (median)")
        left.set_ylim(bottom=0)
        left.legend(fontsize=8)
        right.set(xlabel="sites", ylabel="MiB", title="peak memory (driver + Ray)")
        right.set_ylim(bottom=0)
        right.legend(fontsize=7, loc="lower center", ncol=2)
        fig.suptitle("tiny-bert + FFA-LoRA, SecAgg+ on, 2 CPUs (1 per Ray actor)", fontsize=9)


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__, quick="10 and 25 sites")
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 25, 50, 100])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--rounds", type=int, default=3, help="rounds per federation (round 1 is warm-up)")
    parser.add_argument("--records-per-site", type=int, default=100)
    parser.add_argument("--work", type=Path, default=None, help="where the run directories go (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the run directories and logs")
    parser.add_argument(
        "--attempts", type=int, default=2, help="runs of a size until every round aggregates every site"
    )
    parser.add_argument(
        "--update",
        action="store_true",
        help="merge into the existing scale.json, replacing the sizes and variants measured now",
    )
    parser.add_argument(
        "--probe-only",
        action="store_true",
        help="only time the simulation engine's message polling, into the existing scale.json",
    )
    parser.add_argument("--one", type=int, default=0, help=argparse.SUPPRESS)  # child process: one federation
    parser.add_argument("--variant", choices=VARIANTS, default="dp", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        run_one(args.one, args.records_per_site, args.rounds, args.work, args.variant)
        return 0
    if args.quick:
        args.clients = [10, 25]
    if args.rounds < 3:
        parser.error("--rounds must be at least 3: round 1 is warm-up and the median needs two rounds")
    args.clients = sorted(args.clients)
    started = time.time()
    print(
        f"scale: {args.clients} sites x {args.records_per_site} records, {args.rounds} rounds, tiny-bert, "
        f"SecAgg+ on, variants {args.variants}, {os.cpu_count()} CPUs, data {data_dir()}"
    )
    polling = engine_polling_cost(args.clients)
    for p in polling:
        print(
            f"Flower's simulation engine, {p['clients']:4d} sites: {p['cpu_s_per_round_second']:.3f} CPU s per "
            "second of a round polling for messages (O(sites^2))",
            flush=True,
        )
    if args.probe_only:
        report = read_report(args.out, "scale")
        if not report:
            parser.error(f"--probe-only adds to a report: there is no {args.out / 'scale.json'}")
        report["engine_polling"] = polling
        report["commands"] = report.get("commands", []) + [command("scale", argv)]
        rows = report["rows"]
        write_report(args.out, "scale", report, lambda path: plot(rows, path), report["wall_s"])
        return 0
    work = args.work or Path(tempfile.mkdtemp(prefix="fedtune-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    accounting = accounting_cost(args.records_per_site, args.rounds) if "dp" in args.variants else {}
    if accounting:
        print(
            f"privacy maths of one dp site (this process, load {os.getloadavg()[0]:.1f}): calibrate_noise "
            f"{accounting['calibrate_noise_s']:.2f} s, epsilon of the ledger "
            f"{accounting['epsilon_per_ledger_entry_s']:.2f} s per entry",
            flush=True,
        )
    rows = []
    for i, n in enumerate(args.clients):
        for variant in args.variants if i % 2 == 0 else args.variants[::-1]:
            for attempt in range(1, args.attempts + 1):
                row = measure(n, variant, args.records_per_site, args.rounds, work / f"attempt-{attempt}") | {
                    "attempt": attempt
                }
                print(
                    f"  {n:4d} sites {variant:>5}: {row['median_round_s']:6.1f} s/round wall, "
                    f"{row['median_round_cpu_s']:6.1f} s CPU  peak PSS {row['peak_tree_pss_mb']:6.0f} "
                    f"MiB, RSS {row['peak_tree_rss_mb']:6.0f} MiB, driver {row['peak_driver_rss_mb']:5.0f} MiB  "
                    f"({row['peak_processes']} processes, {row['process_wall_s']:.0f} s in all, "
                    f"load {row['loadavg_before'][0]:.1f})",
                    flush=True,
                )
                if row["complete"]:
                    break
                print(
                    f"  INCOMPLETE: not every round aggregated all {n} sites ({row['statuses']}); see the log in "
                    f"{work / f'attempt-{attempt}'}",
                    flush=True,
                )
            rows.append(row)
    commands = [command("scale", argv)]
    previous = read_report(args.out, "scale") if args.update else {}
    if previous:
        measured = {(r["clients"], r["variant"]) for r in rows}
        rows += [r for r in previous["rows"] if (r["clients"], r["variant"]) not in measured]
        commands = previous.get("commands", [previous.get("command")]) + commands
        accounting = accounting or previous.get("accounting", {})
    rows.sort(key=lambda r: (VARIANTS.index(r["variant"]), r["clients"]))
    summary = {}
    for variant in VARIANTS:
        sel = [r for r in rows if r["variant"] == variant and is_complete(r["clients"], r["statuses"])]
        if len(sel) < 2:
            continue
        summary[variant] = {
            "growth": growth(sel),
            "wall_fit": linear_fit(sel, "median_round_s"),
            "cpu_fit": linear_fit(sel, "median_round_cpu_s"),
        }
        g, fit = summary[variant]["growth"], summary[variant]["cpu_fit"]
        print(
            f"{variant:>5}: {g['from_clients']} -> {g['to_clients']} sites (x{g['sites_factor']:g}): round wall "
            f"x{g['median_round_s']:.2f}, round CPU x{g['median_round_cpu_s']:.2f}, peak PSS "
            f"x{g['peak_tree_pss_mb']:.2f}, RSS x{g['peak_tree_rss_mb']:.2f}"
            + (f"; CPU per round ~ {fit['fixed_s']:.1f} s + {fit['per_site_s']:.2f} s/site" if fit else "")
        )
    report = {
        "benchmark": "scale",
        "machine": machine(),
        "commands": commands,
        "setup": {
            "model": "tiny-bert (random init), FFA-LoRA rank 4",
            "data": str(data_dir()),
            "partition": "iid",
            "secure_aggregation": "SecAgg+ on in both variants",
            "dp": "variant dp: DP-SGD, epsilon 8, delta 1e-4 per site; variant no-dp: off",
            "cpus_per_client": 1.0,
            "local_steps": 5,
            "batch_size": 16,
        },
        "wall_s": time.time() - started,
        "accounting": accounting,
        "engine_polling": polling,
        "rows": rows,
        "summary": summary,
    }
    write_report(args.out, "scale", report, lambda path: plot(rows, path), report["wall_s"])
    if not args.keep and args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
