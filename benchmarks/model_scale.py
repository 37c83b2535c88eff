"""DP-SGD step time and peak memory against model size: random-init Llama-shaped models of 0.1, 0.5 and 1 B.

Random weights cost what real ones cost (the same shapes, the same matmuls), so nothing is downloaded: each
model is built from a ``LlamaConfig`` (vocabulary 32,000, tied embeddings; see ``SIZES``) with the product's
LoRA adapter (rank 8 on q_proj and v_proj, ``common.models.lora.build_lora_config``), placed by
``common.models.placement.place_model`` and trained by ``client.dp_training.train_adapter`` for one step at
a time, at a fixed token budget (the same records x tokens at every size, every token a target):

* ``non-private``: plain Adam on the adapter;
* ``dp``: DP-SGD, per-record gradients from Opacus' hooks, the whole batch in one pass;
* ``dp-micro``: the same DP step in micro-batches of ``--micro`` records (``train.max_physical_batch_size``);
* ``ghost``: Opacus' ghost clipping (``benchmarks/ghost_clipping.py``), per-record norms without the gradients.

Time: after one warm-up step of each variant the variants take turns step by step (the order rotates each
round); the median wall and CPU (``time.process_time``) seconds of a step, and their ratio to the non-private
median. Memory, per step: on a GPU ``torch.cuda.max_memory_allocated`` (reset before the step; the model's own
weights included); on the CPU the kernel's peak resident set (``VmHWM``, reset before the step through
``/proc/self/clear_refs``), reported as the peak minus the resident set before the step (what training adds)
and as the whole peak (weights included). The script re-executes itself with glibc's ``MALLOC_MMAP_THRESHOLD_``
fixed so that RSS follows the live tensors (see dp_overhead.py). Targets (issue 16): DP <= 1.10x non-private
at every size; a DP step of the 1 B model within 24 GiB with micro-batches.

    python benchmarks/model_scale.py --quick                 # 0.1 B only, 2 timed rounds (~2 min on 2 CPUs)
    python benchmarks/model_scale.py                         # 0.1, 0.5 and 1 B (CPU: about 15 min)
    python benchmarks/model_scale.py --device cuda --dtype bfloat16 --records 16 --seq-len 256
"""

from __future__ import annotations

import gc
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from ghost_clipping import ghost_clipping_train
from harness import benchmark_parser, figure, header, quiet, write_report
from process_usage import reset_peak_rss, status_kb

from fedtune.client.dp_training import LocalTrainPlan, train_adapter
from fedtune.common.config import LoraSettings
from fedtune.common.data.encoding import EncodedSet
from fedtune.common.models.lora import build_lora_config
from fedtune.common.models.placement import place_model
from fedtune.common.tasks.registry import task_for

#: hidden size, layers, attention heads, key/value heads, MLP width; about 0.11, 0.45 and 1.07 B parameters.
SIZES: dict[str, tuple[int, int, int, int, int]] = {
    "0.1b": (768, 12, 12, 12, 2048),
    "0.5b": (1536, 16, 12, 4, 4096),
    "1b": (2048, 16, 16, 8, 8192),
}
VOCAB = 32_000
VARIANTS = ("non-private", "dp", "dp-micro", "ghost")
NOISE_MULTIPLIER = 1.0
GIB = 1024**3
TASK = task_for("question-answer")
MMAP_THRESHOLD = str(128 * 1024)


def llama_config(size: str) -> Any:
    """The ``LlamaConfig`` of a size in ``SIZES``: Llama 3-style proportions, head dim 64 or 128."""
    from transformers import LlamaConfig

    hidden, layers, heads, kv_heads, mlp = SIZES[size]
    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=mlp,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def random_llama(size: str, dtype: torch.dtype, seed: int = 0) -> Any:
    """A random-init ``LlamaForCausalLM`` of ``size``, frozen, in ``dtype``."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(size)).to(dtype)
    return model.requires_grad_(False)


def adapted(base: Any, device: torch.device, gradient_checkpointing: bool = False) -> Any:
    """The product's LoRA adapter (rank 8, q/v) over ``base``, placed on ``device`` (LoRA in fp32)."""
    from peft import get_peft_model

    settings = LoraSettings(rank=8, alpha=16, dropout=0.0)
    model = get_peft_model(base, build_lora_config(settings, TASK, "llama"))
    return place_model(model, device, gradient_checkpointing)


