"""Local training of the adapter: Opacus DP-SGD with Poisson sampling, or plain SGD/Adam.

The privacy maths (calibration, accounting) lives in ``common.privacy``; this module is
the plumbing that makes each step exactly the mechanism the accountant analyses:
every record joins a step's batch independently with probability ``sample_rate``, each
record's gradient is clipped to ``max_grad_norm``, Gaussian noise of std
``noise_multiplier * max_grad_norm`` is added to the sum, and the sum is divided by the
expected batch size. Only the adapter's trainable tensors get gradients.

FedProx (Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020) adds
``mu/2 * ||w - w_global||^2`` to the local objective, ``w_global`` being the trainable tensors
as training starts (the global adapter the site has just loaded). Its gradient depends on no
record, so under DP-SGD it is added after Opacus has clipped and noised the per-record
gradients: post-processing, at no privacy cost, and not clipped per record.

The local optimiser is fresh each round unless the caller hands in ``optimizer_state`` (the state a
previous round returned, ``train.keep_optimizer_state``). Under DP-SGD that state (Adam's moments
and step count) is computed by the wrapped optimiser from the clipped, noised, averaged gradients
only, never from a raw per-record gradient: carrying it into the next round is post-processing of
the Gaussian mechanism's outputs and costs no privacy (Dwork & Roth 2014, Prop. 2.1).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedtune.client.micro_batches import micro_batches
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
    proximal_mu: float = 0.0  # FedProx: weight of mu/2 * ||w - w_global||^2 (0: off)
    max_physical_batch_size: int = 0  # records a forward/backward pass at most (0: the whole batch at once)
    #: Opacus' secure_mode noise: each Gaussian value is drawn as a sum of four, which closes the
    #: floating-point attacks on the noise's low bits (Holohan et al. 2021, Jin et al. 2022).
    secure_noise: bool = False

    def sample_rate(self, num_records: int) -> float:
        """Poisson rate giving ``batch_size`` records per step on average."""
        return min(1.0, self.batch_size / num_records)


#: An optimiser's state, one mapping per trainable tensor in ``model.parameters()`` order (Adam: exp_avg,
#: exp_avg_sq, step); empty for a fresh optimiser, and for plain SGD, which keeps none.
OptimizerState = tuple[dict[str, np.ndarray], ...]


@dataclass(frozen=True)
class LocalTrainResult:
    steps: int
    mean_loss: float
    records_seen: int
    sample_rate: float
    optimizer_state: OptimizerState = ()  # the local optimiser's state after the last step


def _make_optimizer(params: list[torch.nn.Parameter], plan: LocalTrainPlan) -> torch.optim.Optimizer:
    if plan.optimizer == "sgd":
        return torch.optim.SGD(params, lr=plan.lr)
    return torch.optim.Adam(params, lr=plan.lr)


def optimizer_state_of(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> OptimizerState:
    """A copy of the optimiser's per-tensor state (Opacus' DPOptimizer exposes its wrapped optimiser's)."""
    if not any(optimizer.state.get(p) for p in params):
        return ()
    # float32 on disk whatever the adapter's dtype (numpy has no bfloat16); loaded back in the tensor's own.
    return tuple(
        {k: np.array(v.detach().cpu().float()) for k, v in optimizer.state.get(p, {}).items() if torch.is_tensor(v)}
        for p in params
    )


def load_optimizer_state(
    optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], state: Sequence[Mapping[str, np.ndarray]]
) -> None:
    """Resume from ``state`` (from :func:`optimizer_state_of`); the learning rate stays this round's."""
    if len(state) != len(params):
        raise ValueError(f"optimizer state for {len(state)} tensors, the model trains {len(params)}")
    for p, saved in zip(params, state, strict=True):
        for name, value in saved.items():
            if np.ndim(value) and tuple(np.shape(value)) != tuple(p.shape):
                raise ValueError(
                    f"optimizer state {name!r} of shape {np.shape(value)} for a tensor of {tuple(p.shape)}"
                )
    for p, saved in zip(params, state, strict=True):
        # Adam keeps its step count as a float32 scalar tensor, its moments in the parameter's dtype.
        optimizer.state[p] = {
            k: torch.tensor(float(v), dtype=torch.float32) if np.ndim(v) == 0 else torch.tensor(v, dtype=p.dtype)
            for k, v in saved.items()
        }


def poisson_batches(num_records: int, sample_rate: float, steps: int, generator: torch.Generator):
    """Indices of each step's batch: every record joins independently with ``sample_rate``."""
    for _ in range(steps):
        yield torch.nonzero(torch.rand(num_records, generator=generator) < sample_rate).flatten()


def _add_proximal_gradient(params: list[torch.nn.Parameter], anchors: list[torch.Tensor], mu: float) -> None:
    """FedProx: ``p.grad += mu * (p - w_global)``, the gradient of ``mu/2 * ||p - w_global||^2``."""
    with torch.no_grad():
        for p, anchor in zip(params, anchors, strict=True):
            term = (p.detach() - anchor).mul_(mu)
            if p.grad is None:
                p.grad = term
            else:
                p.grad.add_(term)


