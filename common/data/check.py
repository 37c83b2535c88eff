"""``fedtune data check``: can a site train on these files? Answered locally, before any round.

The same preparation runs when a site starts; this command lets its operator see the
whole picture (counts, labels, token lengths, the first malformed records) and fix it
first. Nothing here is sent anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedtune.common.config import FedtuneConfig
from fedtune.common.data.federation_data import agreed_labels
from fedtune.common.data.preparation import DataReport, prepare

#: A share of truncated records above which the check warns: the model would see only their beginnings.
TRUNCATION_WARNING = 0.9


@dataclass
class CheckResult:
    report: DataReport
    blockers: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def trainable(self) -> bool:
        return not self.blockers

    def format(self) -> str:
        lines = [self.report.format(), ""]
        lines += [f"warning: {w}" for w in self.warnings]
        if self.blockers:
            lines += [f"NOT TRAINABLE: {b}" for b in self.blockers]
        else:
            lines.append("OK: this site can train on the data")
        return "\n".join(lines)


def check_data(cfg: FedtuneConfig, path: Path, tokenizer: Any | None = None) -> CheckResult:
    """Prepare ``path`` exactly as a site would and say whether training could start.

    File-level problems (missing, not UTF-8, binary, unparseable) raise DataError.
    """
    data = cfg.data
    labels = agreed_labels(cfg)
    prepared = prepare(path, data, labels)
    report, result = prepared.report, CheckResult(prepared.report, warnings=list(prepared.report.warnings))
    if report.label_mismatch:
        result.blockers.append(
            "no record's label is in the agreed label set (data.labels or data.labels_file); see the labels above"
        )
    elif report.problems:
        if data.on_malformed == "skip":
            result.warnings.append(f"{len(report.problems)} malformed records will be skipped (data.on_malformed)")
        else:
            result.blockers.append(
                f'{len(report.problems)} malformed records; fix them or set data.on_malformed = "skip"'
            )
    if not prepared.examples:
        if not report.label_mismatch:
            result.blockers.append(f"no usable {report.task} records")
        return result
    if tokenizer is not None:
        encoded = cfg.task.head.encode(prepared.examples, tokenizer, labels, cfg.model.max_length)
        report.token_lengths, report.truncated, report.max_length = (
            encoded.lengths or [],
            encoded.truncated,
            cfg.model.max_length,
        )
        share = report.truncated / max(len(report.token_lengths), 1)
        if share >= TRUNCATION_WARNING:
            lengths = sorted(report.token_lengths)
            result.warnings.append(
                f"{report.truncated} of {len(lengths)} records ({100 * share:.0f}%) are longer than model.max_length "
                f"= {cfg.model.max_length} tokens and will be cut short (median {lengths[len(lengths) // 2]} tokens); "
                "raise model.max_length if their ends matter"
            )
    n_train = len(prepared.examples) - int(round(len(prepared.examples) * data.val_fraction))
    if cfg.privacy.enabled and cfg.privacy.delta >= 1.0 / max(n_train, 1):
        result.blockers.append(
            f"privacy.delta = {cfg.privacy.delta} is not below 1/n for n = {n_train} training "
            f"records; ask for delta < {1.0 / n_train:.1e}"
        )
    if len(report.label_counts) < len(labels):  # only a classifying task has agreed labels
        result.warnings.append(
            f"{len(labels) - len(report.label_counts)} of the {len(labels)} agreed labels have "
            "no records here (fine in a federation: other sites may hold them)"
        )
    return result