def token_batch(records: int, seq_len: int, seed: int = 0) -> EncodedSet:
    """``records`` random sequences of exactly ``seq_len`` tokens, every token a target."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (records, seq_len), generator=gen).tolist()
    return EncodedSet(input_ids=ids, labels=[list(row) for row in ids], pad_token_id=0)


def plan_for(variant: str, records: int, micro: int) -> LocalTrainPlan:
    """One step on the whole batch (sample rate 1: the same records every step, the budget fixed)."""
    private = variant != "non-private"
    return LocalTrainPlan(
        steps=1,
        batch_size=records,
        lr=1e-4,
        optimizer="adam",
        noise_multiplier=NOISE_MULTIPLIER if private else None,
        max_grad_norm=1.0,
        max_physical_batch_size=micro if variant == "dp-micro" else 0,
    )


def run_step(variant: str, model: Any, data: EncodedSet, plan: LocalTrainPlan) -> None:
    if variant == "ghost":
        ghost_clipping_train(model, data, TASK, plan)
    else:
        train_adapter(model, data, TASK, plan)


def peak_of(step: Callable[[], None], device: torch.device) -> tuple[float, float]:
    """(GiB the step adds at its peak, GiB of the whole peak) around ``step()``."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return (peak - before) / GIB, peak / GIB
    before_kb = status_kb("VmRSS")
    reset_peak_rss()
    step()
    peak_kb = status_kb("VmHWM")
    return (peak_kb - before_kb) * 1024 / GIB, peak_kb * 1024 / GIB


@dataclass(frozen=True)
class Setting:
    device: torch.device
    dtype: torch.dtype
    records: int
    seq_len: int
    micro: int
    rounds: int
    gradient_checkpointing: bool = False


def measure_size(size: str, s: Setting, variants: tuple[str, ...] = VARIANTS) -> list[dict[str, Any]]:
    """One row per variant: median step times, their ratio to non-private, peak memory of a step."""
    model = adapted(random_llama(size, s.dtype), s.device, s.gradient_checkpointing)
    params = sum(p.numel() for p in model.parameters())
    data = token_batch(s.records, s.seq_len)
    wall: dict[str, list[float]] = {v: [] for v in variants}
    cpu: dict[str, list[float]] = {v: [] for v in variants}
    memory: dict[str, tuple[float, float]] = {}
    for v in variants:  # warm-up, and each variant's peak memory of one step
        memory[v] = peak_of(lambda v=v: run_step(v, model, data, plan_for(v, s.records, s.micro)), s.device)
    for r in range(s.rounds):
        for v in variants[r % len(variants) :] + variants[: r % len(variants)]:
            t_wall, t_cpu = time.perf_counter(), time.process_time()
            run_step(v, model, data, plan_for(v, s.records, s.micro))
            if s.device.type == "cuda":
                torch.cuda.synchronize(s.device)
            wall[v].append(time.perf_counter() - t_wall)
            cpu[v].append(time.process_time() - t_cpu)
    base_wall, base_cpu = statistics.median(wall[variants[0]]), statistics.median(cpu[variants[0]])
    rows = []
    for v in variants:
        w, c = statistics.median(wall[v]), statistics.median(cpu[v])
        rows.append(
            {
                "size": size,
                "parameters": params,
                "variant": v,
                "step_wall_s": w,
                "step_cpu_s": c,
                "wall_ratio": w / base_wall,
                "cpu_ratio": c / base_cpu,
                "added_peak_gib": memory[v][0],
                "peak_gib": memory[v][1],
            }
        )
    return rows


