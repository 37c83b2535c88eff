"""Measured leakage of the federated model next to the accountant's epsilon: canaries and membership inference.

The default job (preset ``banking77-minilm``: three banks, MiniLM-L6 with FFA-LoRA, the
shipped Banking77 sample split Dirichlet(1), secure aggregation on) is trained three times
through the product's own simulation, identical but for privacy: non-private, epsilon = 8 and
epsilon = 1 per site. Bank 0's data is changed in two ways before any run, and written to
its own file (``partition.scheme = "files"``, so the product reads it like any site's data):

* **canaries**: random "secret" texts (words drawn from the data's vocabulary) with a
  uniformly random intent, each inserted once or ``r`` times. A repeat differs from the
  first copy only in letter case, which the product's de-duplication treats as a new record
  and MiniLM's uncased tokenizer maps to the same tokens: ``r`` identical training inputs.
  Exposure of a canary = log2(#labels) - log2(rank of its planted label among all labels by
  the final global model's logits) (Carlini et al., "The Secret Sharer", 2019). The same
  statistic on as many canaries never inserted anywhere is the reference (chance level).
* **membership**: half of bank 0's records are held back (never trained on by anyone). A
  loss-threshold attack (Yeom et al., 2018) scores each record by the final model's loss;
  its ROC AUC separates bank 0's training records (members) from the held-back half
  (non-members, same distribution). 0.5 means no leakage.

Epsilon is bank 0's own ledger (the Opacus RDP accountant over the steps it took); nothing
here computes an epsilon. Prints a table, writes JSON and a PNG.

    python benchmarks/empirical_privacy.py           # preset rounds/steps (4 x 20), 20 canaries x {1, 4} copies
    python benchmarks/empirical_privacy.py --quick   # 2 rounds x 5 steps, 8 canaries per group (smoke run)
    python benchmarks/empirical_privacy.py --variants none 8 --canaries 40
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from harness import benchmark_parser, figure, header, quiet, write_report
from leakage import cross_entropy, exposure, label_ranks, roc_auc, roc_curve, tpr_at_fpr

PRESET = "banking77-minilm"
CANARY_SITE = 0
CANARY_WORDS = 8
VARIANTS = ("none", "8", "1")  # privacy.epsilon per site; "none" = privacy.enabled = false


# --- canaries and site files -------------------------------------------------------------


@dataclass(frozen=True)
class Canary:
    text: str
    label: str
    copies: int  # 0: a reference canary, never inserted anywhere


def make_canaries(
    vocabulary: list[str], labels: list[str], groups: dict[int, int], rng: np.random.Generator
) -> list[Canary]:
    """``groups[copies]`` canaries per number of copies (0 = reference), each a random word string and label."""
    out = []
    for copies, count in sorted(groups.items()):
        for _ in range(count):
            words = rng.choice(vocabulary, size=CANARY_WORDS, replace=False)
            out.append(Canary("my secret is " + " ".join(words), str(rng.choice(labels)), copies))
    return out


def copy_texts(canary: Canary) -> list[str]:
    """The inserted copies: the text, then variants with one more word in capitals each.

    Distinct records for the product's de-duplication, identical inputs for an uncased tokenizer.
    """
    words = canary.text.split(" ")
    if canary.copies > len(words) + 1:
        raise ValueError(f"at most {len(words) + 1} copies of a {len(words)}-word canary")
    return [canary.text] + [
        " ".join(w.upper() if j < i else w for j, w in enumerate(words)) for i in range(1, canary.copies)
    ]


def vocabulary_of(texts: list[str]) -> list[str]:
    """Lower-case alphabetic words of at least 4 letters that occur in the data."""
    return sorted({w for t in texts for w in t.lower().split() if w.isalpha() and len(w) >= 4})


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def preset_raw() -> dict:
    from fedtune.common.config import preset_path

    return tomllib.loads(preset_path(PRESET).read_text(encoding="utf-8"))


def build_site_files(work: Path, groups: dict[int, int], seed: int) -> dict:
    """The preset's three Dirichlet shares as files; bank 0 keeps half (members) plus the canaries."""
    from fedtune.common.config import PRESETS_DIR, config_from_dict
    from fedtune.common.data.federation_data import load_label_set, load_pool_and_test, partition_pool

    cfg = config_from_dict(preset_raw(), PRESET, PRESETS_DIR)
    pool, _ = load_pool_and_test(cfg)
    shares = partition_pool(cfg, pool)
    labels = load_label_set(cfg.data)
    rng = np.random.default_rng(seed)
    canaries = make_canaries(vocabulary_of([e.text for e in pool]), labels, groups, rng)
    site0 = [pool[i] for i in shares[CANARY_SITE]]
    held = set(rng.permutation(len(site0))[: len(site0) // 2].tolist())
    members = [e for i, e in enumerate(site0) if i not in held]
    nonmembers = [e for i, e in enumerate(site0) if i in held]
    paths = []
    for site, share in enumerate(shares):
        if site == CANARY_SITE:
            rows = [{"text": e.text, "category": e.target} for e in members]
            rows += [{"text": t, "category": c.label} for c in canaries if c.copies for t in copy_texts(c)]
            rows = [rows[i] for i in rng.permutation(len(rows))]
        else:
            rows = [{"text": pool[i].text, "category": pool[i].target} for i in share]
        paths.append(write_jsonl(work / "sites" / f"site-{site}.jsonl", rows))
    return {
        "paths": paths,
        "labels": labels,
        "canaries": canaries,
        "members": members,
        "nonmembers": nonmembers,
        "site_sizes": [len(s) for s in shares],
    }


def variant_config(site_paths: list[Path], work: Path, variant: str, rounds: int | None, steps: int | None):
    """The preset with each bank reading its own file; only privacy differs between variants."""
    from fedtune.common.config import PRESETS_DIR, config_from_dict

    raw = preset_raw()
    raw["run"] |= {"name": f"privacy-{variant}", "output_dir": str(work / "runs")}
    raw["data"].pop("path")
    raw["data"] |= {"site_paths": [str(p) for p in site_paths], "val_fraction": 0.0}
    raw["partition"] = {"scheme": "files", "num_clients": len(site_paths)}
    raw["privacy"] |= {"share_site_metrics": False}  # no validation split: every record in a file is trained on
    if variant == "none":
        raw["privacy"]["enabled"] = False
    else:
        raw["privacy"] |= {"enabled": True, "epsilon": float(variant)}
    if rounds:
        raw["federation"]["rounds"] = rounds
    if steps:
        raw["train"]["local_steps"] = steps
    return config_from_dict(raw, f"{PRESET} ({variant})", PRESETS_DIR)


# --- scoring the final global model ------------------------------------------------------


def final_logits(run_dir: Path, texts_labels: list[tuple[str, str]], labels: list[str], max_length: int) -> np.ndarray:
    """Logits of the run's merged final model (``run_dir/merged``), with the product's own encoding."""
    import torch
    from transformers import AutoTokenizer

    from fedtune.common.data.shapes import Example
    from fedtune.common.models.loading import load_exported_classifier
    from fedtune.common.tasks.registry import task_for

    model = load_exported_classifier(run_dir / "merged")
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "merged")
    examples = [Example(t, c) for t, c in texts_labels]
    data = task_for("classification").head.encode(examples, tokenizer, labels, max_length)
    out = []
    with torch.no_grad():
        for start in range(0, len(data), 128):
            batch = data.batch(list(range(start, min(start + 128, len(data)))))
            out.append(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.numpy())
    return np.concatenate(out)


def check_copies_tokenise_alike(run_dir: Path, canaries: list[Canary]) -> None:
    """Case variants are only repeats if the tokenizer is uncased; refuse to report otherwise."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(run_dir / "merged")
    for c in canaries:
        if c.copies > 1 and len({tuple(tokenizer(t)["input_ids"]) for t in copy_texts(c)}) != 1:
            raise RuntimeError("the tokenizer is cased: canary copies are not identical inputs")


def score(run_dir: Path, setup: dict, max_length: int) -> dict:
    labels, canaries = setup["labels"], setup["canaries"]
    index = {name: i for i, name in enumerate(labels)}
    check_copies_tokenise_alike(run_dir, canaries)
    rows = [(c.text, c.label) for c in canaries]
    rows += [(e.text, e.target) for e in setup["members"]] + [(e.text, e.target) for e in setup["nonmembers"]]
    logits = final_logits(run_dir, rows, labels, max_length)
    y = np.array([index[label] for _, label in rows])
    loss, ranks = cross_entropy(logits, y), label_ranks(logits, y)
    k, m = len(canaries), len(setup["members"])
    copies = np.array([c.copies for c in canaries])
    canary_exposure = exposure(ranks[:k], len(labels))
    member_loss, nonmember_loss = loss[k : k + m], loss[k + m :]
    groups = {}
    for r in sorted(set(copies.tolist())):
        sel = copies == r
        groups[str(r)] = {
            "canaries": int(sel.sum()),
            "mean_exposure_bits": float(canary_exposure[sel].mean()),
            "sem_exposure_bits": float(canary_exposure[sel].std(ddof=1) / math.sqrt(sel.sum()))
            if sel.sum() > 1
            else 0.0,
            "top1_rate": float((ranks[:k][sel] == 1).mean()),
            "mean_loss": float(loss[:k][sel].mean()),
            "exposure_bits": canary_exposure[sel].round(4).tolist(),
        }
        if r:  # inserted vs never-inserted canaries, by loss: the attack on the planted secrets themselves
            groups[str(r)]["loss_auc_vs_reference"] = roc_auc(-loss[:k][sel], -loss[:k][copies == 0])
    return {
        "canaries": groups,
        "mia_auc": roc_auc(-member_loss, -nonmember_loss),
        "mia_tpr_at_1pct_fpr": tpr_at_fpr(-member_loss, -nonmember_loss, 0.01),
        "member_mean_loss": float(member_loss.mean()),
        "nonmember_mean_loss": float(nonmember_loss.mean()),
        "member_accuracy": float((ranks[k : k + m] == 1).mean()),
        "nonmember_accuracy": float((ranks[k + m :] == 1).mean()),
        "roc": [a.round(4).tolist() for a in roc_curve(-member_loss, -nonmember_loss)],
    }


def run_variant(setup: dict, work: Path, variant: str, rounds: int | None, steps: int | None) -> dict:
    """Train one federation through the product's simulation, then read its ledger and score its final model."""
    from fedtune.simulation import simulate

    cfg = variant_config(setup["paths"], work, variant, rounds, steps)
    started = time.time()
    load_before = os.getloadavg()
    run_dir = simulate(cfg)
    train_s = time.time() - started
    ledger_path = run_dir / "sites" / f"site-{CANARY_SITE}" / "privacy_ledger.json"
    ledger = json.loads(ledger_path.read_text()) if ledger_path.exists() else None
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = records[-1]
    return {
        "variant": variant,
        "target_epsilon": None if variant == "none" else float(variant),
        "epsilon_spent": ledger["epsilon"] if ledger else None,
        "delta": ledger["delta"] if ledger else None,
        "accountant": ledger["accountant"] if ledger else None,
        "ledger_steps": sum(e["steps"] for e in ledger["entries"]) if ledger else None,
        "noise_multiplier": ledger["entries"][-1]["noise_multiplier"] if ledger else 0.0,
        "rounds": cfg.federation.rounds,
        "local_steps": cfg.train.local_steps,
        "statuses": [r.get("status") for r in records[1:]],
        "heldout_accuracy": last["server"]["accuracy"],
        "heldout_loss": last["server"]["loss"],
        "train_s": train_s,
        "loadavg_before": load_before,
        "run_dir": str(run_dir),
        **score(run_dir, setup, cfg.model.max_length),
    }


# --- report ------------------------------------------------------------------------------


def variant_name(variant: str) -> str:
    return "non-private" if variant == "none" else f"eps {variant}"


def fmt_eps(row: dict) -> str:
    return "no DP (inf)" if row["epsilon_spent"] is None else f"{row['epsilon_spent']:.3f}"


def print_table(rows: list[dict], copies: list[int]) -> None:
    ref = rows[0]["canaries"]["0"]["canaries"]
    head = (
        f"{'model':>11} {'eps (ledger)':>12} {'acc':>6} "
        + " ".join(f"{'exp r=' + str(r):>10} {'top1 r=' + str(r):>9}" for r in copies)
        + f" {'exp ref':>8} {'MIA AUC':>8} "
        f"{'TPR@1%':>7}"
    )
    print(head)
    print("-" * len(head))
    for row in rows:
        c = row["canaries"]
        print(
            f"{variant_name(row['variant']):>11} {fmt_eps(row):>12} {row['heldout_accuracy']:6.3f} "
            + " ".join(f"{c[str(r)]['mean_exposure_bits']:10.2f} {c[str(r)]['top1_rate']:9.2f}" for r in copies)
            + f" {c['0']['mean_exposure_bits']:8.2f} {row['mia_auc']:8.3f} {row['mia_tpr_at_1pct_fpr']:7.3f}"
        )
    print(f"exposure in bits (max log2(77) = {math.log2(77):.2f}); ref = {ref} canaries never inserted (chance)")


def plot(rows: list[dict], copies: list[int], path: Path) -> None:
    with figure(path, 1, 2, figsize=(11, 4)) as (_, (left, right)):
        groups = [0, *copies]
        width = 0.8 / len(groups)
        x = np.arange(len(rows))
        for g, r in enumerate(groups):
            means = [row["canaries"][str(r)]["mean_exposure_bits"] for row in rows]
            sems = [row["canaries"][str(r)]["sem_exposure_bits"] for row in rows]
            label = "reference (never inserted)" if r == 0 else f"inserted {r}x"
            left.bar(x + (g - (len(groups) - 1) / 2) * width, means, width, yerr=sems, capsize=3, label=label)
        left.set_xticks(x, [f"{variant_name(row['variant'])}\n(ledger: {fmt_eps(row)})" for row in rows])
        left.axhline(math.log2(77), color="grey", ls=":", lw=0.8)
        left.set(ylabel="mean exposure (bits)", title="canary exposure (+- s.e.m.)")
        left.legend(fontsize=8)
        for row in rows:
            fpr, tpr = row["roc"]
            right.plot(fpr, tpr, label=f"{variant_name(row['variant'])}: AUC {row['mia_auc']:.3f}")
        right.plot([0, 1], [0, 1], color="grey", ls="--", lw=0.8)
        title = "loss-threshold membership inference (bank 0)"
        right.set(xlabel="false-positive rate", ylabel="true-positive rate", title=title)
        right.legend(fontsize=8)


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__, quick="2 rounds x 5 steps, 8 canaries per group")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--canaries", type=int, default=20, help="canaries per group (each copy count, and reference)")
    parser.add_argument("--copies", type=int, nargs="+", default=[1, 4], help="copies of an inserted canary, per group")
    parser.add_argument("--rounds", type=int, default=0, help="override the preset's federation.rounds")
    parser.add_argument("--local-steps", type=int, default=0, help="override the preset's train.local_steps")
    parser.add_argument("--seed", type=int, default=0, help="canaries and the member/non-member split")
    parser.add_argument("--work", type=Path, default=None, help="run directories and site files (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.local_steps, args.canaries = 2, 5, 8
    if any(r < 1 for r in args.copies):
        parser.error("--copies must be at least 1")
    import tempfile

    import torch

    quiet({"fedtune": logging.WARNING})
    torch.set_num_threads(2)
    work = args.work or Path(tempfile.mkdtemp(prefix="fedtune-privacy-"))
    started = time.time()
    groups = {0: args.canaries, **{r: args.canaries for r in args.copies}}
    setup = build_site_files(work, groups, args.seed)
    print(
        f"empirical privacy: {PRESET}, bank {CANARY_SITE}: {len(setup['members'])} member records + "
        f"{sum(c.copies for c in setup['canaries'])} canary records ({args.canaries} canaries x copies "
        f"{args.copies}), {len(setup['nonmembers'])} held back as non-members; {args.canaries} reference canaries; "
        f"site files in {work / 'sites'}",
        flush=True,
    )
    rows = []
    for variant in args.variants:
        row = run_variant(setup, work, variant, args.rounds or None, args.local_steps or None)
        rows.append(row)
        print(
            f"  {variant_name(variant)}: eps {fmt_eps(row)}, held-out accuracy {row['heldout_accuracy']:.3f}, MIA AUC "
            f"{row['mia_auc']:.3f} ({row['train_s']:.0f} s, load {row['loadavg_before'][0]:.1f})",
            flush=True,
        )
    print()
    print_table(rows, args.copies)
    report = {
        **header("empirical_privacy", argv),
        "setup": {
            "preset": PRESET,
            "canary_site": CANARY_SITE,
            "site_sizes_before": setup["site_sizes"],
            "members": len(setup["members"]),
            "nonmembers": len(setup["nonmembers"]),
            "canary_words": CANARY_WORDS,
            "labels": len(setup["labels"]),
            "canaries": [asdict(c) for c in setup["canaries"]],
            "secure_aggregation": "on (preset default)",
        },
        "wall_s": time.time() - started,
        "loadavg_end": os.getloadavg(),
        "rows": rows,
    }
    write_report(args.out, "empirical_privacy", report, lambda path: plot(rows, args.copies, path), report["wall_s"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
