"""Why MiniLM classifiers pool by the mean: a head-only probe of federated DP-SGD on Banking77.

The utility benchmark's first DP runs stalled far below the non-private ones (docs/benchmarks.md,
*Utility*, "what was tried"). This probe isolates the cause cheaply. It freezes the whole
encoder, takes the features the classification head sees under each pooling
(``model.pooling = "model"``: BERT's [CLS] pooler, which all-MiniLM-L6-v2's checkpoint does not
carry, so it is randomly initialised and frozen; ``"mean"``: the masked mean of the token
states, as the sentence encoder was trained), and trains only the linear head, federated over
the same 10 Dirichlet(0.5) banks as the utility benchmark, with the same mechanism as a site:
every record's gradient clipped to ``C``, Gaussian noise of std ``sigma * C`` on the sum, divided
by the expected batch, plain SGD, example-weighted FedAvg. ``sigma`` comes from the product's
calibration (Opacus' RDP accountant) for the schedule's steps; the accountant's epsilon is
printed beside each row. Feature extraction is two forward passes over the data (about 3 min
on 2 cores); every schedule after that takes seconds.

    python benchmarks/pooling_probe.py            # 10 banks, full Banking77; about 4 min
    python benchmarks/pooling_probe.py --quick    # 3 banks, 150 records each
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from harness import DATA, benchmark_parser, figure, header, report_name, write_report

from fedtune.common.privacy.accounting import calibrate_noise, epsilon_spent

BANKING77 = DATA / "banking77"
POOLINGS = ("model", "mean")
DELTA = 1e-4


@dataclass(frozen=True)
class HeadSchedule:
    """Federated training of the head: ``rounds`` x ``steps`` at Poisson ``sample_rate``; epsilon None = non-private."""

    rounds: int
    steps: int
    sample_rate: float
    lr: float
    epsilon: float | None
    clip: float = 1.0


SCHEDULES = (
    HeadSchedule(6, 1, 1.0, 80.0, 8.0),  # the utility benchmark's DP-SGD schedule
    HeadSchedule(6, 1, 1.0, 80.0, 1.0),
    HeadSchedule(6, 1, 1.0, 80.0, None),  # the same clipped steps without noise
)


# --- the mechanism (pure) -----------------------------------------------------------------


def with_bias(x: np.ndarray) -> np.ndarray:
    return np.hstack([x, np.ones((len(x), 1), dtype=x.dtype)])


def clipped_gradient_sum(weights: np.ndarray, x: np.ndarray, y: np.ndarray, clip: float) -> np.ndarray:
    """Sum over records of each record's cross-entropy gradient w.r.t. ``weights`` (labels x features),
    each clipped to norm ``clip``.

    For a linear softmax head the per-record gradient is ``(p - onehot(y)) x^T``, whose norm is
    ``|p - onehot(y)| |x|``: per-record clipping needs no per-record backward pass.
    """
    logits = x @ weights.T
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(y)), y] -= 1.0
    norms = np.linalg.norm(p, axis=1) * np.linalg.norm(x, axis=1)
    p *= np.minimum(1.0, clip / np.maximum(norms, 1e-12))[:, None]
    return p.T @ x


def federated_head_training(
    sites: list[tuple[np.ndarray, np.ndarray]],
    test: tuple[np.ndarray, np.ndarray],
    init: np.ndarray,
    schedule: HeadSchedule,
    seed: int = 0,
) -> tuple[list[float], float | None, float]:
    """Accuracy on ``test`` after each round, the accountant's epsilon per site, and the noise multiplier."""
    rng = np.random.default_rng(seed)
    total_steps = schedule.rounds * schedule.steps
    sigma = (
        calibrate_noise(schedule.epsilon, DELTA, schedule.sample_rate, total_steps)
        if schedule.epsilon is not None
        else 0.0
    )
    weights = init.copy()
    counts = np.array([len(y) for _, y in sites], dtype=np.float64)
    curve = []
    for _ in range(schedule.rounds):
        updates = []
        for x, y in sites:
            local = weights.copy()
            expected_batch = schedule.sample_rate * len(y)
            for _ in range(schedule.steps):
                keep = rng.random(len(y)) < schedule.sample_rate
                grad = clipped_gradient_sum(local, x[keep], y[keep], schedule.clip)
                if schedule.epsilon is not None:
                    grad = grad + rng.normal(0.0, sigma * schedule.clip, grad.shape)
                local -= schedule.lr * grad / expected_batch
            updates.append(local - weights)
        weights = weights + np.tensordot(counts / counts.sum(), np.stack(updates), axes=1)
        curve.append(float((np.argmax(test[0] @ weights.T, axis=1) == test[1]).mean()))
    epsilon = (
        epsilon_spent([(sigma, schedule.sample_rate, total_steps)], DELTA) if schedule.epsilon is not None else None
    )
    return curve, epsilon, sigma


