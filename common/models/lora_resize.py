"""A peft LoRA model set to a site's rank, in place, keeping the global adapter's scaling.

A site of rank r_i builds the same model as every other process, at the federation's rank
r_max (so FFA-LoRA's shared A is the same everywhere), then keeps only each layer's first r_i
components. peft scales the product B·A by alpha / r; a resized layer keeps alpha / r_max, so
its update is exactly the truncation of the global one (``common.models.lora_ranks``).

One model serves every site of a process (a simulation actor serves many): going back up
to a larger rank takes the missing rows of A from :func:`lora_a_rows`, the A matrices as
built, which under FFA-LoRA are the frozen shared ones; B's new columns start at zero.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch


def _lora_layers(model: Any) -> Iterator[tuple[str, Any, str]]:
    """(module name, peft LoRA layer, adapter name) for every LoRA adapter of ``model``."""
    from peft.tuners.lora import LoraLayer

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            for adapter in module.lora_A:
                yield name, module, adapter


def lora_a_rows(model: Any) -> dict[tuple[str, str], torch.Tensor]:
    """A copy of every LoRA A matrix, by (module, adapter): the rows a layer regains when it grows."""
    return {
        (name, adapter): layer.lora_A[adapter].weight.detach().clone() for name, layer, adapter in _lora_layers(model)
    }


def lora_rank_of(model: Any) -> int:
    """The rank the model's LoRA layers have now (all alike)."""
    ranks = {layer.r[adapter] for _, layer, adapter in _lora_layers(model)}
    if len(ranks) != 1:
        raise ValueError(f"expected LoRA layers of one rank, found ranks {sorted(ranks)}")
    return int(ranks.pop())


def set_lora_rank(model: Any, rank: int, a_rows: dict[tuple[str, str], torch.Tensor]) -> None:
    """Resize every LoRA layer of ``model`` to ``rank`` components, its scaling unchanged.

    A's rows and B's columns below ``rank`` are kept; rows of A it gains come from ``a_rows``
    (:func:`lora_a_rows` of the model as built), columns of B it gains are zero. Whether each
    factor trains (FFA-LoRA freezes A) is kept. The optimiser and Opacus' per-sample hooks are
    made afresh each round (``client.dp_training``), so they see the new modules.
    """
    for name, layer, adapter in list(_lora_layers(model)):
        old_a, old_b = layer.lora_A[adapter], layer.lora_B[adapter]
        if old_a.out_features == rank:
            continue
        reference = a_rows[(name, adapter)]
        if not 1 <= rank <= reference.shape[0]:
            raise ValueError(f"{name}: LoRA rank {rank} is outside 1..{reference.shape[0]} (the rank it was built at)")
        kept = min(rank, old_a.out_features)
        weight = old_a.weight
        new_a = torch.nn.Linear(old_a.in_features, rank, bias=False, dtype=weight.dtype, device=weight.device)
        new_b = torch.nn.Linear(
            rank, old_b.out_features, bias=old_b.bias is not None, dtype=weight.dtype, device=weight.device
        )
        with torch.no_grad():
            new_a.weight.copy_(torch.cat([old_a.weight[:kept], reference[kept:rank].to(weight)]))
            new_b.weight.zero_()
            new_b.weight[:, :kept] = old_b.weight[:, :kept]
            if old_b.bias is not None:
                new_b.bias.copy_(old_b.bias)
        new_a.weight.requires_grad_(old_a.weight.requires_grad)
        new_b.weight.requires_grad_(old_b.weight.requires_grad)
        if new_b.bias is not None:
            new_b.bias.requires_grad_(old_b.bias.requires_grad)
        new_a.train(old_a.training)
        new_b.train(old_b.training)
        layer.lora_A[adapter], layer.lora_B[adapter] = new_a, new_b
        layer.r[adapter] = rank  # layer.scaling[adapter] stays alpha / r_max
