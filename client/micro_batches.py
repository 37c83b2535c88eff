"""A logical (Poisson) batch in physical micro-batches: the same DP step in less memory.

DP-SGD's step is ``(sum_i clip(g_i) + N(0, sigma^2 C^2)) / B``: a sum over records, so it can be built in
pieces. Each micro-batch's per-record gradients are clipped and added to Opacus' running sum
(``DPOptimizer.signal_skip_step`` makes ``pre_step`` stop after ``clip_and_accumulate``); after the last
micro-batch the noise is added once and the optimiser steps once. The sampling is untouched: the records
are those the Poisson draw picked for the logical step, only their pass through the model is split, so the
accountant's analysis holds (Opacus' ``BatchMemoryManager`` does the same for its own DataLoader).
"""

from __future__ import annotations

import torch


def micro_batches(indices: torch.Tensor, max_size: int) -> list[torch.Tensor]:
    """``indices`` in order, in chunks of at most ``max_size`` (0: one chunk); an empty batch stays one chunk."""
    if max_size <= 0 or len(indices) <= max_size:
        return [indices]
    return list(torch.split(indices, max_size))
