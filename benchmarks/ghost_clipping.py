"""Opacus' ghost clipping run as fedtune's DP-SGD step: what dp_overhead.py compares fedtune's step with.

fedtune computes per-sample gradients with Opacus' hooks (``client.dp_training.train_adapter``);
ghost clipping (``PrivacyEngine.make_private(grad_sample_mode="ghost")``) gets the per-sample norms
without materialising the gradients, and fedtune does not use it. Kept out of the script so that
the tests can check it steps exactly as ``train_adapter`` does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from fedtune.client.dp_training import LocalTrainPlan, poisson_batches
from fedtune.common.data.encoding import EncodedSet
from fedtune.common.losses import per_sample_causal_lm_loss, per_sample_cross_entropy

if TYPE_CHECKING:
    from fedtune.common.tasks.base import TaskShape


class PerRecordLoss(torch.nn.Module):
    """The product's per-record loss of the task (its head's, from the logits) as the criterion Opacus'
    ghost clipping wraps."""

    reduction = "mean"

    def __init__(self, task: TaskShape) -> None:
        super().__init__()
        self.classifies = task.classifies

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.reduction != "none":
            raise ValueError("ghost clipping asks for per-record losses (reduction='none')")
        if self.classifies:
            return per_sample_cross_entropy(logits, labels)
        return per_sample_causal_lm_loss(logits, labels)[0]


def ghost_clipping_train(model: Any, data: EncodedSet, task: TaskShape, plan: LocalTrainPlan) -> None:
    """``train_adapter``'s DP steps with Opacus ghost clipping instead of per-sample gradients.

    Full batches only (``batch_size == len(data)``): then Opacus' expected batch size and
    fedtune's are the same, and each step clips and noises exactly as ``train_adapter`` does.
    """
    from opacus import PrivacyEngine

    if plan.batch_size != len(data) or plan.noise_multiplier is None:
        raise ValueError("ghost_clipping_train runs private steps on full batches only")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = (
        torch.optim.Adam(params, lr=plan.lr) if plan.optimizer == "adam" else torch.optim.SGD(params, lr=plan.lr)
    )
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.arange(len(data))), batch_size=len(data))
    module, optimizer, criterion, _ = PrivacyEngine().make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        criterion=PerRecordLoss(task),
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=plan.max_grad_norm,
        grad_sample_mode="ghost",
        poisson_sampling=False,
    )
    generator = torch.Generator().manual_seed(plan.seed)
    model.train()
    try:
        for idx in poisson_batches(len(data), 1.0, plan.steps, generator):
            optimizer.zero_grad(set_to_none=True)
            batch = data.batch(idx)
            out = module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            criterion(out.logits, batch["labels"]).backward()
            optimizer.step()
    finally:
        optimizer.zero_grad(set_to_none=True)
        module.cleanup()
