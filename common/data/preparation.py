"""A site's data, from files to clean examples, with a report that stays on the site.

Cleaning: whitespace normalised, empty records and exact duplicates dropped (counted).
Malformed records are collected, not fatal, so one pass can list them all; training then
refuses unless ``data.on_malformed = "skip"``. The report (counts, label histogram, token
lengths) is for the site's own operator: none of it is ever sent to the server.

Class imbalance is left to loss weighting (``train.class_weighting``), never oversampling:
DP-SGD's guarantee assumes every record joins each batch independently with the same
probability; a duplicated record is two records' worth of one person's data, which the
accountant would not see.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedtune.common.config import DataConfig
from fedtune.common.data.readers import DataError, FileSummary, ReadOptions, RecordProblem, read_raw
from fedtune.common.data.shapes import Example
from fedtune.common.tasks.base import TaskShape
from fedtune.common.tasks.registry import task_for

MAX_PROBLEMS_SHOWN = 10
MAX_LABELS_SHOWN = 10


@dataclass
class DataReport:
    """What was found in a site's files; printed locally, never sent."""

    source: Path
    task: str
    files: list[FileSummary] = field(default_factory=list)
    records_read: int = 0
    problems: list[str] = field(default_factory=list)
    hints: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    #: Set when not one record's label is in the agreed set: a mapping or label-set problem, said once.
    label_mismatch: str = ""
    empty_dropped: int = 0
    duplicates_dropped: int = 0
    examples: int = 0
    label_counts: dict[str, int] = field(default_factory=dict)
    labels_agreed: int = 0
    token_lengths: list[int] = field(default_factory=list)
    max_length: int = 0
    truncated: int = 0

    def problem_summary(self) -> str:
        listed = [p for p in self.problems if not (self.label_mismatch and "agreed label set" in p)]
        shown = listed[:MAX_PROBLEMS_SHOWN]
        more = len(listed) - len(shown)
        hints = [self.label_mismatch] if self.label_mismatch else []
        lines = [*hints, *self.hints, *shown] + ([f"... and {more} more"] if more > 0 else [])
        return "\n".join("  " + line for line in lines)

    def format(self) -> str:
        out = [f"data check: {self.source} as {self.task}"]
        for f in self.files:
            out.append(
                f"  {f.path}: {f.records} records ({f.file_format})"
                if f.file_format != "skipped"
                else f"  {f.path}: skipped ({f.detail})"
            )
            out += [f"    {note.removeprefix(f'{f.path}: ')}" for note in f.notes]
        out += [
            f"records read:          {self.records_read}",
            f"malformed:             {len(self.problems)}",
            f"empty (dropped):       {self.empty_dropped}",
            f"duplicates (dropped):  {self.duplicates_dropped}",
            f"usable examples:       {self.examples}",
        ]
        if self.label_counts:
            out.append(_label_histogram(self.label_counts, self.labels_agreed))
        if self.token_lengths:
            out.append(_length_histogram(self.token_lengths, self.max_length, self.truncated))
        if self.problems:
            out += ["malformed records (first shown):", self.problem_summary()]
        return "\n".join(out)


def _bar(count: int, largest: int, width: int = 30) -> str:
    return "#" * max(1, round(width * count / largest)) if count else ""


def _label_histogram(counts: dict[str, int], agreed: int) -> str:
    ordered = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    largest = ordered[0][1]
    shown = ordered if len(ordered) <= 20 else ordered[:12] + [("...", 0)] + ordered[-5:]
    lines = [f"labels: {len(counts)} of {agreed} agreed labels present; largest/smallest = {largest}/{ordered[-1][1]}"]
    for name, count in shown:
        lines.append("  ..." if name == "..." else f"  {name[:32]:32s} {count:6d} {_bar(count, largest)}")
    return "\n".join(lines)


def _length_histogram(lengths: list[int], cap: int, truncated: int) -> str:
    arr = np.asarray(lengths)
    edges = np.unique(np.linspace(0, max(int(arr.max()), cap), 9).round().astype(int))
    hist, _ = np.histogram(arr, bins=edges)
    lines = [
        f"token lengths: min {arr.min()}, median {int(np.median(arr))}, p95 {int(np.percentile(arr, 95))}, "
        f"max {arr.max()}; cap {cap} (model.max_length): {truncated} truncated "
        f"({100 * truncated / len(arr):.1f}%)"
    ]
    for lo, hi, count in zip(edges[:-1], edges[1:], hist, strict=True):
        lines.append(f"  {lo:5d}-{hi:<5d} {count:6d} {_bar(int(count), int(hist.max()))}")
    return "\n".join(lines)


