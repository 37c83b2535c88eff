"""What federated DP fine-tuning keeps of the model quality, against its baselines.

Every variant is a real fedtune simulation (``fedtune.simulation.simulate``, Flower's engine,
secure aggregation on wherever there are several sites) of the same preset with the same
held-out test set, so the numbers are what a user of ``fedtune simulate`` gets, and every
epsilon is the one the sites' own privacy ledgers recorded (Opacus RDP accountant over the
steps actually taken):

- ``centralised``: one site holding all training records, non-private, as many records per
  round as the whole federation (``local_steps`` x number of sites);
- ``federated``: the federation, non-private;
- ``dp-eps8``, ``dp-eps4``, ``dp-eps1``: the federation with DP-SGD at that epsilon per site;
- ``dp-eps8-fedadam``, ``dp-eps8-fedavgm``, ``dp-eps1-...`` (Banking77): the same DP variant with
  that server optimiser instead of FedAvg (hyperparameters and why: utility_variants.SERVER_OPTIMISERS);
- ``local``: chosen sites train alone on their own training split (non-private, same
  schedule), each evaluated on the same held-out set; mean, min and max over those sites;
- ``base``: the model before training (round 0 of the first run).

Banking77 (MiniLM-L6, 10 banks, Dirichlet alpha = 0.5 over intents, full train/test sets):
accuracy and macro-F1 per round. MedQuAD (SmolLM2-135M, one hospital per NIH source, a
per-source subsample): held-out loss per round. Results are cached per variant in the JSON,
so an interrupted run resumes where it stopped (a variant cut off mid-way resumes from its
last complete round through ``fedtune simulate --resume``).

    python benchmarks/utility.py --quick                       # smoke run (3 banks, 2 rounds; 9 hospitals, 1 round)
    python benchmarks/utility.py --task banking77              # full Banking77 (times in docs/benchmarks.md)
    python benchmarks/utility.py --task medquad
    python benchmarks/utility.py --task banking77 --only dp-eps8 centralised
    python benchmarks/utility.py --task banking77 --only dp-eps8-fedadam dp-eps8-fedavgm dp-eps1-fedadam dp-eps1-fedavgm
    python benchmarks/utility.py --report                      # table and plot of what the JSON holds
    python benchmarks/utility.py --task banking77 --only dp-eps8 --dp-schedule 1 2048 40 \
        --out benchmarks/results/utility-tuning                # another DP-SGD setting, kept apart

Run one invocation at a time: several simulations at once on a 24 GB machine get their site
processes killed by Ray's out-of-memory monitor, and a run with a lost round is not counted.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from harness import benchmark_parser, command, figure, machine, read_report, report_name
from utility_variants import (
    QUICK,
    WORKLOADS,
    WORKLOADS_BY_NAME,
    Schedule,
    Workload,
    config_for,
    num_sites,
    site_files,
    variant_names,
    variant_settings,
)

from fedtune.common.atomic_files import atomic_write_json


def run_variant(w: Workload, variant: str, runs_dir: Path, previous: dict[str, Any] | None, on_start) -> dict[str, Any]:
    """One simulation (resumed if ``previous`` names a run directory it left unfinished)."""
    from fedtune.server.run_directory import load_run_config
    from fedtune.simulation import simulate

    prior_s = 0.0
    start = time.time()
    if previous and previous.get("run_dir") and _resumable(Path(previous["run_dir"])):
        run_dir = Path(previous["run_dir"])
        prior_s = float(previous.get("wall_s", 0.0))
        print(f"[{w.name}] {variant}: resuming {run_dir}", flush=True)
        simulate(load_run_config(run_dir), run_dir=run_dir, resume=True)
    else:
        extra = site_files(w, int(variant.rsplit("-", 1)[1]), runs_dir) if variant.startswith("local-site-") else []
        cfg = config_for(w, variant, runs_dir, extra)
        from fedtune.server.run_directory import new_run_dir

        run_dir = new_run_dir(cfg)
        on_start({"run_dir": str(run_dir), "wall_s": 0.0, "done": False})
        simulate(cfg, run_dir=run_dir)
    outcome = read_run(run_dir)
    # A round whose aggregate was lost (a site process killed, say) makes the run no measurement of
    # the schedule: it is kept in the JSON but left out of the table, and the next invocation reruns it.
    failed = [r["round"] for r in outcome["rounds"][1:] if not r["status"].startswith("aggregated")]
    if failed:
        print(f"[{w.name}] {variant}: rounds {failed} were not aggregated; not counted (see {run_dir})", flush=True)
    return {
        **outcome,
        "run_dir": str(run_dir),
        "wall_s": prior_s + time.time() - start,
        "done": not failed,
        "failed_rounds": failed,
    }


def _resumable(run_dir: Path) -> bool:
    """An unfinished run whose rounds so far were all aggregated (else its sites' budgets paid for nothing)."""
    if not (run_dir / "run.json").exists() or (run_dir / "result.json").exists():
        return False
    metrics = run_dir / "metrics.jsonl"
    records = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()] if metrics.exists() else []
    return all(r["status"].startswith(("aggregated", "base model")) for r in records)


