"""Local-step time and peak memory of DP-SGD against non-private LoRA training, side by side.

Each step is the product's own training code on the product's own model: the preset's
base model with its LoRA adapter (``common.models.lora.build_adapted_model``), trained by
``client.dp_training.train_adapter`` for one step, privately (Opacus ``GradSampleModule``
with per-sample gradients from hooks, ``DPOptimizer``) or not. Opacus' ghost clipping
(``PrivacyEngine.make_private(grad_sample_mode="ghost")``), which fedtune does not use,
runs the same step for comparison. Every variant of a model sees the same batch of real
records, each exactly ``seq_len`` tokens, with the preset's LoRA settings and optimiser.

Time: one process, one model; after one warm-up step of each variant the variants take
turns step by step (the order rotates every round), and each variant's median step time
is divided by the non-private median of the same adapter (FFA-LoRA, or LoRA with A trained).
Both wall-clock and CPU time (``time.process_time``, all threads) are kept: the CPU is
shared, and CPU time is the less disturbed by other people's work.
Memory: each variant runs alone in a fresh subprocess; once the model and data are loaded
the kernel's peak-RSS mark is reset, and the peak resident set size during training minus
the resident set size after loading is the memory that training adds. The subprocesses
run with glibc's ``MALLOC_MMAP_THRESHOLD_`` fixed (128 KiB by default), so that every large
tensor is mapped and unmapped on its own and RSS follows the live tensors; with glibc's
default, dynamic threshold the peak also holds freed memory the allocator kept, and it
varies by about 100 MB between identical runs (``--malloc-mmap-threshold 0`` to see it).

No privacy figure comes out of this script: the noise multiplier is fixed (it costs one
Gaussian draw per trainable value whatever its size) and no epsilon is computed.

    python benchmarks/dp_overhead.py            # MiniLM 64 x 32, SmolLM2-135M 8 x 96 tokens, 5 variants (12 min CPU)
    python benchmarks/dp_overhead.py --quick    # MiniLM only, 3 variants, 3 timed rounds (~3 min)
    python benchmarks/dp_overhead.py --models smollm2 --rounds 3 --threads 2
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from ghost_clipping import ghost_clipping_train
from harness import benchmark_parser, figure, grouped, header, quiet, write_report
from process_usage import reset_peak_rss, status_kb

from fedtune.client.dp_training import LocalTrainPlan, train_adapter
from fedtune.common.config import FedtuneConfig, load_config, preset_path
from fedtune.common.data.encoding import IGNORE_INDEX, EncodedSet
from fedtune.common.data.federation_data import load_examples, load_label_set
from fedtune.common.models.loading import model_spec
from fedtune.common.models.lora import build_adapted_model

NOISE_MULTIPLIER = 1.0


@dataclass(frozen=True)
class Workload:
    """One model, task and batch shape (the preset's own batch size and token cap)."""

    key: str
    preset: str
    label: str
    batch_size: int
    seq_len: int
    rounds: int  # timed steps of each variant by default (after one warm-up step)


@dataclass(frozen=True)
class Variant:
    """How a step is trained: ``clipping`` is none (non-private), hooks (Opacus per-sample
    gradients, what fedtune runs) or ghost; ``train_a`` trains the LoRA A matrices too
    (plain LoRA) instead of freezing them (FFA-LoRA, the presets' setting)."""

    name: str
    clipping: str
    train_a: bool
    secure_noise: bool = False  # Opacus secure_mode: four Gaussian draws a noise value

    @property
    def adapter(self) -> str:
        return "LoRA" if self.train_a else "FFA-LoRA"


WORKLOADS = {
    "minilm": Workload("minilm", "banking77-minilm", "MiniLM-L6 classification (Banking77)", 64, 32, 12),
    "smollm2": Workload("smollm2", "medquad-smollm2", "SmolLM2-135M causal LM (MedQuAD)", 8, 96, 6),
}
VARIANTS = (
    Variant("non-private", "none", False),
    Variant("DP-SGD", "hooks", False),
    Variant("DP-SGD ghost", "ghost", False),
    Variant("non-private, A trained", "none", True),
    Variant("DP-SGD, A trained", "hooks", True),
    Variant("DP-SGD secure noise", "hooks", False, secure_noise=True),
)
QUICK_VARIANTS = (*VARIANTS[:3], VARIANTS[5])


def fixed_length_batch(cfg: FedtuneConfig, tokenizer: Any, batch_size: int, seq_len: int) -> EncodedSet:
    """``batch_size`` real records of the preset's data, each exactly ``seq_len`` tokens.

    Records at least ``seq_len`` tokens long are truncated to it by the product's encoder, so
    every batch has the same shape; causal-LM records keep at least one response token.
    """
    labels = load_label_set(cfg.data) if cfg.task.classifies else []
    encoded = cfg.task.head.encode(load_examples(cfg.data.path, cfg), tokenizer, labels, seq_len)
    keep = [
        i
        for i, ids in enumerate(encoded.input_ids)
        if len(ids) == seq_len and (cfg.task.classifies or any(t != IGNORE_INDEX for t in encoded.labels[i]))
    ][:batch_size]
    if len(keep) < batch_size:
        raise ValueError(f"{cfg.data.path} has only {len(keep)} records of at least {seq_len} tokens")
    return EncodedSet([encoded.input_ids[i] for i in keep], [encoded.labels[i] for i in keep], encoded.pad_token_id)


def load_workload(workload: Workload) -> tuple[FedtuneConfig, Any, EncodedSet]:
    cfg = load_config(preset_path(workload.preset))
    model, tokenizer = build_adapted_model(model_spec(cfg), cfg.lora)
    return cfg, model, fixed_length_batch(cfg, tokenizer, workload.batch_size, workload.seq_len)


def trainable_values(model: Any) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def train_variant(cfg: FedtuneConfig, model: Any, data: EncodedSet, variant: Variant, steps: int) -> int:
    """Run ``steps`` steps of ``variant``; returns its number of trainable values."""
    for name, param in model.named_parameters():
        if "lora_A" in name:
            param.requires_grad_(variant.train_a)
    plan = LocalTrainPlan(
        steps=steps,
        batch_size=len(data),
        lr=cfg.train.lr,
        optimizer=cfg.train.optimizer,
        noise_multiplier=None if variant.clipping == "none" else NOISE_MULTIPLIER,
        max_grad_norm=cfg.privacy.max_grad_norm,
        seed=0,
        secure_noise=variant.secure_noise,
    )
    if variant.clipping == "ghost":
        ghost_clipping_train(model, data, cfg.task, plan)
    else:
        train_adapter(model, data, cfg.task, plan)
    return trainable_values(model)


def time_variants(workload: Workload, variants: tuple[Variant, ...], rounds: int) -> dict[str, dict]:
    """Median step time of each variant, wall clock and CPU, the variants taking turns step by step."""
    cfg, model, data = load_workload(workload)
    values = {v.name: train_variant(cfg, model, data, v, 1) for v in variants}  # warm-up step of each
    wall: dict[str, list[float]] = {v.name: [] for v in variants}
    cpu: dict[str, list[float]] = {v.name: [] for v in variants}
    for r in range(rounds):
        for v in variants[r % len(variants) :] + variants[: r % len(variants)]:
            start, start_cpu = time.perf_counter(), time.process_time()
            train_variant(cfg, model, data, v, 1)
            wall[v.name].append(time.perf_counter() - start)
            cpu[v.name].append(time.process_time() - start_cpu)
        print(f"    round {r + 1}/{rounds}: " + "  ".join(f"{n} {t[-1]:.2f}s" for n, t in wall.items()), flush=True)
    # Zero steps: what each call spends wrapping and unwrapping the model (a site pays it once a round).
    setup: dict[str, list[float]] = {v.name: [] for v in variants}
    for _ in range(3):
        for v in variants:
            start = time.perf_counter()
            train_variant(cfg, model, data, v, 0)
            setup[v.name].append(time.perf_counter() - start)
    return {
        n: {
            "trainable_values": values[n],
            "step_s": wall[n],
            "step_cpu_s": cpu[n],
            "median_step_s": statistics.median(wall[n]),
            "median_step_cpu_s": statistics.median(cpu[n]),
            "setup_s": statistics.median(setup[n]),
        }
        for n in wall
    }


def measure_memory(workload: Workload, variant: Variant, steps: int) -> dict[str, Any]:
    """Peak RSS of ``steps`` training steps in this (fresh) process, and what training adds to it."""
    cfg, model, data = load_workload(workload)
    gc.collect()
    loaded_kb = status_kb("VmRSS")
    reset = reset_peak_rss()
    train_variant(cfg, model, data, variant, steps)
    peak_kb = status_kb("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "rss_after_load_mb": loaded_kb / 1024,
        "peak_training_mb": peak_kb / 1024,
        "training_overhead_mb": (peak_kb - loaded_kb) / 1024,
        "process_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_reset": reset,
        "memory_steps": steps,
    }


def memory_in_subprocess(
    workload: Workload, variant: Variant, steps: int, threads: int, mmap_threshold: int
) -> dict[str, Any]:
    index = VARIANTS.index(variant)
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--memory-child",
        workload.key,
        str(index),
        "--memory-steps",
        str(steps),
        "--threads",
        str(threads),
    ]
    env = dict(os.environ)
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"memory run of {workload.key} / {variant.name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def paired_ratio_range(times: list[float], baseline: list[float]) -> tuple[float, float]:
    """Smallest and largest ratio of a variant's step to the baseline's step of the same round."""
    ratios = [t / b for t, b in zip(times, baseline, strict=True)]
    return min(ratios), max(ratios)