@dataclass
class PreparedData:
    examples: list[Example]
    report: DataReport

    def require_usable(self, on_malformed: str = "fail") -> list[Example]:
        """The examples, or a DataError naming the first malformed records (unless told to skip them)."""
        r = self.report
        if r.label_mismatch:
            raise DataError(r.label_mismatch)
        if r.problems and on_malformed != "skip":
            raise DataError(
                f"{len(r.problems)} malformed record(s) in {r.source}; fix them, or set "
                f'data.on_malformed = "skip" to train without them:\n{r.problem_summary()}'
            )
        if not self.examples:
            raise DataError(
                f"{r.source}: no usable {r.task} records ({r.records_read} read, {len(r.problems)} "
                f"malformed, {r.empty_dropped} empty, {r.duplicates_dropped} duplicates)"
            )
        return self.examples


def read_options(data: DataConfig, task: TaskShape, labels: list[str] | None = None) -> ReadOptions:
    roles = task.roles
    return ReadOptions(
        file_format=data.format,
        header=data.header,
        delimiter=data.delimiter,
        quoting=data.quoting,
        column_names=tuple(data.column_names),
        max_record_bytes=data.max_record_bytes,
        expected_fields=tuple(getattr(data.fields, r) for r in roles),
        labels=tuple(labels or ()),
    )


def prepare(path: Path, data: DataConfig, labels: list[str], group_field: str = "") -> PreparedData:
    """Read, map, clean and de-duplicate every record under ``path`` (a file or folder)."""
    task = task_for(data.task)
    columns = data.fields.model_dump()
    records, problems, files = read_raw(path, read_options(data, task, labels))
    if data.max_records:
        records = records[: data.max_records]
    report = DataReport(
        source=Path(path),
        task=task.name,
        files=files,
        records_read=len(records) + len(problems),
        problems=[p.message for p in problems],
        warnings=[w for f in files for w in f.warnings],
        labels_agreed=len(labels),
    )
    examples, seen = [], set()
    unknown_labels: Counter[str] = Counter()
    for record in records:
        result = task.example(record, columns, labels, group_field)
        if result is None:
            report.empty_dropped += 1
        elif isinstance(result, RecordProblem):
            report.problems.append(result.message)
            if result.label is not None:
                unknown_labels[result.label] += 1
        elif result.key in seen:
            report.duplicates_dropped += 1
        else:
            seen.add(result.key)
            examples.append(result)
    report.examples = len(examples)
    if task.classifies:
        report.label_counts = dict(Counter(e.target for e in examples))
        if unknown_labels and not report.label_counts:
            report.label_mismatch = _label_mismatch(report.source, unknown_labels, labels, data.fields.label)
    _explain_missing_fields(report, len(records))
    return PreparedData(examples, report)


def _shown(names: list[str], limit: int = MAX_LABELS_SHOWN) -> str:
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(map(repr, names[:limit])) + more


def _label_mismatch(source: Path, found: Counter[str], agreed: list[str], column: str) -> str:
    """No record's label is agreed: one line with the data's labels beside the agreed ones.

    Skipping malformed records would drop every record, so that is not what to suggest.
    """
    in_data = [f"{name!r} ({count})" for name, count in found.most_common(MAX_LABELS_SHOWN)]
    more = f", ... ({len(found) - MAX_LABELS_SHOWN} more)" if len(found) > MAX_LABELS_SHOWN else ""
    return (
        f"{source}: none of the data's labels is in the agreed label set. In column {column!r} "
        f"(data.fields.label): {', '.join(in_data)}{more}; agreed (data.labels or data.labels_file): "
        f"{_shown(agreed)}. Check that data.fields.label names the label column, and that the site and "
        "the federation agreed the same label names"
    )


def _explain_missing_fields(report: DataReport, total: int) -> None:
    """When every record lacks a field, say that first: it is a mapping problem, not a data one."""
    missing = Counter(
        p.split("missing field ", 1)[1].split(" ", 1)[0] for p in report.problems if "missing field " in p
    )
    for name, count in missing.items():
        if count == total and total > 1:
            report.hints.append(
                f"{report.source}: field {name} is missing from all {total} records; "
                "check [data.fields] against the file's columns"
            )