def read_run(run_dir: Path) -> dict[str, Any]:
    """Per-round server metrics and training replies, and each site's final epsilon from its own ledger."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rounds = [{"round": r["round"], "status": r["status"], **{k: v for k, v in r["server"].items()}} for r in records]
    train = {r["round"]: r.get("train", {}) for r in records if r["round"] > 0}
    ledgers = {
        p.parent.name: json.loads(p.read_text()) for p in sorted((run_dir / "sites").glob("*/privacy_ledger.json"))
    }
    epsilon = {site: ledger["epsilon"] for site, ledger in ledgers.items()}
    last = train.get(max(train), {}) if train else {}
    return {
        "rounds": rounds,
        "epsilon_per_site": epsilon,
        "epsilon_max": max(epsilon.values()) if epsilon else None,
        "delta": next(iter(ledgers.values()))["delta"] if ledgers else None,
        "noise_multiplier": {s: m.get("noise-multiplier") for s, m in last.items()},
        "sample_rate": {s: m.get("sample-rate") for s, m in last.items()},
        "steps_per_round": {s: m.get("steps") for s, m in last.items()},
        "clipped_values": sum(int(r.get("secure-aggregation", {}).get("clipped-values", 0)) for r in records),
        "config": json.loads((run_dir / "config.json").read_text()),
    }


def summarise(w: Workload, variants: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per variant (local sites folded into one row: mean, min, max), with % of centralised."""
    metric = w.metric
    done = {v: r for v, r in variants.items() if r.get("done")}
    rows: list[dict[str, Any]] = []
    first = next(iter(done.values()), None)
    if first is not None:
        base = first["rounds"][0]
        rows.append({"variant": "base", **_final(base), "epsilon": None, "wall_s": 0.0, "curve": [base[metric]]})
    for v, r in done.items():
        if v.startswith("local-site-"):
            continue
        final = r["rounds"][-1]
        rows.append(
            {
                "variant": v,
                **_final(final),
                "epsilon": r["epsilon_max"],
                "wall_s": r["wall_s"],
                "curve": [x[metric] for x in r["rounds"]],
            }
        )
    local = [r for v, r in done.items() if v.startswith("local-site-")]
    if local:
        finals = [_final(r["rounds"][-1]) for r in local]
        row = {
            "variant": f"local ({len(local)} site{'s' if len(local) > 1 else ''}, mean)",
            "epsilon": None,
            "wall_s": sum(r["wall_s"] for r in local),
            "sites": [v for v in done if v.startswith("local-site-")],
            "curve": [statistics.mean(r["rounds"][i][metric] for r in local) for i in range(len(local[0]["rounds"]))],
        }
        for key in finals[0]:
            values = [f[key] for f in finals]
            row |= {key: statistics.mean(values), f"{key}_min": min(values), f"{key}_max": max(values)}
        rows.append(row)
    central = next((r for r in rows if r["variant"] == "centralised"), None)
    for row in rows:
        if central is not None and metric == "accuracy":
            row["pct_of_centralised"] = 100 * row["accuracy"] / central["accuracy"]
        if central is not None and metric == "loss":
            row["gain_vs_base_pct_of_centralised"] = _gain_share(rows[0]["loss"], row["loss"], central["loss"])
    return rows


