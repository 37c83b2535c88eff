"""The confusion matrix as a PNG that stays readable from 3 labels to Banking77's 77.

Cells are coloured by the share of each true label's records (the row), so a rare label's
mistakes show as clearly as a common one's; counts are written in the cells only while they
fit (up to :data:`MAX_ANNOTATED` labels); beyond that the figure grows with the labels and
the tick labels shrink, and eval.json keeps the counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

MAX_ANNOTATED = 20


def plot_confusion_matrix(confusion: Sequence[Sequence[int]], labels: Sequence[str], out: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = np.asarray(confusion, dtype=float)
    n = len(labels)
    rows = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    side = max(5.0, 3.0 + 0.22 * n)
    tick_size = max(5.5, min(9.0, 320.0 / max(n, 1)))
    fig, ax = plt.subplots(figsize=(side + 1.5, side))
    try:
        image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true label's records")
        ax.set_xticks(range(n), [str(x) for x in labels], rotation=90, fontsize=tick_size)
        ax.set_yticks(range(n), [str(x) for x in labels], fontsize=tick_size)
        ax.set_xlabel("predicted label")
        ax.set_ylabel("true label")
        ax.set_title(title)
        if n <= MAX_ANNOTATED:
            for i in range(n):
                for j in range(n):
                    if counts[i, j]:
                        colour = "white" if shares[i, j] > 0.5 else "black"
                        ax.text(j, i, f"{int(counts[i, j])}", ha="center", va="center", color=colour, fontsize=8)
        fig.tight_layout()
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=120)
    finally:
        plt.close(fig)
    return out