def verdicts(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's targets, read off the rows: DP <= 1.10x non-private (CPU time here; wall on a GPU), and the
    1 B model's micro-batched DP step within 24 GiB."""
    dp = [r for r in rows if r["variant"] == "dp"]
    micro_1b = [r for r in rows if r["variant"] == "dp-micro" and r["size"] == "1b"]
    return {
        "dp_ratio_by_size": {r["size"]: round(r["cpu_ratio"], 3) for r in dp},
        "dp_within_1.10x": all(r["cpu_ratio"] <= 1.10 for r in dp) if dp else None,
        "1b_micro_peak_gib": round(micro_1b[0]["peak_gib"], 2) if micro_1b else None,
        "1b_micro_within_24gib": micro_1b[0]["peak_gib"] <= 24 if micro_1b else None,
    }


def print_rows(rows: list[dict[str, Any]]) -> None:
    for r in rows:
        print(
            f"  {r['size']:>5} ({r['parameters'] / 1e9:.2f} B)  {r['variant']:<12} wall {r['step_wall_s']:7.2f} s "
            f"({r['wall_ratio']:.2f}x)  CPU {r['step_cpu_s']:7.2f} s ({r['cpu_ratio']:.2f}x)  "
            f"peak +{r['added_peak_gib']:.2f} GiB (total {r['peak_gib']:.2f} GiB)",
            flush=True,
        )


def plot(rows: list[dict[str, Any]], path: Any) -> None:
    with figure(path, 1, 2, figsize=(10.0, 4.0)) as (_, (time_ax, mem_ax)):
        for v in dict.fromkeys(r["variant"] for r in rows):
            mine = [r for r in rows if r["variant"] == v]
            xs = [r["parameters"] / 1e9 for r in mine]
            time_ax.plot(xs, [r["step_cpu_s"] for r in mine], marker="o", label=v)
            mem_ax.plot(xs, [r["added_peak_gib"] for r in mine], marker="o", label=v)
        time_ax.set(xlabel="parameters (B)", ylabel="CPU s a step", title="step time")
        mem_ax.set(xlabel="parameters (B)", ylabel="GiB added at the peak", title="peak memory of a step")
        time_ax.legend()


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__, quick="0.1 B only, 2 timed rounds")
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=list(SIZES))
    parser.add_argument("--records", type=int, default=4, help="records a step (the logical batch)")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens a record")
    parser.add_argument("--micro", type=int, default=1, help="records a micro-batch in dp-micro")
    parser.add_argument("--rounds", type=int, default=3, help="timed steps of each variant after the warm-up")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=2, help="torch threads on the CPU")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    args = parser.parse_args(argv)
    if argv is None and os.environ.get("MALLOC_MMAP_THRESHOLD_") != MMAP_THRESHOLD:
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD})
    torch.set_num_threads(args.threads)
    quiet({"transformers": 40}, ignore_warnings=True)
    if args.quick:
        args.sizes, args.rounds = ["0.1b"], 2
    setting = Setting(
        torch.device(args.device),
        getattr(torch, args.dtype),
        args.records,
        args.seq_len,
        args.micro,
        args.rounds,
        args.gradient_checkpointing,
    )
    started = time.time()
    print(f"model scale: {args.records} x {args.seq_len} tokens a step, {args.dtype} base on {args.device}")
    rows: list[dict[str, Any]] = []
    for size in args.sizes:
        rows.extend(measure_size(size, setting))
        gc.collect()  # the last size's model (Opacus' and peft's hooks hold it in reference cycles)
        print_rows([r for r in rows if r["size"] == size])
    report = {
        **header("model_scale", argv, machine_note=f", torch {torch.__version__}, {args.device}"),
        "setting": {**vars(args), "out": str(args.out)},
        "memory_measure": "torch.cuda.max_memory_allocated" if setting.device.type == "cuda" else "VmHWM (peak RSS)",
        "noise_multiplier": NOISE_MULTIPLIER,
        "targets": verdicts(rows),
        "load_average_after": os.getloadavg(),
        "wall_s": time.time() - started,
        "rows": rows,
    }
    print("targets:", report["targets"])
    name = "model_scale-quick" if args.quick else "model_scale"
    write_report(args.out, name, report, lambda path: plot(rows, path), report["wall_s"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