def train_adapter(
    model: Any,
    data: EncodedSet,
    task: TaskShape,
    plan: LocalTrainPlan,
    on_step: Callable[[int, float], None] | None = None,
    optimizer_state: Sequence[Mapping[str, np.ndarray]] = (),
) -> LocalTrainResult:
    """Train the trainable (adapter) parameters of ``model`` in place for ``plan.steps`` steps,
    from ``optimizer_state`` if given (else a fresh optimiser); the result holds the state after.

    The work happens where the model is (``common.models.placement.place_model`` puts it there): batches
    are built on the CPU and moved to the device of the trainable tensors. A batch larger than
    ``plan.max_physical_batch_size`` is run in micro-batches (``client.micro_batches``): one step still."""
    if len(data) == 0:
        raise ValueError("no training records on this site")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters: was the LoRA adapter attached?")
    q = plan.sample_rate(len(data))
    device = params[0].device
    generator = torch.Generator().manual_seed(plan.seed)
    model.train()
    # FedProx's w_global: the trainable tensors as training starts, i.e. the global adapter just loaded.
    anchors = [p.detach().clone() for p in params] if plan.proximal_mu > 0 else None
    private = plan.noise_multiplier is not None
    dp_optimizer: Any = None
    if private:
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        module = GradSampleModule(model, batch_first=True, loss_reduction="mean")
        dp_optimizer = DPOptimizer(
            _make_optimizer(params, plan),
            noise_multiplier=plan.noise_multiplier,
            max_grad_norm=plan.max_grad_norm,
            expected_batch_size=plan.batch_size,
            loss_reduction="mean",
            secure_mode=plan.secure_noise,
        )
        if hasattr(dp_optimizer, "generator"):
            # Opacus draws the noise with this generator on the gradients' device.
            dp_optimizer.generator = torch.Generator(device=device).manual_seed(plan.seed + 1)
        optimizer: torch.optim.Optimizer = dp_optimizer
    else:
        module, optimizer = model, _make_optimizer(params, plan)
    if optimizer_state:
        load_optimizer_state(optimizer, params, optimizer_state)

    def take_step() -> None:
        if anchors is None:
            optimizer.step()
        elif private:
            # DPOptimizer.step() is pre_step() (clip each record's gradient, add the noise, divide by the
            # expected batch size) followed by the wrapped optimizer's step. Split here so that FedProx's
            # proximal gradient mu * (w - w_global) joins p.grad AFTER the Gaussian mechanism: it depends
            # on no record (only on w, itself already private, and the public w_global), so adding it is
            # post-processing of the privatised gradient and costs no privacy. It must not go through the
            # per-record clipping: it would use up each record's clipping norm and be distorted by it.
            if dp_optimizer.pre_step():  # False only when Opacus was told to skip this step
                _add_proximal_gradient(params, anchors, plan.proximal_mu)
                dp_optimizer.original_optimizer.step()
        else:
            _add_proximal_gradient(params, anchors, plan.proximal_mu)
            optimizer.step()

    weights = torch.tensor(plan.class_weights, dtype=torch.float32, device=device) if plan.class_weights else None
    if weights is not None and not task.classifies:
        raise ValueError("class weights apply to classification only")
    losses, seen = [], 0
    try:
        for step, idx in enumerate(poisson_batches(len(data), q, plan.steps, generator), start=1):
            optimizer.zero_grad(set_to_none=True)
            if len(idx) == 0:
                # An empty Poisson batch is still a step of the mechanism: noise only (DP) or nothing (but FedProx).
                if private:
                    for p in params:
                        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=device)
                    take_step()
                elif anchors is not None:
                    take_step()  # the proximal gradient alone: the records' part of the gradient is zero
                continue
            chunks = micro_batches(idx, plan.max_physical_batch_size)
            loss_sum = torch.zeros((), device=device)
            for i, chunk in enumerate(chunks):
                batch = {k: v.to(device, non_blocking=True) for k, v in data.batch(chunk).items()}
                losses_each = task.head.per_sample_loss(module, batch)
                if weights is not None:
                    # Weighted before clipping: each record's gradient is still clipped to max_grad_norm.
                    losses_each = losses_each * weights[batch["labels"]]
                loss_sum += losses_each.detach().sum()
                if private:
                    # Opacus undoes the mean per micro-batch: each grad_sample row is one record's gradient.
                    losses_each.mean().backward()
                    if i < len(chunks) - 1:
                        # Clip this micro-batch's records into the running sum; no noise, no step yet.
                        dp_optimizer.signal_skip_step(do_skip=True)
                        take_step()
                        optimizer.zero_grad(set_to_none=True)  # grad_sample only: the clipped sum is kept
                else:
                    # Match DP-SGD's normalisation by the expected, not the realised, batch size.
                    (losses_each.sum() / plan.batch_size).backward()
            take_step()
            losses.append(float(loss_sum) / len(idx))
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
        steps=plan.steps,
        mean_loss=sum(losses) / max(len(losses), 1),
        records_seen=seen,
        sample_rate=q,
        optimizer_state=optimizer_state_of(optimizer, params),
    )
