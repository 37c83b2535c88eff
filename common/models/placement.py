"""Put an adapted model where it works: trained tensors in fp32, optional checkpointing, then on its device."""

from __future__ import annotations

from typing import Any

import torch

from fedtune.common.models.precision import keep_trainables_fp32


def is_quantized(model: Any) -> bool:
    """A bitsandbytes base: built on its GPU already, and ``.to()`` would refuse it."""
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def place_model(model: Any, device: torch.device, gradient_checkpointing: bool = False) -> Any:
    """``model`` (in place) ready to train and evaluate on ``device``; returns it.

    Gradient checkpointing is the re-entrant kind: its first forward runs without autograd, so Opacus'
    hooks record nothing there, and the recomputation in the backward pass records each LoRA layer's input
    once, as without checkpointing (the non-re-entrant kind leaves Opacus without per-record gradients).
    """
    keep_trainables_fp32(model)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        model.enable_input_require_grads()  # re-entrant checkpoints need an input that requires grad
        if hasattr(model, "config"):
            model.config.use_cache = False
    if not is_quantized(model) and next(model.parameters()).device != device:
        model.to(device)
    return model
