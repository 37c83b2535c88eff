"""Does a head that starts from the label names help under DP? A head-only probe on Banking77.

``model.head_init = "label_names"`` (common/models/label_prior.py) sets each label's row of the
classification head to MiniLM's pooled features of the label's name, scaled to a norm, so the
model classifies zero-shot before any step. This probe measures what that prior is worth, and
which norm and step suit it, with the mechanism of benchmarks/pooling_probe.py: the encoder
frozen, only the linear head trained, federated over the utility benchmark's 10 Dirichlet(0.5)
banks, every record's gradient clipped to 1, Gaussian noise calibrated by the product's
accountant, one full-batch SGD step a bank and round for 8 rounds, example-weighted FedAvg.
Each cell is the mean over 3 noise seeds of the held-out accuracy after round 8. The full
utility benchmark (``--only dp-eps1-prior``) then checks the chosen cell with the adapter
trained too. About 4 min on 2 cores, most of it the two passes that extract features.

    python benchmarks/label_prior_probe.py
    python benchmarks/label_prior_probe.py --quick    # 3 banks, 150 records each
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from harness import DATA, benchmark_parser, figure, header, report_name, write_report
from pooling_probe import BANKING77, HeadSchedule, federated_head_training, head_features

ROUNDS = 8
SEEDS = 3
EPSILONS = (1.0, 8.0, None)  # None: the same clipped steps without noise
# (prior norm or None for the architecture's random head, server-side lr of the one SGD step)
CELLS = (
    (None, 15.0),
    (None, 30.0),
    (None, 60.0),
    (2.0, 15.0),
    (3.0, 20.0),
    (3.0, 60.0),
    (5.0, 30.0),
    (5.0, 60.0),
)


def label_prior_weights(norm: float, sites: int, eval_examples: int, data: Path = BANKING77) -> np.ndarray:
    """The head (labels x features + bias) that ``model.head_init = 'label_names'`` builds, at ``norm``."""
    from fedtune.common.config import load_config, preset_path
    from fedtune.common.models.label_prior import install_label_prior
    from fedtune.common.models.loading import load_base_model, load_tokenizer, model_spec

    cfg = load_config(
        preset_path("banking77-minilm"),
        [
            f"data.path='{data / 'train.csv'}'",
            f"data.test_path='{data / 'test.csv'}'",
            f"data.labels_file='{data / 'categories.json'}'",
            f"partition.num_clients={sites}",
            f"data.max_eval_examples={eval_examples}",
        ],
    )
    spec = model_spec(cfg)
    tokenizer = load_tokenizer(spec)
    model = load_base_model(spec, pad_token_id=tokenizer.pad_token_id)
    install_label_prior(model, tokenizer, spec.labels, norm, cfg.model.max_length)
    head = model.classifier
    return np.hstack([head.weight.detach().numpy(), head.bias.detach().numpy()[:, None]]).astype(np.float64)


def cell_label(norm: float | None, lr: float) -> str:
    return f"random head\nlr {lr:g}" if norm is None else f"names x{norm:g}\nlr {lr:g}"


def plot(rows: list[dict], zero_shot: float, path: Path) -> None:
    cells = list(dict.fromkeys((row["prior_norm"], row["lr"]) for row in rows))
    epsilons = list(dict.fromkeys(row["epsilon"] for row in rows))
    width = 0.8 / len(epsilons)
    with figure(path, figsize=(8.5, 4)) as (_, ax):
        for i, epsilon in enumerate(epsilons):
            means = [
                np.mean(
                    next(r["accuracy"] for r in rows if (r["prior_norm"], r["lr"]) == c and r["epsilon"] == epsilon)
                )
                for c in cells
            ]
            label = "clipped, no noise" if epsilon is None else f"DP eps={epsilon:g}"
            ax.bar(np.arange(len(cells)) + (i - (len(epsilons) - 1) / 2) * width, means, width, label=label)
        ax.axhline(zero_shot, color="grey", linestyle=":", label=f"label names, no training ({zero_shot:.2f})")
        ax.set_xticks(range(len(cells)), [cell_label(*c) for c in cells], fontsize=7)
        ax.set(
            ylabel=f"held-out accuracy after round {ROUNDS}", title="Banking77, head only, 10 banks: label-name prior"
        )
        ax.set_ylim(0, 1.12)
        ax.legend(fontsize=7, loc="upper center", ncol=4)


def main(argv: list[str] | None = None) -> int:
    args = benchmark_parser(__doc__, quick="3 banks, 150 records each, 100 test records").parse_args(argv)
    if not (BANKING77 / "train.csv").exists():
        raise SystemExit(
            f"{BANKING77 / 'train.csv'} not found: set FEDTUNE_DATA to the folder holding banking77/ ({DATA})"
        )
    sites, per_site, eval_examples = (3, 150, 100) if args.quick else (10, 100_000, 600)
    started = time.time()
    site_data, test, random_head = head_features("mean", sites, per_site, eval_examples)
    unit_prior = label_prior_weights(1.0, sites, eval_examples)
    zero_shot = float((np.argmax(test[0] @ unit_prior.T, axis=1) == test[1]).mean())
    print(f"zero-shot accuracy of the label-name head (no training): {zero_shot:.3f}")
    print(f"{'epsilon':>8} {'head':>12} {'lr':>5}  mean accuracy after round {ROUNDS} (seeds)")
    rows = []
    for epsilon in EPSILONS:
        for norm, lr in CELLS:
            init = random_head if norm is None else norm * unit_prior
            schedule = HeadSchedule(ROUNDS, 1, 1.0, lr, epsilon)
            finals = [federated_head_training(site_data, test, init, schedule, seed=s)[0][-1] for s in range(SEEDS)]
            rows.append({"epsilon": epsilon, "prior_norm": norm, "lr": lr, "accuracy": finals})
            head = "random" if norm is None else f"names x{norm:g}"
            eps = "none" if epsilon is None else f"{epsilon:g}"
            runs = ", ".join(f"{a:.3f}" for a in finals)
            print(f"{eps:>8} {head:>12} {lr:5g}  {np.mean(finals):.3f} ({runs})", flush=True)
    wall_s = time.time() - started
    report = {
        **header("label_prior_probe", argv),
        "sites": sites,
        "rounds": ROUNDS,
        "zero_shot_accuracy": zero_shot,
        "wall_s": wall_s,
        "rows": rows,
    }
    write_report(
        args.out, report_name("label_prior_probe", args.quick), report, lambda path: plot(rows, zero_shot, path), wall_s
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
