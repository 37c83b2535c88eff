"""Turn a configured data set into the server's held-out set and each site's train/val split.

In a simulation every site derives its own share deterministically from the same seed,
so no raw record ever has to travel between processes.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedtune.common.config import DataConfig, FedtuneConfig
from fedtune.common.data.partition import partition_by_column, partition_dirichlet, partition_iid, split_train_val
from fedtune.common.data.preparation import prepare
from fedtune.common.data.readers import DataError
from fedtune.common.data.shapes import Example

log = logging.getLogger("fedtune.data")


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


def agreed_labels(cfg: FedtuneConfig) -> list[str]:
    """The agreed label set of a classifying task; a generative task has none."""
    return load_label_set(cfg.data) if cfg.task.classifies else []


def _group_field(cfg: FedtuneConfig) -> str:
    """The field a simulation partitions on: ``partition.column``, except that classification uses the label."""
    return cfg.partition.column if cfg.partition.scheme == "column" or not cfg.task.classifies else ""


def load_examples(path: Path, cfg: FedtuneConfig, group_field: str = "") -> list[Example]:
    """Clean examples from ``path``, or a DataError naming the first malformed records."""
    prepared = prepare(path, cfg.data, agreed_labels(cfg), group_field)
    for warning in prepared.report.warnings:  # e.g. a file read without quoting: the site's log says so
        log.warning("%s", warning)
    return prepared.require_usable(cfg.data.on_malformed)


def load_test_set(cfg: FedtuneConfig) -> list[Example]:
    """The server's own held-out set (``data.test_path``), capped at ``data.max_eval_examples``."""
    assert cfg.data.test_path is not None
    return _cap(load_examples(cfg.data.test_path, cfg), cfg)


def _cap(test: list[Example], cfg: FedtuneConfig) -> list[Example]:
    if len(test) <= cfg.data.max_eval_examples:
        return test
    rng = np.random.default_rng(cfg.run.seed + 1)
    return [test[i] for i in sorted(rng.choice(len(test), cfg.data.max_eval_examples, replace=False))]


def load_pool_and_test(cfg: FedtuneConfig) -> tuple[list[Example], list[Example]]:
    """The records to share among simulated sites, and the server's held-out evaluation set."""
    assert cfg.data.path is not None
    pool = load_examples(cfg.data.path, cfg, _group_field(cfg))
    if cfg.partition.scheme == "column" and not any(e.group for e in pool):
        raise DataError(f"{cfg.data.path}: partition.column {cfg.partition.column!r} is not a field of the records")
    if cfg.data.test_path is not None:
        return pool, load_test_set(cfg)
    order = np.random.default_rng(cfg.run.seed).permutation(len(pool))
    n_test = int(round(len(pool) * cfg.data.holdout_fraction))
    test = [pool[i] for i in sorted(order[:n_test])]
    pool = [pool[i] for i in sorted(order[n_test:])]
    return pool, _cap(test, cfg)


def server_test_set(cfg: FedtuneConfig) -> list[Example]:
    """What the server evaluates on: its own file if given, else the held-out share of a simulation's pool."""
    if cfg.data.test_path is not None:
        return load_test_set(cfg)
    return load_pool_and_test(cfg)[1]


def split_site(examples: list[Example], cfg: FedtuneConfig, site_index: int) -> SiteSplit:
    """A site's deterministic train/validation split (the seed and the site's index fix it)."""
    train_idx, val_idx = split_train_val(range(len(examples)), cfg.data.val_fraction, cfg.run.seed + 100 + site_index)
    return SiteSplit(
        train=[examples[i] for i in train_idx], val=[examples[i] for i in val_idx[: cfg.data.max_eval_examples]]
    )


def load_site_files(cfg: FedtuneConfig, site_index: int) -> SiteSplit:
    """One site's own files (``partition.scheme = "files"``), read and validated on that site only."""
    return split_site(load_examples(cfg.data.site_paths[site_index], cfg), cfg, site_index)


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
    """Every simulated site's train/val split of the shared pool, plus the server's held-out set."""
    if cfg.partition.scheme == "files":
        raise ValueError("partition.scheme = 'files': each site loads its own files (load_site_files)")
    pool, test = load_pool_and_test(cfg)
    sites = []
    for site_id, indices in enumerate(partition_pool(cfg, pool)):
        sites.append(split_site([pool[i] for i in indices], cfg, site_id))
    for site_id, site in enumerate(sites):
        if len(site.train) < cfg.partition.min_examples:
            raise DataError(
                f"site {site_id} has only {len(site.train)} training records "
                f"(partition.min_examples = {cfg.partition.min_examples}); use fewer clients or more data"
            )
    return sites, test