# --- features from the real model ----------------------------------------------------------


def head_features(pooling: str, sites: int, per_site: int, eval_examples: int):
    """Per-site (features, labels), the test set's, and the head's initial weights, under ``pooling``."""
    import torch

    from fedtune.common.config import load_config, preset_path
    from fedtune.common.data.federation_data import build_site_splits
    from fedtune.common.models.loading import load_base_model, load_tokenizer, model_spec

    cfg = load_config(
        preset_path("banking77-minilm"),
        [
            f"data.path='{BANKING77 / 'train.csv'}'",
            f"data.test_path='{BANKING77 / 'test.csv'}'",
            f"data.labels_file='{BANKING77 / 'categories.json'}'",
            "partition.scheme='dirichlet'",
            f"partition.num_clients={sites}",
            "partition.alpha=0.5",
            f"data.max_eval_examples={eval_examples}",
            f"model.pooling='{pooling}'",
        ],
    )
    spec = model_spec(cfg)
    tokenizer = load_tokenizer(spec)
    torch.manual_seed(cfg.lora.init_seed)  # the head's initialisation, as build_adapted_model draws it
    model = load_base_model(spec, pad_token_id=tokenizer.pad_token_id).eval()
    seen: list[torch.Tensor] = []
    model.classifier.register_forward_hook(lambda _m, inputs, _o: seen.append(inputs[0].detach()))
    head = model.classifier
    init = np.hstack([head.weight.detach().numpy(), head.bias.detach().numpy()[:, None]]).astype(np.float64)

    def features(examples):
        data = cfg.task.head.encode(examples, tokenizer, list(spec.labels), cfg.model.max_length)
        seen.clear()
        labels = []
        with torch.no_grad():
            for start in range(0, len(data), 256):
                batch = data.batch(list(range(start, min(start + 256, len(data)))))
                labels.append(batch["labels"].numpy())
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return with_bias(torch.cat(seen).numpy().astype(np.float64)), np.concatenate(labels)

    splits, test = build_site_splits(cfg)
    return [features(s.train[:per_site]) for s in splits], features(test), init


def plot(rows: list[dict], path: Path) -> None:
    with figure(path, figsize=(6.5, 4)) as (_, ax):
        styles = {"model": "--", "mean": "-"}
        for row in rows:
            eps = "non-private" if row["epsilon_target"] is None else f"DP eps={row['epsilon_target']:g}"
            label = f"{row['pooling']} pooling, {eps}"
            ax.plot(
                range(1, len(row["curve"]) + 1), row["curve"], styles[row["pooling"]], marker="o", ms=3, label=label
            )
        ax.set(xlabel="round", ylabel="held-out accuracy", title="Banking77, head only, 10 banks: pooling under DP-SGD")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)


def main(argv: list[str] | None = None) -> int:
    args = benchmark_parser(__doc__, quick="3 banks, 150 records each, 100 test records").parse_args(argv)
    if not (BANKING77 / "train.csv").exists():
        raise SystemExit(f"{BANKING77 / 'train.csv'} not found: set FEDTUNE_DATA to the folder holding banking77/")
    sites, per_site, eval_examples = (3, 150, 100) if args.quick else (10, 100_000, 600)
    started = time.time()
    rows = []
    print(f"{'pooling':8} {'schedule':34} {'sigma':>6} {'eps (accountant)':>16} {'accuracy by round'}")
    for pooling in POOLINGS:
        site_data, test, init = head_features(pooling, sites, per_site, eval_examples)
        for schedule in SCHEDULES:
            curve, epsilon, sigma = federated_head_training(site_data, test, init, schedule)
            rows.append(
                {
                    "pooling": pooling,
                    "schedule": dataclasses.asdict(schedule),
                    "epsilon_target": schedule.epsilon,
                    "epsilon": epsilon,
                    "noise_multiplier": sigma,
                    "curve": curve,
                    "final_accuracy": curve[-1],
                }
            )
            label = f"{schedule.rounds}x{schedule.steps} q={schedule.sample_rate:g} lr={schedule.lr:g}"
            eps = "-" if epsilon is None else f"{epsilon:.3f}"
            print(f"{pooling:8} {label:34} {sigma:6.2f} {eps:>16} {' '.join(f'{a:.3f}' for a in curve)}", flush=True)
    wall_s = time.time() - started
    report = {
        **header("pooling_probe", argv),
        "sites": sites,
        "delta": DELTA,
        "wall_s": wall_s,
        "rows": rows,
    }
    write_report(args.out, report_name("pooling_probe", args.quick), report, lambda path: plot(rows, path), wall_s)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
