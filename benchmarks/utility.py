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
    python benchmarks/utility.py --report                      # table and plot of what the JSON holds
    python benchmarks/utility.py --task banking77 --only dp-eps8 --dp-schedule 1 2048 40 \
        --out benchmarks/results/utility-tuning                # another DP-SGD setting, kept apart

Run one invocation at a time: several simulations at once on a 24 GB machine get their site
processes killed by Ray's out-of-memory monitor, and a run with a lost round is not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fedtune.common.atomic_files import atomic_write_json  # noqa: E402
from results_report import machine  # noqa: E402
from fedtune.common.config import FedtuneConfig, load_config, preset_path  # noqa: E402

# The full data sets (see /work/shared/data/README.md); FEDTUNE_DATA points elsewhere.
DATA = Path(os.environ.get("FEDTUNE_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@dataclass(frozen=True)
class Schedule:
    """Local training per round on each site."""

    local_steps: int
    batch_size: int
    lr: float


@dataclass(frozen=True)
class Workload:
    """One data set and model, with the schedules every variant shares."""

    name: str
    preset: str
    settings: tuple[str, ...]  # --set overrides shared by every variant
    rounds: int
    plain: Schedule  # non-private variants
    private: Schedule  # DP-SGD variants (large batches suit DP-SGD)
    epsilons: tuple[float, ...]
    local_sites: tuple[int, ...]
    medquad_per_source: int = 0  # > 0: a seeded subsample of that many records per NIH source
    private_settings: tuple[str, ...] = ()  # further --set overrides of the DP-SGD variants
    private_rounds: int = 0  # rounds of the DP-SGD variants (0: ``rounds``); noise is calibrated to them

    @property
    def metric(self) -> str:
        return "loss" if self.preset.startswith("medquad") else "accuracy"


def _banking77(name: str, eval_examples: int, rounds: int, plain: Schedule, private: Schedule,
               epsilons: tuple[float, ...], local_sites: tuple[int, ...], sites: int = 10,
               private_settings: tuple[str, ...] = (), private_rounds: int = 0) -> Workload:
    settings = (f"data.path='{DATA / 'banking77/train.csv'}'", f"data.test_path='{DATA / 'banking77/test.csv'}'",
                f"data.labels_file='{DATA / 'banking77/categories.json'}'", "partition.scheme='dirichlet'",
                f"partition.num_clients={sites}", "partition.alpha=0.5", f"data.max_eval_examples={eval_examples}",
                "train.eval_batch_size=64")
    return Workload(name, "banking77-minilm", settings, rounds, plain, private, epsilons, local_sites,
                    private_settings=private_settings, private_rounds=private_rounds)


def _medquad(name: str, per_source: int, eval_examples: int, rounds: int, plain: Schedule, private: Schedule,
             epsilons: tuple[float, ...], local_sites: tuple[int, ...], max_length: int) -> Workload:
    settings = ("partition.scheme='column'", "partition.column='source'", "partition.num_clients=9",
                f"data.max_eval_examples={eval_examples}", f"model.max_length={max_length}",
                f"partition.min_examples={min(10, per_source // 2)}")
    return Workload(name, "medquad-smollm2", settings, rounds, plain, private, epsilons, local_sites, per_source)


WORKLOADS = {
    # Non-private: the preset's Adam, 8 steps of 64 a round, 6 rounds. DP-SGD: one full-batch step
    # a round (sample rate 1: every record, no subsampling to amplify) for 8 rounds, plain SGD with
    # a large step (per-record gradients are clipped to norm 1, so lr 60 moves the head by at most
    # 60 a round); lora.alpha=1 keeps the adapter's share of that step small. Chosen with
    # benchmarks/pooling_probe.py; the 6-round run is in results/utility-tuning. Per-record
    # gradients of ~1000 records take gigabytes in a site process, so DP sites run one at a time.
    "banking77": _banking77("banking77", 600, 6, Schedule(8, 64, 2e-2), Schedule(1, 2048, 60.0), (8.0, 4.0, 1.0),
                            (0, 4, 7), private_settings=("train.optimizer='sgd'", "lora.alpha=1",
                                                         "federation.cpus_per_client=2", "train.torch_threads=2"),
                            private_rounds=8),
    "medquad": _medquad("medquad", 60, 32, 2, Schedule(3, 8, 2e-3), Schedule(1, 24, 2e-3), (8.0, 4.0, 1.0), (0, 4), 64),
}
QUICK = {
    "banking77": _banking77("banking77-quick", 200, 2, Schedule(3, 32, 2e-2), Schedule(3, 32, 2e-2), (8.0,), (0,),
                            sites=3),
    "medquad": _medquad("medquad-quick", 8, 8, 1, Schedule(1, 4, 2e-3), Schedule(1, 4, 2e-3), (8.0,), (0,), 48),
}


def variant_names(w: Workload) -> list[str]:
    return ["centralised", "federated", *[f"dp-eps{e:g}" for e in w.epsilons],
            *[f"local-site-{k}" for k in w.local_sites]]


def _schedule_settings(s: Schedule, steps_factor: int = 1) -> list[str]:
    return [f"train.local_steps={s.local_steps * steps_factor}", f"train.batch_size={s.batch_size}", f"train.lr={s.lr}"]


def variant_settings(w: Workload, variant: str, num_sites: int) -> list[str]:
    """The --set overrides of one variant (besides the workload's shared ones)."""
    private = variant.startswith("dp-eps")
    rounds = (w.private_rounds or w.rounds) if private else w.rounds
    common = [f"federation.rounds={rounds}", "privacy.share_site_metrics=false"]
    alone = ["partition.num_clients=1", "federation.min_clients=1", "secure_aggregation.enabled=false",
             "privacy.enabled=false"]
    if variant == "centralised":
        return [*common, *alone, "partition.scheme='iid'", *_schedule_settings(w.plain, num_sites)]
    if variant == "federated":
        return [*common, "privacy.enabled=false", *_schedule_settings(w.plain)]
    if private:
        return [*common, "privacy.enabled=true", f"privacy.epsilon={float(variant.removeprefix('dp-eps'))}",
                *_schedule_settings(w.private), *w.private_settings]
    if variant.startswith("local-site-"):
        # Only this site's own training records, and the federation's held-out set (written by site_files).
        return [*common, *alone, "partition.scheme='files'", "data.val_fraction=0.0", *_schedule_settings(w.plain)]
    raise ValueError(f"unknown variant {variant!r}")


def medquad_subsample(per_source: int, out: Path) -> Path:
    """A seeded subsample of ``per_source`` records from each NIH source, in file order (CPU budget)."""
    import numpy as np

    path = out / f"medquad-{per_source}-per-source.jsonl"
    if path.exists():
        return path
    lines = (DATA / "medquad/medquad.jsonl").read_text(encoding="utf-8").splitlines()
    by_source: dict[str, list[int]] = {}
    for i, line in enumerate(lines):
        by_source.setdefault(json.loads(line)["source"], []).append(i)
    rng = np.random.default_rng(0)
    keep = sorted(int(i) for src in sorted(by_source)
                  for i in rng.choice(by_source[src], min(per_source, len(by_source[src])), replace=False))
    out.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(lines[i] + "\n" for i in keep), encoding="utf-8")
    return path


def workload_settings(w: Workload, runs_dir: Path) -> list[str]:
    settings = [*w.settings, f"run.output_dir='{runs_dir}'"]
    if w.medquad_per_source:
        settings.append(f"data.path='{medquad_subsample(w.medquad_per_source, runs_dir / 'data')}'")
    return settings


def num_sites(w: Workload) -> int:
    """Sites of the federation: the workload's ``partition.num_clients``."""
    return int(next(s for s in w.settings if s.startswith("partition.num_clients=")).split("=")[1])


def config_for(w: Workload, variant: str, runs_dir: Path, extra: list[str] = ()) -> FedtuneConfig:
    overrides = [*workload_settings(w, runs_dir), *variant_settings(w, variant, num_sites(w)),
                 f"run.name='utility-{w.name}-{variant}'", *extra]
    return load_config(preset_path(w.preset), overrides)


def site_files(w: Workload, site: int, runs_dir: Path) -> list[str]:
    """One federated site's training records and the federation's held-out set, as files of their own."""
    from fedtune.common.data.federation_data import build_site_splits

    cfg = config_for(w, "federated", runs_dir)
    sites, test = build_site_splits(cfg)
    f = cfg.data.fields
    keys = (f.text, f.label) if cfg.model.task == "classification" else (f.question, f.answer)
    folder = runs_dir / "data" / w.name
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, examples in ((f"site-{site}-train.jsonl", sites[site].train), ("test.jsonl", test)):
        paths.append(folder / name)
        paths[-1].write_text("".join(json.dumps({keys[0]: e.text, keys[1]: e.target}) + "\n" for e in examples),
                             encoding="utf-8")
    return [f"data.site_paths=['{paths[0]}']", f"data.test_path='{paths[1]}'"]


def run_variant(w: Workload, variant: str, runs_dir: Path, previous: dict[str, Any] | None,
                on_start) -> dict[str, Any]:
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
    return {**outcome, "run_dir": str(run_dir), "wall_s": prior_s + time.time() - start, "done": not failed,
            "failed_rounds": failed}


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
    ledgers = {p.parent.name: json.loads(p.read_text()) for p in sorted((run_dir / "sites").glob("*/privacy_ledger.json"))}
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
        rows.append({"variant": v, **_final(final), "epsilon": r["epsilon_max"], "wall_s": r["wall_s"],
                     "curve": [x[metric] for x in r["rounds"]]})
    local = [r for v, r in done.items() if v.startswith("local-site-")]
    if local:
        finals = [_final(r["rounds"][-1]) for r in local]
        row = {"variant": f"local ({len(local)} site{'s' if len(local) > 1 else ''}, mean)", "epsilon": None,
               "wall_s": sum(r["wall_s"] for r in local), "sites": [v for v in done if v.startswith("local-site-")],
               "curve": [statistics.mean(r["rounds"][i][metric] for r in local) for i in range(len(local[0]["rounds"]))]}
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
            lines.append(f"{r['variant']:26s} {r['accuracy']:9.4f} {r['macro-f1']:9.4f} {pct} "
                         f"{_eps(r['epsilon']):>12s} {_mins(r['wall_s']):>8s}{spread}")
        return "\n".join(lines)
    head = f"{'variant':26s} {'loss':>8s} {'ppl':>8s} {'% of central gain':>17s} {'eps (ledger)':>12s} {'wall':>8s}"
    lines = [head, "-" * len(head)]
    for r in rows:
        share = r.get("gain_vs_base_pct_of_centralised")
        share_text = f"{share:16.1f}%" if share is not None else f"{'-':>17s}"
        spread = f" [{r['loss_min']:.3f}-{r['loss_max']:.3f}]" if "loss_min" in r else ""
        lines.append(f"{r['variant']:26s} {r['loss']:8.4f} {r['perplexity']:8.2f} {share_text} "
                     f"{_eps(r['epsilon']):>12s} {_mins(r['wall_s']):>8s}{spread}")
    return "\n".join(lines)


def _eps(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _mins(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds else "-"


def plot(panels: list[tuple[Workload, list[dict[str, Any]]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, (w, rows) in zip(axes[0], panels):
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
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=["banking77", "medquad", "all"], default="all")
    parser.add_argument("--quick", action="store_true",
                        help="3 banks on 2 rounds of a few steps, 9 hospitals on 12 records each, epsilon 8 only")
    parser.add_argument("--only", nargs="+", metavar="VARIANT", help="run only these variants (others from the cache)")
    parser.add_argument("--fresh", action="store_true", help="run again even what the JSON already holds")
    parser.add_argument("--dp-schedule", nargs=3, metavar=("STEPS", "BATCH", "LR"),
                        help="another DP-SGD schedule to try (use another --out)")
    parser.add_argument("--dp-set", action="append", default=None, metavar="KEY=VALUE",
                        help="replace the DP variants' extra overrides, e.g. lora.alpha=4 (use another --out)")
    parser.add_argument("--dp-rounds", type=int, default=0, help="rounds of the DP variants (use another --out)")
    parser.add_argument("--report", action="store_true", help="run nothing: table and plot from the JSON's results")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/utility"), help="where the simulations' run "
                        "directories go")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    chosen = (QUICK if args.quick else WORKLOADS)
    workloads = [chosen[t] for t in (["banking77", "medquad"] if args.task == "all" else [args.task])]
    if args.dp_schedule:
        steps, batch, lr = args.dp_schedule
        workloads = [replace(w, private=Schedule(int(steps), int(batch), float(lr))) for w in workloads]
    if args.dp_set is not None:
        workloads = [replace(w, private_settings=tuple(args.dp_set)) for w in workloads]
    if args.dp_rounds:
        workloads = [replace(w, private_rounds=args.dp_rounds) for w in workloads]
    stem = "utility-quick" if args.quick else "utility"
    json_path = args.out / f"{stem}.json"
    args.out.mkdir(parents=True, exist_ok=True)
    report = json.loads(json_path.read_text()) if json_path.exists() and not args.fresh else {}
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
        on_disk = json.loads(json_path.read_text()) if json_path.exists() else {}
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

            def on_start(state: dict[str, Any], variant: str = variant, settings: list[str] = settings) -> None:
                entry["variants"][variant] = {**state, "settings": [*w.settings, *settings]}
                save()

            resumable = cached if cached and not cached.get("done") and not args.fresh else None
            outcome = run_variant(w, variant, runs_dir, resumable, on_start)
            entry["variants"][variant] = {**outcome, "settings": [*w.settings, *settings],
                                          "command": " ".join(["python", "benchmarks/utility.py",
                                                               *(argv or sys.argv[1:])])}
            save()
        entry["rows"] = summarise(w, {v: entry["variants"][v] for v in variant_names(w) if v in entry["variants"]
                                      and entry["variants"][v].get("settings") == [*w.settings,
                                                                                  *variant_settings(w, v, num_sites(w))]})
        entry["table"] = format_table(w, entry["rows"])
        save()
        print(f"\n{w.name}: held-out {w.metric} after the last round\n{entry['table']}\n", flush=True)
    panels = [(WORKLOADS_BY_NAME[n], e["rows"]) for n, e in report["workloads"].items()
              if n in WORKLOADS_BY_NAME and e.get("rows")]
    if panels:
        plot(panels, args.out / f"{stem}.png")
    print(f"wrote {json_path} and .png ({time.time() - started:.0f}s)")
    return 0


WORKLOADS_BY_NAME = {w.name: w for w in [*WORKLOADS.values(), *QUICK.values()]}

if __name__ == "__main__":
    raise SystemExit(main())
