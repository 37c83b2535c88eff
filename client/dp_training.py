"""Local training of the adapter: Opacus DP-SGD with Poisson sampling, or plain SGD/Adam.

The privacy maths (calibration, accounting) lives in ``common.privacy``; this module is
the plumbing that makes each step exactly the mechanism the accountant analyses:
every record joins a step's batch independently with probability ``sample_rate``, each
record's gradient is clipped to ``max_grad_norm``, Gaussian noise of std
``noise_multiplier * max_grad_norm`` is added to the sum, and the sum is divided by the
expected batch size. Only the adapter's trainable tensors get gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from fedtune.common.data.encoding import EncodedSet
from fedtune.common.tasks.base import TaskShape


@dataclass(frozen=True)
class LocalTrainPlan:
    """One round of local training. ``noise_multiplier=None`` means non-private.

    ``seed`` drives Poisson sampling and the Gaussian noise; a site draws it from the OS
    CSPRNG (see ``client.site``). Fixing it is for tests only.
    """

    steps: int
    batch_size: int
    lr: float
    optimizer: str = "adam"
    noise_multiplier: float | None = None
    max_grad_norm: float = 1.0
    seed: int = 0
    class_weights: tuple[float, ...] = ()

    def sample_rate(self, num_records: int) -> float:
        """Poisson rate giving ``batch_size`` records per step on average."""
        return min(1.0, self.batch_size / num_records)


@dataclass(frozen=True)
class LocalTrainResult:
    steps: int
    mean_loss: float
    records_seen: int
    sample_rate: float


def _make_optimizer(params: list[torch.nn.Parameter], plan: LocalTrainPlan) -> torch.optim.Optimizer:
    if plan.optimizer == "sgd":
        return torch.optim.SGD(params, lr=plan.lr)
    return torch.optim.Adam(params, lr=plan.lr)


def poisson_batches(num_records: int, sample_rate: float, steps: int, generator: torch.Generator):
    """Indices of each step's batch: every record joins independently with ``sample_rate``."""
    for _ in range(steps):
        yield torch.nonzero(torch.rand(num_records, generator=generator) < sample_rate).flatten()


def train_adapter(
    model: Any,
    data: EncodedSet,
    task: TaskShape,
    plan: LocalTrainPlan,
    on_step: Callable[[int, float], None] | None = None,
) -> LocalTrainResult:
    """Train the trainable (adapter) parameters of ``model`` in place for ``plan.steps`` steps."""
    if len(data) == 0:
        raise ValueError("no training records on this site")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters: was the LoRA adapter attached?")
    q = plan.sample_rate(len(data))
    generator = torch.Generator().manual_seed(plan.seed)
    model.train()
    private = plan.noise_multiplier is not None
    if private:
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        module = GradSampleModule(model, batch_first=True, loss_reduction="mean")
        optimizer: torch.optim.Optimizer = DPOptimizer(
            _make_optimizer(params, plan),
            noise_multiplier=plan.noise_multiplier,
            max_grad_norm=plan.max_grad_norm,
            expected_batch_size=plan.batch_size,
            loss_reduction="mean",
        )
        if hasattr(optimizer, "generator"):
            optimizer.generator = torch.Generator().manual_seed(plan.seed + 1)
    else:
        module, optimizer = model, _make_optimizer(params, plan)
    weights = torch.tensor(plan.class_weights, dtype=torch.float32) if plan.class_weights else None
    if weights is not None and not task.classifies:
        raise ValueError("class weights apply to classification only")
    losses, seen = [], 0
    try:
        for step, idx in enumerate(poisson_batches(len(data), q, plan.steps, generator), start=1):
            optimizer.zero_grad(set_to_none=True)
            if len(idx) == 0:
                # An empty Poisson batch is still a step of the mechanism: noise only (DP) or nothing.
                if private:
                    for p in params:
                        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype)
                    optimizer.step()
                continue
            batch = data.batch(idx)
            losses_each = task.head.per_sample_loss(module, batch)
            if weights is not None:
                # Weighted before clipping: each record's gradient is still clipped to max_grad_norm.
                losses_each = losses_each * weights[batch["labels"]]
            loss = losses_each.mean()
            loss.backward()
            if not private:
                # Match DP-SGD's normalisation by the expected, not the realised, batch size.
                for p in params:
                    if p.grad is not None:
                        p.grad.mul_(len(idx) / plan.batch_size)
            optimizer.step()
            losses.append(float(loss.detach()))
            seen += len(idx)
            if on_step is not None:
                on_step(step, losses[-1])
    finally:
        optimizer.zero_grad(set_to_none=True)
        if private:
            module.remove_hooks()
            for p in params:
                for attr in ("grad_sample", "summed_grad"):
                    if hasattr(p, attr):
                        delattr(p, attr)
    return LocalTrainResult(
        steps=plan.steps, mean_loss=sum(losses) / max(len(losses), 1), records_seen=seen, sample_rate=q
    )
