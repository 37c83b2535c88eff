"""A site's local optimiser state, kept on its own disk from one round of a run to the next
(``train.keep_optimizer_state``), so Adam's moments build up over the run instead of restarting.

A fresh Adam that takes a few steps a round moves each coordinate by about ``lr`` in the sign of
its gradient (its first steps are close to sign descent); kept moments average the noisy DP
gradients over the whole run, which is what Adam's bias-corrected moments are for.

Privacy: the state is Adam's ``exp_avg``, ``exp_avg_sq`` and ``step``, which the wrapped
optimiser computes from the gradients Opacus has already clipped per record, noised and averaged
(``client.dp_training``). It depends on the records only through the outputs of the Gaussian
mechanism the ledger charges for, so keeping it is post-processing: no privacy cost, no charge.
It never leaves the site.

The file holds the state after round ``round`` and the state that round started from. A round
asked for again (the server resumed, the site's reply was lost) starts again from the latter, so
a round trained twice does not advance the moments twice; a replayed round (``Site._replay``)
does not train and leaves the file alone. State of another run id, optimiser or adapter shape is
not used: the site starts fresh and logs why.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fedtune.client.dp_training import OptimizerState
from fedtune.common.atomic_files import atomic_write_bytes

log = logging.getLogger("fedtune.site")

#: What the file may hold for a tensor: the wrapped optimiser's own state (Adam's), nothing else.
STATE_KEYS = frozenset({"exp_avg", "exp_avg_sq", "step"})


def _flat(prefix: str, state: OptimizerState) -> dict[str, np.ndarray]:
    return {f"{prefix}/{i}/{k}": np.asarray(v) for i, tensor in enumerate(state) for k, v in tensor.items()}


def _nested(prefix: str, arrays: dict[str, np.ndarray], count: int) -> OptimizerState:
    out: list[dict[str, np.ndarray]] = [{} for _ in range(count)]
    for key, value in arrays.items():
        which, index, name = key.split("/")
        if which == prefix:
            out[int(index)][name] = value
    return tuple(out) if any(out) else ()


class OptimizerStateStore:
    """``STATE_DIR/optimizer_state.npz``: one run's optimiser state, written atomically after each round."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def load(
        self, run_id: str, round_: int, optimizer: str, shapes: Sequence[tuple[int, ...]], site_id: str = "site"
    ) -> OptimizerState:
        """The state round ``round_`` of ``run_id`` starts from; empty (a fresh optimiser) if none fits."""
        if not self.path.exists():
            return ()
        try:
            with np.load(self.path, allow_pickle=False) as saved:
                meta = json.loads(str(saved["__meta__"]))
                arrays = {k: saved[k] for k in saved.files if k != "__meta__"}
            count = int(meta["tensors"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return self._fresh(site_id, round_, f"{self.path} is unreadable ({exc})")
        if meta["run_id"] != run_id:
            return self._fresh(site_id, round_, f"the saved state is of run {meta['run_id']!r}, not {run_id!r}")
        if meta["optimizer"] != optimizer:
            return self._fresh(site_id, round_, f"the saved state is of optimiser {meta['optimizer']!r}")
        if meta["round"] > round_:
            return self._fresh(site_id, round_, f"the saved state is of a later round ({meta['round']})")
        # Round ``round_`` asked again: start where its first attempt started, not where it ended.
        state = _nested("before" if meta["round"] == round_ else "after", arrays, count)
        if state and (problem := _shape_problem(state, shapes)):
            return self._fresh(site_id, round_, problem)
        return state

    def save(self, run_id: str, round_: int, optimizer: str, before: OptimizerState, after: OptimizerState) -> None:
        """Round ``round_``'s state: what it started from (``before``) and what it ended with (``after``)."""
        for tensor in (*before, *after):
            if set(tensor) - STATE_KEYS:
                raise ValueError(f"optimizer state {sorted(tensor)} holds more than {sorted(STATE_KEYS)}")
        meta = {"run_id": run_id, "round": round_, "optimizer": optimizer, "tensors": max(len(before), len(after))}
        buffer = io.BytesIO()
        np.savez(
            buffer,
            allow_pickle=False,
            __meta__=np.array(json.dumps(meta)),
            **_flat("before", before),
            **_flat("after", after),
        )
        atomic_write_bytes(self.path, buffer.getvalue())

    @staticmethod
    def _fresh(site_id: str, round_: int, why: str) -> OptimizerState:
        log.warning("%s round %d: starting a fresh optimiser: %s", site_id, round_, why)
        return ()


def _shape_problem(state: OptimizerState, shapes: Sequence[tuple[int, ...]]) -> str | None:
    if len(state) != len(shapes):
        return f"the saved state is for {len(state)} tensors, the adapter trains {len(shapes)}"
    for i, (tensor, shape) in enumerate(zip(state, shapes, strict=True)):
        for name, value in tensor.items():
            if value.ndim and tuple(value.shape) != tuple(shape):
                return f"the saved {name} of tensor {i} has shape {value.shape}, the adapter's is {tuple(shape)}"
    return None