def _final(server: dict[str, Any]) -> dict[str, float]:
    keys = ("accuracy", "macro-f1", "loss") if "accuracy" in server else ("loss", "perplexity")
    return {k: float(server[k]) for k in keys}


def _gain_share(base: float, value: float, central: float) -> float | None:
    """How much of centralised training's loss reduction a variant achieves, in %."""
    return None if base == central else 100 * (base - value) / (base - central)


def format_table(w: Workload, rows: list[dict[str, Any]]) -> str:
    if w.metric == "accuracy":
        head = f"{'variant':26s} {'accuracy':>9s} {'macro-F1':>9s} {'% central':>9s} {'eps (ledger)':>12s} {'wall':>8s}"
        lines = [head, "-" * len(head)]
        for r in rows:
            pct = f"{r['pct_of_centralised']:8.1f}%" if "pct_of_centralised" in r else f"{'-':>9s}"
            spread = f" [{r['accuracy_min']:.3f}-{r['accuracy_max']:.3f}]" if "accuracy_min" in r else ""
            lines.append(
                f"{r['variant']:26s} {r['accuracy']:9.4f} {r['macro-f1']:9.4f} {pct} "
                f"{_eps(r['epsilon']):>12s} {_mins(r['wall_s']):>8s}{spread}"
            )
        return "\n".join(lines)
    head = f"{'variant':26s} {'loss':>8s} {'ppl':>8s} {'% of central gain':>17s} {'eps (ledger)':>12s} {'wall':>8s}"
    lines = [head, "-" * len(head)]
    for r in rows:
        share = r.get("gain_vs_base_pct_of_centralised")
        share_text = f"{share:16.1f}%" if share is not None else f"{'-':>17s}"
        spread = f" [{r['loss_min']:.3f}-{r['loss_max']:.3f}]" if "loss_min" in r else ""
        lines.append(
            f"{r['variant']:26s} {r['loss']:8.4f} {r['perplexity']:8.2f} {share_text} "
            f"{_eps(r['epsilon']):>12s} {_mins(r['wall_s']):>8s}{spread}"
        )
    return "\n".join(lines)


