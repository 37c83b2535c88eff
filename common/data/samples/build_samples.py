"""Rebuild the small attributed samples shipped with fedtune from the full data sets.

Run from the repository root: ``python common/data/samples/build_samples.py ../shared/data``.
Sampling is seeded so the shipped files are reproducible; licences are copied verbatim.
"""

from __future__ import annotations

import csv
import json
import random
import shutil
import sys
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).parent
BANKING_TRAIN, BANKING_TEST = 3000, 770
MEDQUAD_PER_SOURCE, MEDQUAD_MAX_ANSWER_CHARS = 120, 2000


def sample_banking77(src: Path, rng: random.Random) -> None:
    out = HERE / "banking77"
    for name, count in (("train.csv", BANKING_TRAIN), ("test.csv", BANKING_TEST)):
        with (src / name).open(newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        rows = sorted(rng.sample(rows, count), key=lambda r: r["category"])
        with (out / name).open("w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=["text", "category"])
            writer.writeheader()
            writer.writerows(rows)
    shutil.copy(src / "categories.json", out / "categories.json")
    shutil.copy(src / "LICENSE", out / "LICENSE")


def sample_medquad(src: Path, rng: random.Random) -> None:
    by_source: dict[str, list[dict]] = defaultdict(list)
    with (src / "medquad.jsonl").open(encoding="utf-8") as fh:
        for line in fh:
            record = json.loads(line)
            if len(record["answer"]) <= MEDQUAD_MAX_ANSWER_CHARS:
                by_source[record["source"]].append(record)
    out = HERE / "medquad"
    with (out / "medquad_sample.jsonl").open("w", encoding="utf-8") as fh:
        for source in sorted(by_source):
            records = by_source[source]
            for record in rng.sample(records, min(MEDQUAD_PER_SOURCE, len(records))):
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    shutil.copy(src / "LICENSE.txt", out / "LICENSE.txt")


if __name__ == "__main__":
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data")
    rng = random.Random(20261123)
    sample_banking77(root / "banking77", rng)
    sample_medquad(root / "medquad", rng)
