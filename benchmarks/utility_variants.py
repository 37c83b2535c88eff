"""What the utility benchmark (utility.py) runs: its workloads, and the fedtune settings of each variant.

A variant is the workload's preset with ``--set`` overrides, so that every variant of a workload
trains the same model on the same data and is scored on the same held-out set; only what the
variant is about (one site or many, privacy, the schedule) differs. utility.py runs, caches and
reports them; the tests build their configurations without running anything.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from harness import DATA

from fedtune.common.config import FedtuneConfig, load_config, preset_path


@dataclass(frozen=True)
class Schedule:
    """Local training per round on each site."""

    local_steps: int
    batch_size: int
    lr: float


@dataclass(frozen=True)
class ServerOptimiser:
    """A server strategy other than FedAvg for the DP-SGD variants, and its ``federation.server_optimizer``."""

    strategy: str  # federation.strategy
    settings: tuple[str, ...]  # --set overrides of federation.server_optimizer


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
    server_optimisers: tuple[ServerOptimiser, ...] = ()  # each also runs as dp-eps<e>-<strategy>
    server_epsilons: tuple[float, ...] = ()  # the epsilons at which the server optimisers run
    prior_settings: tuple[str, ...] = ()  # --set overrides of the dp-eps<e>-prior variants (a label-name head)
    prior_epsilons: tuple[float, ...] = ()  # the epsilons at which the label-name prior runs

    @property
    def metric(self) -> str:
        return "loss" if self.preset.startswith("medquad") else "accuracy"


def _banking77(
    name: str,
    eval_examples: int,
    rounds: int,
    plain: Schedule,
    private: Schedule,
    epsilons: tuple[float, ...],
    local_sites: tuple[int, ...],
    sites: int = 10,
    private_settings: tuple[str, ...] = (),
    private_rounds: int = 0,
    server_optimisers: tuple[ServerOptimiser, ...] = (),
    server_epsilons: tuple[float, ...] = (),
    prior_settings: tuple[str, ...] = (),
    prior_epsilons: tuple[float, ...] = (),
) -> Workload:
    settings = (
        f"data.path='{DATA / 'banking77/train.csv'}'",
        f"data.test_path='{DATA / 'banking77/test.csv'}'",
        f"data.labels_file='{DATA / 'banking77/categories.json'}'",
        "partition.scheme='dirichlet'",
        f"partition.num_clients={sites}",
        "partition.alpha=0.5",
        f"data.max_eval_examples={eval_examples}",
        "train.eval_batch_size=64",
    )
    return Workload(
        name,
        "banking77-minilm",
        settings,
        rounds,
        plain,
        private,
        epsilons,
        local_sites,
        private_settings=private_settings,
        private_rounds=private_rounds,
        server_optimisers=server_optimisers,
        server_epsilons=server_epsilons,
        prior_settings=prior_settings,
        prior_epsilons=prior_epsilons,
    )


def _medquad(
    name: str,
    per_source: int,
    eval_examples: int,
    rounds: int,
    plain: Schedule,
    private: Schedule,
    epsilons: tuple[float, ...],
    local_sites: tuple[int, ...],
    max_length: int,
) -> Workload:
    settings = (
        "partition.scheme='column'",
        "partition.column='source'",
        "partition.num_clients=9",
        f"data.max_eval_examples={eval_examples}",
        f"model.max_length={max_length}",
        f"partition.min_examples={min(10, per_source // 2)}",
    )
    return Workload(name, "medquad-smollm2", settings, rounds, plain, private, epsilons, local_sites, per_source)


# The DP-SGD schedule above, with the server stepping otherwise than FedAvg's x + mean delta.
# Neither step is Reddi's or Hsu's grid value as such: both are scaled to this schedule's mean delta
# (one clipped full-batch SGD step at lr 60: the head moves by up to 60 in L2 a round, about 0.1 a
# coordinate over its ~30k weights, and the 18k LoRA B weights carry mostly noise) and to 8 rounds.
SERVER_OPTIMISERS = (
    # FedAdam (Reddi et al., ICLR 2021, Algorithm 2): beta1 0.9, beta2 0.99, tau 1e-3 as there. Its
    # step is about eta a coordinate whatever the delta's size (tau << |delta|), so eta = 10^-1, the
    # top of their usual 10^-2..10^-1 range and Flower's default, matches FedAvg's ~0.1 a coordinate;
    # 10^-1.5 would take a third of FedAvg's step in a run of only 8 rounds.
    ServerOptimiser(
        "fedadam",
        (
            "federation.server_optimizer.lr=0.1",
            "federation.server_optimizer.beta1=0.9",
            "federation.server_optimizer.beta2=0.99",
            "federation.server_optimizer.tau=0.001",
        ),
    ),
    # FedAvgM (Hsu et al. 2019): momentum 0.9. Their effective rate eta / (1 - beta) = 1 (eta 0.1)
    # is reached only after ~10 rounds, so over 8 rounds it would move the model 2.9 mean deltas to
    # FedAvg's 8; eta 0.3 moves it 8.6 (sum over t of eta (1 - 0.9^t) / 0.1), FedAvg's distance,
    # with the later rounds' steps the larger. Flower's eta 1 would move it 29: 3.6 times FedAvg's
    # step, which the lr 80 DP run (results/utility-tuning) suggests is too large.
    ServerOptimiser("fedavgm", ("federation.server_optimizer.lr=0.3", "federation.server_optimizer.momentum=0.9")),
)

# The head starts from the encoder's features of the label names (model.head_init, common/models/
# label_prior.py): zero-shot 0.62 on the held-out set before any step. Chosen with
# benchmarks/label_prior_probe.py (head only, 3 noise seeds a cell): at epsilon 1 a random head reaches
# 0.53 at its best lr (30), the prior at norm 3 and lr 20 reaches 0.70 (0.68-0.71); lr 60 throws much of
# the prior away under the noise (0.62 at norm 3). At epsilon 8 and without noise the prior gains
# nothing (0.828 both at lr 60), so it is a variant for strong privacy only.
LABEL_PRIOR = ("model.head_init='label_names'", "model.head_init_scale=3.0", "train.lr=20.0")

WORKLOADS = {
    # Non-private: the preset's Adam, 8 steps of 64 a round, 6 rounds. DP-SGD: one full-batch step
    # a round (sample rate 1: every record, no subsampling to amplify) for 8 rounds, plain SGD with
    # a large step (per-record gradients are clipped to norm 1, so lr 60 moves the head by at most
    # 60 a round); lora.alpha=1 keeps the adapter's share of that step small. Chosen with
    # benchmarks/pooling_probe.py; the 6-round run is in results/utility-tuning. Per-record
    # gradients of ~1000 records take gigabytes in a site process, so DP sites run one at a time.
    "banking77": _banking77(
        "banking77",
        600,
        6,
        Schedule(8, 64, 2e-2),
        Schedule(1, 2048, 60.0),
        (8.0, 4.0, 1.0),
        (0, 4, 7),
        private_settings=(
            "train.optimizer='sgd'",
            "lora.alpha=1",
            "federation.cpus_per_client=2",
            "train.torch_threads=2",
        ),
        private_rounds=8,
        server_optimisers=SERVER_OPTIMISERS,
        server_epsilons=(8.0, 1.0),
        prior_settings=LABEL_PRIOR,
        prior_epsilons=(1.0,),
    ),
    "medquad": _medquad("medquad", 60, 32, 2, Schedule(3, 8, 2e-3), Schedule(1, 24, 2e-3), (8.0, 4.0, 1.0), (0, 4), 64),
}
QUICK = {
    "banking77": _banking77(
        "banking77-quick", 200, 2, Schedule(3, 32, 2e-2), Schedule(3, 32, 2e-2), (8.0,), (0,), sites=3
    ),
    "medquad": _medquad("medquad-quick", 8, 8, 1, Schedule(1, 4, 2e-3), Schedule(1, 4, 2e-3), (8.0,), (0,), 48),
}


def variant_names(w: Workload) -> list[str]:
    return [
        "centralised",
        "federated",
        *[f"dp-eps{e:g}" for e in w.epsilons],
        *[f"dp-eps{e:g}-{o.strategy}" for e in w.server_epsilons for o in w.server_optimisers],
        *[f"dp-eps{e:g}-prior" for e in w.prior_epsilons],
        *[f"local-site-{k}" for k in w.local_sites],
    ]


def _schedule_settings(s: Schedule, steps_factor: int = 1) -> list[str]:
    return [f"train.local_steps={s.local_steps * steps_factor}", f"train.batch_size={s.batch_size}", f"train.lr={s.lr}"]


def variant_settings(w: Workload, variant: str, num_sites: int) -> list[str]:
    """The --set overrides of one variant (besides the workload's shared ones)."""
    private = variant.startswith("dp-eps")
    rounds = (w.private_rounds or w.rounds) if private else w.rounds
    common = [f"federation.rounds={rounds}", "privacy.share_site_metrics=false"]
    alone = [
        "partition.num_clients=1",
        "federation.min_clients=1",
        "secure_aggregation.enabled=false",
        "privacy.enabled=false",
    ]
    if variant == "centralised":
        return [*common, *alone, "partition.scheme='iid'", *_schedule_settings(w.plain, num_sites)]
    if variant == "federated":
        return [*common, "privacy.enabled=false", *_schedule_settings(w.plain)]
    if private:
        epsilon, _, strategy = variant.removeprefix("dp-eps").partition("-")
        return [
            *common,
            "privacy.enabled=true",
            f"privacy.epsilon={float(epsilon)}",
            *_schedule_settings(w.private),
            *w.private_settings,
            *(w.prior_settings if strategy == "prior" else _server_settings(w, strategy) if strategy else []),
        ]
    if variant.startswith("local-site-"):
        # Only this site's own training records, and the federation's held-out set (written by site_files).
        return [*common, *alone, "partition.scheme='files'", "data.val_fraction=0.0", *_schedule_settings(w.plain)]
    raise ValueError(f"unknown variant {variant!r}")


def _server_settings(w: Workload, strategy: str) -> list[str]:
    """The overrides of a ``dp-eps<e>-<strategy>`` variant: that server optimiser instead of FedAvg."""
    chosen = next((o for o in w.server_optimisers if o.strategy == strategy), None)
    if chosen is None:
        known = ", ".join(o.strategy for o in w.server_optimisers) or "none"
        raise ValueError(f"workload {w.name!r} has no server optimiser {strategy!r} (its server_optimisers: {known})")
    return [f"federation.strategy='{chosen.strategy}'", *chosen.settings]


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
    keep = sorted(
        int(i)
        for src in sorted(by_source)
        for i in rng.choice(by_source[src], min(per_source, len(by_source[src])), replace=False)
    )
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
    overrides = [
        *workload_settings(w, runs_dir),
        *variant_settings(w, variant, num_sites(w)),
        f"run.name='utility-{w.name}-{variant}'",
        *extra,
    ]
    return load_config(preset_path(w.preset), overrides)


def site_files(w: Workload, site: int, runs_dir: Path) -> list[str]:
    """One federated site's training records and the federation's held-out set, as files of their own."""
    from fedtune.common.data.federation_data import build_site_splits

    cfg = config_for(w, "federated", runs_dir)
    sites, test = build_site_splits(cfg)
    f = cfg.data.fields
    keys = (f.text, f.label) if cfg.task.classifies else (f.question, f.answer)
    folder = runs_dir / "data" / w.name
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, examples in ((f"site-{site}-train.jsonl", sites[site].train), ("test.jsonl", test)):
        paths.append(folder / name)
        paths[-1].write_text(
            "".join(json.dumps({keys[0]: e.text, keys[1]: e.target}) + "\n" for e in examples), encoding="utf-8"
        )
    return [f"data.site_paths=['{paths[0]}']", f"data.test_path='{paths[1]}'"]


WORKLOADS_BY_NAME = {w.name: w for w in [*WORKLOADS.values(), *QUICK.values()]}
