"""Mixed precision: a frozen base in bf16/fp16 (or quantised), the trained tensors in fp32.

DP-SGD's clipping compares each record's gradient norm with ``max_grad_norm`` and adds Gaussian noise of
std ``sigma * max_grad_norm``; in bf16 (8 bits of mantissa) both would be off by about 0.4 % a value and the
noise's tail would be coarse. So the LoRA matrices and any trained head are kept in fp32, their inputs are
cast up to fp32 before they are used (peft does so for its LoRA layers; a trained head gets a pre-hook), and
Opacus then records fp32 activations and backprops: per-record gradients, their norms, the clipped sum and
the noise are all fp32, while the large frozen matmuls run in the base's dtype (Micikevicius et al.,
"Mixed Precision Training", ICLR 2018, keep an fp32 master copy for the same reason).
"""

from __future__ import annotations

from typing import Any

import torch

_MARK = "_fedtune_fp32_inputs"


def _inputs_to_fp32(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def keep_trainables_fp32(model: torch.nn.Module) -> int:
    """Cast every trainable tensor to fp32 in place, and have each module that owns one cast its floating
    inputs to fp32 first; returns how many tensors were cast. Idempotent (the optimiser must be built after)."""
    cast = 0
    for module in model.modules():
        owned = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if not owned:
            continue
        for p in owned:
            if p.dtype != torch.float32:
                p.data = p.data.float()
                cast += 1
        if not getattr(module, _MARK, False):
            module.register_forward_pre_hook(_inputs_to_fp32)
            setattr(module, _MARK, True)
    return cast
