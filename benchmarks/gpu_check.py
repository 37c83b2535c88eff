"""The GPU check: fedtune on a CUDA GPU, end to end, in a few minutes (issue 16, item 9).

It installs nothing and downloads nothing. A random-init Llama-shaped model of about 0.5 B parameters
(``model_scale.SIZES``, with fedtune's byte-level tokenizer) is written to a temporary directory and used
through ``model.path``; the data is the MedQuAD sample shipped in ``common/data/samples``. Then:

1. a simulated federation of 2 sites, DP-SGD and secure aggregation, ``train.device = "cuda"``, the base in
   bf16, both sites sharing the GPU (``federation.gpus_per_client = 0.5``);
2. the same on the 4-bit (QLoRA) base, if bitsandbytes is importable (else said, and skipped);
3. step time and peak GPU memory (``torch.cuda.max_memory_allocated``) of a non-private, a DP and a
   micro-batched DP step, and the DP / non-private ratio (``model_scale.measure_size``);
4. whether a bf16 base moves the adapter as the same weights in fp32 do: 3 DP steps without noise, clipping
   active, same seed; the relative L2 distance of the two updates against ``TOLERANCE``.

On a machine where torch sees no CUDA GPU it says so and exits with status 2.

    python benchmarks/gpu_check.py                  # prints the figures, writes benchmarks/results/gpu_check.json
"""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from harness import benchmark_parser, header, quiet
from model_scale import TASK, Setting, adapted, measure_size, random_llama, token_batch

from fedtune.common.config import FedtuneConfig, config_from_dict

SAMPLES = Path(__file__).resolve().parents[1] / "common" / "data" / "samples"
#: Relative L2 distance allowed between the bf16-base and fp32-base adapter updates (as tests/client/
#: test_mixed_precision.py, where tiny models show 0.2-1.7 %).
TOLERANCE = 0.05
NO_GPU = 2


def build_model_dir(directory: Path, size: str = "0.5b") -> Path:
    """A random-init Llama-shaped model of ``size`` in bf16 with fedtune's byte-level tokenizer, ready for
    ``model.path``."""
    from fedtune.common.models.tiny import byte_level_tokenizer

    model = random_llama(size, torch.bfloat16)
    model.save_pretrained(directory)
    byte_level_tokenizer().save_pretrained(directory)
    return directory


def check_config(model_dir: Path, out: Path, quantization: str = "none", device: str = "cuda") -> FedtuneConfig:
    """2 sites, 2 rounds of 3 DP steps, secure aggregation, the base in bf16 on ``device``."""
    raw = {
        "run": {"name": f"gpu-check-{quantization}", "output_dir": str(out / "runs")},
        "model": {"path": str(model_dir), "dtype": "bfloat16", "quantization": quantization, "max_length": 128},
        "lora": {"rank": 8, "alpha": 16},
        "data": {
            "task": "question-answer",
            "path": str(SAMPLES / "medquad" / "medquad_sample.jsonl"),
            "max_records": 240,
            "max_eval_examples": 32,
        },
        "partition": {"scheme": "iid", "num_clients": 2},
        "federation": {"rounds": 2, "min_clients": 2, "gpus_per_client": 0.5},
        "train": {"local_steps": 3, "batch_size": 16, "max_physical_batch_size": 8, "lr": 1e-3, "device": device},
        "privacy": {"enabled": True, "epsilon": 8.0, "delta": 1e-3},
        "secure_aggregation": {"enabled": True},
    }
    return config_from_dict(raw, "gpu_check", out)


def run_federation(cfg: FedtuneConfig) -> dict[str, Any]:
    from fedtune.simulation import simulate

    started = time.time()
    run_dir = simulate(cfg)
    result = json.loads((run_dir / "result.json").read_text(encoding="utf-8"))
    return {"wall_s": round(time.time() - started, 1), "run_dir": str(run_dir), "result": result}


def adapters_match(size: str, device: torch.device) -> dict[str, Any]:
    """3 DP steps (noise 0, clipping active) from the same adapter over a bf16 base and over its fp32 copy."""
    import numpy as np

    from fedtune.client.dp_training import LocalTrainPlan, train_adapter
    from fedtune.common.models.lora import adapter_state

    half = adapted(random_llama(size, torch.bfloat16), device)
    with torch.no_grad():  # B off zero, so that A moves too
        for name, p in half.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    full = copy.deepcopy(half).float()
    data = token_batch(8, 64)
    plan = LocalTrainPlan(steps=3, batch_size=8, lr=1e-3, optimizer="sgd", noise_multiplier=0.0, max_grad_norm=0.01)
    before = adapter_state(half, ffa=False)
    for model in (half, full):
        train_adapter(model, data, TASK, plan)
    after_half, after_full = adapter_state(half, ffa=False), adapter_state(full, ffa=False)
    moved = np.concatenate([(after_full[k] - before[k]).ravel() for k in before])
    moved_half = np.concatenate([(after_half[k] - before[k]).ravel() for k in before])
    distance = float(np.linalg.norm(moved_half - moved) / max(np.linalg.norm(moved), 1e-30))
    return {"relative_distance": distance, "tolerance": TOLERANCE, "match": distance < TOLERANCE}


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__, quick="skip the 4-bit federation")
    parser.add_argument("--size", default="0.5b", help="model_scale size of the random-init model")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "gpu_check: torch sees no CUDA GPU here (CPU-only torch, no driver, or CUDA_VISIBLE_DEVICES empty); "
            "run it on a machine with one",
            file=sys.stderr,
        )
        return NO_GPU
    quiet({"transformers": 40}, ignore_warnings=True)
    device = torch.device("cuda")
    started = time.time()
    report: dict[str, Any] = {**header("gpu_check", argv), "gpu": torch.cuda.get_device_name(device)}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model_dir(Path(tmp) / "model", args.size)
        report["federation_bf16"] = run_federation(check_config(model_dir, Path(tmp)))
        print("2-site DP + SecAgg federation, bf16 on cuda:", report["federation_bf16"]["result"], flush=True)
        if args.quick or importlib.util.find_spec("bitsandbytes") is None:
            report["federation_4bit"] = "skipped: " + ("--quick" if args.quick else "bitsandbytes is not installed")
        else:
            report["federation_4bit"] = run_federation(check_config(model_dir, Path(tmp), quantization="4bit"))
        print("4-bit federation:", report["federation_4bit"], flush=True)
    setting = Setting(device, torch.bfloat16, records=16, seq_len=256, micro=4, rounds=5)
    report["steps"] = measure_size(args.size, setting, ("non-private", "dp", "dp-micro"))
    for row in report["steps"]:
        print(
            f"{row['variant']:<12} step {row['step_wall_s'] * 1000:.0f} ms ({row['wall_ratio']:.2f}x non-private), "
            f"peak GPU memory {row['peak_gib']:.2f} GiB",
            flush=True,
        )
    report["adapters_bf16_vs_fp32"] = adapters_match(args.size, device)
    print("adapters bf16 vs fp32:", report["adapters_bf16_vs_fp32"], flush=True)
    report["wall_s"] = round(time.time() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
    print(f"wrote {args.out / 'gpu_check.json'} ({report['wall_s']:.0f}s)")
    return 0 if report["adapters_bf16_vs_fp32"]["match"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