def ratio_rows(
    workload: Workload, variants: tuple[Variant, ...], timed: dict[str, dict], memory: dict[str, dict]
) -> list[dict[str, Any]]:
    """One row per variant; ratios against the non-private variant of the same adapter."""
    baseline = {v.train_a: v.name for v in variants if v.clipping == "none"}
    rows = []
    for v in variants:
        base = baseline.get(v.train_a)
        t, m = timed[v.name], memory[v.name]
        row = {
            "model": workload.key,
            "variant": v.name,
            "adapter": v.adapter,
            "clipping": v.clipping,
            "batch_size": workload.batch_size,
            "seq_len": workload.seq_len,
            **t,
            **m,
            "baseline": base,
            "time_ratio": t["median_step_s"] / timed[base]["median_step_s"] if base else None,
            "cpu_time_ratio": t["median_step_cpu_s"] / timed[base]["median_step_cpu_s"] if base else None,
            # Step-by-step ratios within each round: their spread says how much to trust the medians.
            "time_ratio_range": paired_ratio_range(t["step_s"], timed[base]["step_s"]) if base else None,
            "cpu_time_ratio_range": paired_ratio_range(t["step_cpu_s"], timed[base]["step_cpu_s"]) if base else None,
            "overhead_ratio": (
                m["training_overhead_mb"] / memory[base]["training_overhead_mb"]
                if base and memory[base]["training_overhead_mb"] > 0
                else None
            ),
        }
        rows.append(row)
    return rows