def _eps(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _mins(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds else "-"


def plot(panels: list[tuple[Workload, list[dict[str, Any]]]], path: Path) -> None:
    from matplotlib.ticker import MaxNLocator

    with figure(path, 1, len(panels), figsize=(6 * len(panels), 4), squeeze=False) as (_, axes):
        for ax, (w, rows) in zip(axes[0], panels, strict=True):
            for row in rows:
                if row["variant"] == "base":
                    ax.axhline(row["curve"][0], color="grey", ls=":", lw=1, label="base model")
                    continue
                ax.plot(range(len(row["curve"])), row["curve"], marker="o", ms=3, label=row["variant"])
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("round")
            ax.set_ylabel(f"held-out {w.metric}")
            ax.set_title(w.name)
            ax.legend(fontsize=7)


def main(argv: list[str] | None = None) -> int:
    quick = "3 banks on 2 rounds of a few steps, 9 hospitals on 12 records each, epsilon 8 only"
    parser = benchmark_parser(__doc__, quick, report="run nothing: table and plot from the JSON's results")
    parser.add_argument("--task", choices=["banking77", "medquad", "all"], default="all")
    parser.add_argument("--only", nargs="+", metavar="VARIANT", help="run only these variants (others from the cache)")
    parser.add_argument("--fresh", action="store_true", help="run again even what the JSON already holds")
    parser.add_argument(
        "--dp-schedule",
        nargs=3,
        metavar=("STEPS", "BATCH", "LR"),
        help="another DP-SGD schedule to try (use another --out)",
    )
    parser.add_argument(
        "--dp-set",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help="replace the DP variants' extra overrides, e.g. lora.alpha=4 (use another --out)",
    )
    parser.add_argument("--dp-rounds", type=int, default=0, help="rounds of the DP variants (use another --out)")
    parser.add_argument(
        "--runs-dir", type=Path, default=Path("runs/utility"), help="where the simulations' run directories go"
    )
    args = parser.parse_args(argv)
    chosen = QUICK if args.quick else WORKLOADS
    workloads = [chosen[t] for t in (["banking77", "medquad"] if args.task == "all" else [args.task])]
    if args.dp_schedule:
        steps, batch, lr = args.dp_schedule
        workloads = [replace(w, private=Schedule(int(steps), int(batch), float(lr))) for w in workloads]
    if args.dp_set is not None:
        workloads = [replace(w, private_settings=tuple(args.dp_set)) for w in workloads]
    if args.dp_rounds:
        workloads = [replace(w, private_rounds=args.dp_rounds) for w in workloads]
    stem = report_name("utility", args.quick)
    json_path = args.out / f"{stem}.json"
    args.out.mkdir(parents=True, exist_ok=True)
    report = {} if args.fresh else read_report(args.out, stem)
    report.setdefault("workloads", {})
    report |= {"benchmark": "utility", "machine": machine()}
    runs_dir = args.runs_dir.resolve()
    # Ray starts its workers (the simulated sites) at niceness 15; on a machine shared with other
    # jobs they would then get almost no CPU and the wall times would measure the neighbours.
    os.environ.setdefault("RAY_worker_niceness", "0")
    started = time.time()

    touched: set[tuple[str, str]] = set()  # (workload, variant) this process ran

    def save() -> None:
        """Write this process's variants over what the file holds now (another run may have added others)."""
        on_disk = read_report(args.out, stem)
        for name, entry in on_disk.get("workloads", {}).items():
            report["workloads"].setdefault(name, entry)
        for name, entry in report["workloads"].items():
            theirs = on_disk.get("workloads", {}).get(name, {}).get("variants", {})
            mine = {v: r for v, r in entry["variants"].items() if (name, v) in touched}
            entry["variants"] = {**theirs, **{v: r for v, r in entry["variants"].items() if v not in theirs}, **mine}
        atomic_write_json(json_path, report)

    for w in workloads:
        entry = report["workloads"].setdefault(w.name, {})
        entry["workload"] = asdict(w)
        entry.setdefault("variants", {})
        for variant in variant_names(w):
            if (args.only and variant not in args.only) or args.report:
                continue
            settings = variant_settings(w, variant, num_sites(w))
            cached = entry["variants"].get(variant)
            if cached and cached.get("settings") != [*w.settings, *settings]:
                cached = None  # run with other settings: not comparable, run again
            if cached and cached.get("done") and not args.fresh:
                print(f"[{w.name}] {variant}: cached ({cached['run_dir']})", flush=True)
                continue
            print(f"[{w.name}] {variant}: running", flush=True)
            touched.add((w.name, variant))

            def on_start(
                state: dict[str, Any],
                w: Workload = w,
                entry: dict = entry,
                variant: str = variant,
                settings: list[str] = settings,
            ) -> None:
                entry["variants"][variant] = {**state, "settings": [*w.settings, *settings]}
                save()

            resumable = cached if cached and not cached.get("done") and not args.fresh else None
            outcome = run_variant(w, variant, runs_dir, resumable, on_start)
            entry["variants"][variant] = {
                **outcome,
                "settings": [*w.settings, *settings],
                "command": command("utility", argv),
            }
            save()
        entry["rows"] = summarise(
            w,
            {
                v: entry["variants"][v]
                for v in variant_names(w)
                if v in entry["variants"]
                and entry["variants"][v].get("settings") == [*w.settings, *variant_settings(w, v, num_sites(w))]
            },
        )
        entry["table"] = format_table(w, entry["rows"])
        save()
        print(f"\n{w.name}: held-out {w.metric} after the last round\n{entry['table']}\n", flush=True)
    panels = [
        (WORKLOADS_BY_NAME[n], e["rows"])
        for n, e in report["workloads"].items()
        if n in WORKLOADS_BY_NAME and e.get("rows")
    ]
    if panels:
        plot(panels, args.out / f"{stem}.png")
    print(f"wrote {json_path} and .png ({time.time() - started:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
