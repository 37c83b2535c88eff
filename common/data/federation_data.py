"""Turn a configured data set into the server's held-out set and each site's train/val split.

In a simulation every site derives its own share deterministically from the same seed,
so no raw record ever has to travel between processes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.config import DataConfig, FedtuneConfig
from common.data.partition import partition_by_column, partition_dirichlet, partition_iid, split_train_val
from common.data.records import DataError, read_records, require_field


@dataclass(frozen=True)
class Example:
    """One training record: ``text`` is the input (or prompt), ``target`` the label name (or response)."""

    text: str
    target: str
    group: str = ""


@dataclass(frozen=True)
class SiteSplit:
    train: list[Example]
    val: list[Example]


def load_label_set(data: DataConfig) -> list[str]:
    """The label set agreed for the federation, from config (never learned from a site's data)."""
    if data.labels:
        return list(data.labels)
    assert data.labels_file is not None
    try:
        labels = json.loads(Path(data.labels_file).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{data.labels_file}: invalid JSON ({exc.msg}); expected a list of label names") from exc
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels) or not labels:
        raise DataError(f"{data.labels_file}: expected a non-empty JSON list of label names")
    return labels


def _to_examples(rows: list[dict], path: Path, cfg: FedtuneConfig, group_field: str) -> list[Example]:
    data = cfg.data
    examples = []
    labels = set(load_label_set(data)) if cfg.model.task == "classification" else None
    for i, row in enumerate(rows):
        if labels is not None:
            text = require_field(row, data.text_field, path, i)
            target = require_field(row, data.label_field, path, i)
            if target not in labels:
                raise DataError(f"{path}, record {i + 1}: label {target!r} is not in the agreed label set")
        else:
            text = require_field(row, data.prompt_field, path, i)
            target = require_field(row, data.response_field, path, i)
        examples.append(Example(text=text, target=target, group=str(row.get(group_field, ""))))
    return examples


def _group_field(cfg: FedtuneConfig) -> str:
    if cfg.partition.scheme == "column":
        return cfg.partition.column
    if cfg.partition.scheme == "dirichlet" and cfg.model.task == "classification":
        return cfg.data.label_field
    return cfg.partition.column


def load_pool_and_test(cfg: FedtuneConfig) -> tuple[list[Example], list[Example]]:
    """The records to share among sites, and the server's held-out evaluation set."""
    data = cfg.data
    group = _group_field(cfg)
    rows = read_records(data.path, data.max_records)
    if cfg.partition.scheme == "column" and group not in rows[0]:
        raise DataError(f"{data.path}: partition.column {group!r} is not a field (fields: {sorted(rows[0])})")
    pool = _to_examples(rows, data.path, cfg, group)
    if data.test_path is not None:
        test = _to_examples(read_records(data.test_path), data.test_path, cfg, group)
    else:
        order = np.random.default_rng(cfg.run.seed).permutation(len(pool))
        n_test = int(round(len(pool) * data.holdout_fraction))
        test = [pool[i] for i in sorted(order[:n_test])]
        pool = [pool[i] for i in sorted(order[n_test:])]
    rng = np.random.default_rng(cfg.run.seed + 1)
    if len(test) > data.max_eval_examples:
        test = [test[i] for i in sorted(rng.choice(len(test), data.max_eval_examples, replace=False))]
    return pool, test


def partition_pool(cfg: FedtuneConfig, pool: list[Example]) -> list[list[int]]:
    p = cfg.partition
    if p.scheme == "iid":
        return partition_iid(len(pool), p.num_clients, cfg.run.seed)
    if p.scheme == "dirichlet":
        return partition_dirichlet(
            [e.group for e in pool], p.num_clients, p.alpha, cfg.run.seed, min_size=p.min_examples
        )
    return partition_by_column([e.group for e in pool], p.num_clients)


def build_site_splits(cfg: FedtuneConfig) -> tuple[list[SiteSplit], list[Example]]:
    """Every simulated site's train/val split plus the server's held-out set."""
    pool, test = load_pool_and_test(cfg)
    sites = []
    for site_id, indices in enumerate(partition_pool(cfg, pool)):
        train_idx, val_idx = split_train_val(indices, cfg.data.val_fraction, cfg.run.seed + 100 + site_id)
        val_idx = val_idx[: cfg.data.max_eval_examples]
        sites.append(SiteSplit(train=[pool[i] for i in train_idx], val=[pool[i] for i in val_idx]))
    for site_id, site in enumerate(sites):
        if len(site.train) < cfg.partition.min_examples:
            raise DataError(
                f"site {site_id} has only {len(site.train)} training records "
                f"(partition.min_examples = {cfg.partition.min_examples}); use fewer clients or more data"
            )
    return sites, test