def print_rows(rows: list[dict[str, Any]]) -> None:
    print(
        f"  {'variant':24s} {'trainable':>10s} {'step':>7s} {'ratio (range)':>18s} {'CPU':>7s} {'ratio (range)':>18s} "
        f"{'peak RSS':>9s} {'+training':>9s} {'ratio':>6s}"
    )

    def ratio(x: float | None, spread: tuple[float, float] | None = None) -> str:
        if not x:
            return "-"
        return f"{x:.2f}x [{spread[0]:.2f}-{spread[1]:.2f}]" if spread else f"{x:.2f}x"

    for r in rows:
        print(
            f"  {r['variant']:24s} {r['trainable_values']:10,d} {r['median_step_s']:6.2f}s "
            f"{ratio(r['time_ratio'], r['time_ratio_range']):>18s} {r['median_step_cpu_s']:6.2f}s "
            f"{ratio(r['cpu_time_ratio'], r['cpu_time_ratio_range']):>18s} {r['peak_training_mb']:7.0f}MB "
            f"{r['training_overhead_mb']:7.0f}MB {ratio(r['overhead_ratio']):>6s}",
            flush=True,
        )


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import numpy as np

    models = grouped(rows, "model")
    with figure(path, 2, len(models), figsize=(5.5 * len(models), 6.5), squeeze=False) as (_, axes):
        for col, (key, sel) in enumerate(models.items()):
            names = [r["variant"].replace(", ", "\n").replace(" ghost", "\nghost") for r in sel]
            x = np.arange(len(sel))
            ax = axes[0][col]
            ax.bar(x - 0.2, [r["time_ratio"] or 0 for r in sel], 0.4, label="wall clock", color="tab:red")
            ax.bar(x + 0.2, [r["cpu_time_ratio"] or 0 for r in sel], 0.4, label="CPU time", color="tab:orange")
            ax.axhline(1.0, color="black", lw=0.8)
            ax.set_ylabel("median step time / non-private")
            w = WORKLOADS[key]
            ax.set_title(f"{w.label}\nbatch {w.batch_size} x {w.seq_len} tokens", fontsize=9)
            ax.legend(fontsize=7)
            ax = axes[1][col]
            ax.bar(x, [r["training_overhead_mb"] for r in sel], 0.6, color="tab:blue")
            ax.set_ylabel("peak RSS above loaded model (MB)")
            for a in axes[:, col]:
                a.set_xticks(x, names, fontsize=7)


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__, quick="MiniLM only, 3 variants, 3 timed rounds")
    parser.add_argument("--models", nargs="+", choices=sorted(WORKLOADS), default=["minilm", "smollm2"])
    parser.add_argument(
        "--rounds",
        type=int,
        help="timed steps of each variant after one warm-up step (default: 12 for MiniLM, 6 for SmolLM2)",
    )
    parser.add_argument("--memory-steps", type=int, default=3, help="steps in each memory subprocess")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a site's train.torch_threads default)")
    parser.add_argument(
        "--malloc-mmap-threshold",
        type=int,
        default=128 * 1024,
        help="glibc MALLOC_MMAP_THRESHOLD_ of the memory subprocesses (0: glibc's dynamic default)",
    )
    parser.add_argument("--memory-child", nargs=2, metavar=("MODEL", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet({"transformers": logging.ERROR}, ignore_warnings=True)
    if args.memory_child:
        model, index = args.memory_child
        print(json.dumps(measure_memory(WORKLOADS[model], VARIANTS[int(index)], args.memory_steps)))
        return 0
    variants = VARIANTS
    if args.quick:
        args.models, args.rounds, variants = ["minilm"], 3, QUICK_VARIANTS
    started = time.time()
    load_before = os.getloadavg()
    rows: list[dict[str, Any]] = []
    walls: dict[str, float] = {}
    print(
        f"DP-SGD vs non-private step time and memory, {os.cpu_count()} CPUs, {args.threads} torch thread(s), "
        f"load average {load_before[0]:.1f}"
    )
    for key in args.models:
        w = WORKLOADS[key]
        t0 = time.time()
        rounds = args.rounds or w.rounds
        print(f"{w.label}, batch {w.batch_size} x {w.seq_len} tokens: timing, {rounds} rounds", flush=True)
        timed = time_variants(w, variants, rounds)
        print("  memory, one fresh process per variant", flush=True)
        memory = {
            v.name: memory_in_subprocess(w, v, args.memory_steps, args.threads, args.malloc_mmap_threshold)
            for v in variants
        }
        model_rows = ratio_rows(w, variants, timed, memory)
        print_rows(model_rows)
        rows.extend(model_rows)
        walls[key] = time.time() - t0
    report = {
        **header("dp_overhead", argv, machine_note=f", torch {torch.__version__}"),
        "torch_threads": args.threads,
        "noise_multiplier": NOISE_MULTIPLIER,
        "workloads": {k: asdict(WORKLOADS[k]) | {"rounds": args.rounds or WORKLOADS[k].rounds} for k in args.models},
        "memory_steps": args.memory_steps,
        "malloc_mmap_threshold": args.malloc_mmap_threshold,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "wall_s": time.time() - started,
        "wall_s_per_model": walls,
        "rows": rows,
    }
    write_report(args.out, "dp_overhead", report, lambda path: plot(rows, path), report["wall_s"])
    print(f"load average now {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
