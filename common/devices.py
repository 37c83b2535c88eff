"""Where the model works: ``train.device`` resolved once, and batches that land there.

``auto`` is CUDA when torch sees a GPU, else the CPU. An explicit device the machine lacks is refused
at start with the field named, not discovered in a site's first step. In a deployment a site uses the
GPUs its process sees: ``CUDA_VISIBLE_DEVICES`` picks them (``cuda`` is then the first of those).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from fedtune.common.config import ConfigError
from fedtune.common.data.encoding import EncodedSet


def resolve_device(setting: str) -> torch.device:
    """The torch device of ``train.device``; a ``ConfigError`` naming the field if this machine has none such."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"train.device = {setting!r} but torch sees no CUDA GPU on this machine (CPU-only torch, no driver, "
                "or CUDA_VISIBLE_DEVICES empty): set train.device = 'auto' or 'cpu', or install CUDA torch"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"train.device = {setting!r} but torch sees {torch.cuda.device_count()} GPU(s) "
                "(CUDA_VISIBLE_DEVICES renumbers them from 0): pick one of those"
            )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"train.device = {setting!r} but this machine has no Apple MPS device: set 'auto' or 'cpu'")
    return device


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter: where its batches must go."""
    return next(model.parameters()).device


@dataclass
class EncodedSetOnDevice(EncodedSet):
    """An :class:`EncodedSet` whose batches are built on the CPU and handed over on ``device``, so the
    task heads' evaluation loops run unchanged on a GPU."""

    device: torch.device = torch.device("cpu")

    def batch(self, indices: list[int] | torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in super().batch(indices).items()}


def on_device(data: EncodedSet, device: torch.device) -> EncodedSet:
    """``data`` with its batches on ``device`` (``data`` itself on the CPU)."""
    if device.type == "cpu":
        return data
    values = {f.name: getattr(data, f.name) for f in fields(EncodedSet)}
    return EncodedSetOnDevice(**values, device=device)
