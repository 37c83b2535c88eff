"""One site's runtime: its data (never sent), its adapted model, its privacy ledger.

The Flower glue in ``client.app`` only decodes messages and calls :meth:`Site.train` or
:meth:`Site.evaluate`; everything a site decides (how much noise, whether it may train at
all) is decided here, from its own data size and its own ledger.
"""

from __future__ import annotations

import io
import json
import logging
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedtune.client.dp_training import LocalTrainPlan, OptimizerState, train_adapter
from fedtune.client.ended_runs import EndedRuns, EndedRunsUnreadable
from fedtune.client.membership import Membership
from fedtune.client.optimizer_state import OptimizerStateStore
from fedtune.client.policy import PolicyViolation, SitePolicy
from fedtune.client.revealed_rounds import MaskedRounds, RevealedRounds
from fedtune.common.atomic_files import atomic_write_bytes, atomic_write_json
from fedtune.common.config import FedtuneConfig
from fedtune.common.data.encoding import EncodedSet
from fedtune.common.data.federation_data import SiteSplit, agreed_labels
from fedtune.common.devices import on_device, resolve_device
from fedtune.common.models.loading import BaseModelSpec
from fedtune.common.models.lora import (
    adapter_digest,
    adapter_state,
    build_adapted_model,
    frozen_a_fingerprint,
    load_adapter_state,
)
from fedtune.common.models.lora_ranks import effective_rank, embed_adapter, truncate_adapter
from fedtune.common.models.lora_resize import lora_a_rows, set_lora_rank
from fedtune.common.models.placement import place_model
from fedtune.common.privacy.accounting import calibrate_noise
from fedtune.common.privacy.label_histogram import balanced_class_weights, noisy_label_histogram
from fedtune.common.privacy.ledger import LedgerError, PrivacyBudgetExceeded, PrivacyLedger
from fedtune.common.wire import TrainPlan

log = logging.getLogger("fedtune.site")


class SiteRefusal(RuntimeError):
    """The site declines a request; the reason is sent back to the server verbatim."""


@dataclass(frozen=True)
class TrainOutcome:
    adapter: dict[str, np.ndarray]
    num_examples: int
    steps: int
    epsilon_spent: float
    noise_multiplier: float
    sample_rate: float


@dataclass(frozen=True)
class _AdaptedModel:
    """The process's adapted model, built at the federation's rank, with what resizing it needs."""

    model: Any
    tokenizer: Any
    a_rows: dict  # every LoRA A as built: the rows a layer regains when a site of higher rank is served
    a_fingerprint: str  # of A at the full rank, as the server computes it (FFA-LoRA)


_MODELS: dict[tuple, _AdaptedModel] = {}


def _cached_model(spec: BaseModelSpec, cfg: FedtuneConfig) -> _AdaptedModel:
    """One adapted model per process (a simulation actor serves many sites); weights are reset per request,
    and its LoRA layers are set to the requesting site's rank (cheap: no rebuild; ``lora_resize``)."""
    key = (spec, cfg.lora.model_dump_json())
    if key not in _MODELS:
        _MODELS.clear()
        model, tokenizer = build_adapted_model(spec, cfg.lora)
        # train.device, fp32 adapter over a bf16/fp16 base, checkpointing: before A's rows are kept.
        place_model(model, resolve_device(cfg.train.device), cfg.train.gradient_checkpointing)
        fingerprint = frozen_a_fingerprint(model) if cfg.lora.ffa else ""
        _MODELS[key] = _AdaptedModel(model, tokenizer, lora_a_rows(model), fingerprint)
    cached = _MODELS[key]
    set_lora_rank(cached.model, cfg.lora.rank, cached.a_rows)  # as built, until a request sets a site's rank
    return cached


class Site:
    def __init__(
        self,
        site_id: str,
        cfg: FedtuneConfig,
        spec: BaseModelSpec,
        split: SiteSplit,
        state_dir: Path,
        policy: SitePolicy | None = None,
        lora_rank: int = 0,
        membership: Membership | None = None,
    ):
        self.site_id, self.cfg, self.spec, self.state_dir = site_id, cfg, spec, Path(state_dir)
        self.policy = policy or SitePolicy()
        #: The roster this site pins and its identity on it (None: a federation without a roster).
        self.membership = membership
        self._adapted = _cached_model(spec, cfg)
        self.model, self.tokenizer = self._adapted.model, self._adapted.tokenizer
        #: The LoRA rank this site trains at (``lora_rank``, 0: the global adapter's lora.rank).
        self.lora_rank = effective_rank(lora_rank, cfg.lora.rank)
        if lora_rank > cfg.lora.rank:
            log.warning(
                "%s: LoRA rank %d asked for, but the federation's adapter has lora.rank = %d: training at %d",
                site_id,
                lora_rank,
                cfg.lora.rank,
                self.lora_rank,
            )
        labels, head = agreed_labels(cfg), cfg.task.head
        self.train_set: EncodedSet = head.encode(split.train, self.tokenizer, labels, cfg.model.max_length)
        self.val_set: EncodedSet = head.encode(split.val, self.tokenizer, labels, cfg.model.max_length)
        self.ledger_path = self.state_dir / "privacy_ledger.json"
        self.revealed_rounds = RevealedRounds(self.state_dir / "secagg_revealed.json")
        self.masked_rounds = MaskedRounds(self.state_dir / "secagg_masked.json")
        self.ended_runs = EndedRuns(self.state_dir / "ended_runs.json")
        self.optimizer_states = OptimizerStateStore(self.state_dir / "optimizer_state.npz")

    @property
    def max_update_norm(self) -> float:
        """The bound this site's code enforces on its update's L2 norm (``train.max_update_norm``, 0: none)."""
        return self.cfg.train.max_update_norm

    @property
    def num_examples(self) -> int:
        """The size of this site's training split (its weight in the mean, unless site-level DP is on)."""
        return len(self.train_set)

    @property
    def aggregation_weight(self) -> int:
        """What this site declares as its weight when it sets a secure round up: its example count, or
        1 under site-level DP, where every site counts alike (DP-FedAvg) so one site moves the sum by at
        most the clip norm."""
        return 1 if self.cfg.privacy.site_level.enabled else self.num_examples

    def _set_global(self, adapter: dict[str, np.ndarray], fingerprint: str = "") -> None:
        """Load the global adapter, truncated to this site's first ``lora_rank`` components (HetLoRA)."""
        if self.cfg.lora.ffa and fingerprint and fingerprint != self._adapted.a_fingerprint:
            raise SiteRefusal("FFA-LoRA frozen A matrices differ from the server's: check lora.init_seed and model")
        set_lora_rank(self.model, self.lora_rank, self._adapted.a_rows)
        load_adapter_state(self.model, truncate_adapter(adapter, self.lora_rank), self.cfg.lora.ffa)

    def _replay_path(self) -> Path:
        return self.state_dir / "last_update.npz"

    def _replay(self, request: TrainPlan, input_digest: str) -> TrainOutcome | None:
        """The update already released for this very request, if any.

        A server that crashed and resumes asks again for a round the site already trained.
        Sending the same update again is post-processing of an output already released, so
        it costs no privacy; training again would spend the budget twice.
        """
        path = self._replay_path()
        if not path.exists():
            return None
        with np.load(path, allow_pickle=False) as saved:
            meta = json.loads(str(saved["__meta__"]))
            if meta["run_id"] == request.run_id:
                self._check_trained_once(request, meta["round"], meta["input"] == input_digest)
            if (meta["run_id"], meta["round"], meta["input"]) != (request.run_id, request.round, input_digest):
                return None
            adapter = {k: saved[k] for k in saved.files if k != "__meta__"}
        fields = meta["outcome"]
        if "epsilon" in fields:  # saved by a release before the wire contract named it
            fields["epsilon_spent"] = fields.pop("epsilon")
        log.info(
            "%s round %d: replaying the update already sent for this request (no new privacy cost)",
            self.site_id,
            request.round,
        )
        return TrainOutcome(adapter=adapter, **fields)

    def _check_trained_once(self, request: TrainPlan, last_round: int, same_input: bool) -> None:
        """A site trains each round of a run once, in order: a request for a round it already trained
        from another global adapter, or for an earlier round, is refused. Otherwise a server could
        make it train (and spend its privacy budget) again and again for one round by re-asking it
        with a slightly changed adapter; the ledger would cap the total, but the budget would burn."""
        if request.round < last_round:
            raise SiteRefusal(
                f"round {request.round} asked after round {last_round} of this run was trained: a site trains "
                "each round once, in order"
            )
        if request.round == last_round and not same_input:
            raise SiteRefusal(
                f"round {request.round} was already trained from another global adapter: a site trains each round "
                "once; the same request is answered by replay, a changed one is refused"
            )

    def _remember(self, request: TrainPlan, input_digest: str, outcome: TrainOutcome) -> None:
        fields = {k: v for k, v in outcome.__dict__.items() if k != "adapter"}
        meta = {"run_id": request.run_id, "round": request.round, "input": input_digest, "outcome": fields}
        buffer = io.BytesIO()
        np.savez(buffer, allow_pickle=False, __meta__=np.array(json.dumps(meta)), **outcome.adapter)
        atomic_write_bytes(self._replay_path(), buffer.getvalue())

    def _weighting_planned(self) -> bool:
        return self.cfg.task.classifies and self.cfg.train.class_weighting == "balanced"

    def _with_class_weights(self, plan: LocalTrainPlan, request: TrainPlan, ledger: PrivacyLedger | None):
        weights = self._class_weights(request, ledger)
        return LocalTrainPlan(**{**plan.__dict__, "class_weights": tuple(float(w) for w in weights)})

    def _class_weights(self, request: TrainPlan, ledger: PrivacyLedger | None) -> np.ndarray:
        """Balanced class weights, fixed for the run: from a DP label histogram (charged once) under DP."""
        path = self.state_dir / "class_weights.json"
        if path.exists():
            saved = json.loads(path.read_text())
            if saved["run_id"] == request.run_id:
                return np.asarray(saved["weights"])
        num_classes = len(self.spec.labels)
        if ledger is None:
            counts = np.bincount(np.asarray(self.train_set.labels), minlength=num_classes).astype(float)
            floor = 1.0
        else:
            noise = self.cfg.privacy.histogram_noise
            counts = noisy_label_histogram(
                self.train_set.labels, num_classes, noise, np.random.default_rng(secrets.randbits(128))
            )
            ledger.record(request.run_id, request.round, noise, 1.0, 1, mechanism="label-histogram")
            floor = max(1.0, noise)
        weights = balanced_class_weights(counts, floor=floor)
        atomic_write_json(path, {"run_id": request.run_id, "weights": weights.tolist()})
        return weights

    def train(self, request: TrainPlan, adapter: dict[str, np.ndarray]) -> TrainOutcome:
        try:
            self.policy.check_plan(
                request.run_id, request.dp, request.target_epsilon, request.delta, request.secure_aggregation
            )
            self.policy.check_site_level(request.site_noise.value, request.site_noise_multiplier)
        except PolicyViolation as exc:
            raise SiteRefusal(str(exc)) from exc
        self._check_run_goes_on(request.run_id)
        input_digest = adapter_digest(adapter)
        replayed = self._replay(request, input_digest)
        if replayed is not None:
            return replayed
        start = time.time()
        n = self.num_examples
        self._set_global(adapter, request.a_fingerprint)
        plan = LocalTrainPlan(
            steps=request.local_steps,
            batch_size=min(request.batch_size, n),
            lr=request.lr,
            optimizer=request.optimizer,
            max_grad_norm=request.max_grad_norm,
            proximal_mu=request.proximal_mu,  # w_global: the adapter _set_global has just loaded
            max_physical_batch_size=self.cfg.train.max_physical_batch_size,
            secure_noise=self.policy.secure_noise,
            # Sampling and noise seeds come from the OS CSPRNG and never leave the site: noise
            # derived from anything the server knows could be subtracted again.
            seed=secrets.randbits(63),
        )
        q = plan.sample_rate(n)
        sigma, eps_after, ledger = 0.0, float("inf"), None
        if request.dp:
            if request.delta >= 1.0 / n:
                raise SiteRefusal(
                    f"delta={request.delta} is not below 1/n = 1/{n} for this site's data; lower privacy.delta"
                )
            accountant = self.cfg.privacy.accountant
            try:
                ledger = PrivacyLedger.open(self.ledger_path, request.delta, accountant)
            except LedgerError as exc:
                raise SiteRefusal(str(exc)) from exc
            weighting = self._weighting_planned()
            sigma = calibrate_noise(
                request.target_epsilon,
                request.delta,
                q,
                request.total_rounds * request.local_steps,
                accountant,
                prior=[(self.cfg.privacy.histogram_noise, 1.0, 1)] if weighting else (),
            )
            try:
                self.policy.check_noise(sigma)
            except PolicyViolation as exc:
                raise SiteRefusal(str(exc)) from exc
            if weighting:  # charged to the ledger before the budget check below, which then covers it
                plan = self._with_class_weights(plan, request, ledger)
            try:
                eps_after = ledger.check_budget(sigma, q, plan.steps, request.target_epsilon)
            except PrivacyBudgetExceeded as exc:
                raise SiteRefusal(str(exc)) from exc
            plan = LocalTrainPlan(**{**plan.__dict__, "noise_multiplier": sigma})
        elif self._weighting_planned():
            plan = self._with_class_weights(plan, request, None)
        torch.set_num_threads(self.cfg.train.torch_threads)
        keep_state = self.cfg.train.keep_optimizer_state
        before = self._optimizer_state(request) if keep_state else ()
        result = train_adapter(self.model, self.train_set, self.cfg.task, plan, optimizer_state=before)
        if ledger is not None:
            eps_after = ledger.record(request.run_id, request.round, sigma, q, result.steps).epsilon
        if keep_state:  # after the ledger's charge, before the replay record (see client.optimizer_state)
            self.optimizer_states.save(request.run_id, request.round, request.optimizer, before, result.optimizer_state)
        log.info(
            "%s round %d: %d steps, loss %.4f, noise %.3f, epsilon %.3f (%.1fs)",
            self.site_id,
            request.round,
            result.steps,
            result.mean_loss,
            sigma,
            eps_after,
            time.time() - start,
        )
        outcome = TrainOutcome(
            # The global adapter, this site's components replaced: its update is zero in the others.
            adapter=embed_adapter(adapter_state(self.model, self.cfg.lora.ffa), adapter),
            num_examples=n,
            steps=result.steps,
            epsilon_spent=eps_after,
            noise_multiplier=sigma,
            sample_rate=q,
        )
        self._remember(request, input_digest, outcome)
        return outcome

    def _optimizer_state(self, request: TrainPlan) -> OptimizerState:
        """The local optimiser state this round starts from (train.keep_optimizer_state); empty: fresh."""
        shapes = [tuple(p.shape) for p in self.model.parameters() if p.requires_grad]
        return self.optimizer_states.load(request.run_id, request.round, request.optimizer, shapes, self.site_id)

    def _check_run_goes_on(self, run_id: str) -> None:
        """Refuse to train for a run the server said had ended (``end_run``), replays included."""
        try:
            why = self.ended_runs.why_ended(run_id)
        except EndedRunsUnreadable as exc:
            raise SiteRefusal(str(exc)) from exc
        if why is not None:
            raise SiteRefusal(why)

    def end_run(self, run_id: str, round_: int, reason: str) -> None:
        """The server says run ``run_id`` ended after ``round_``: from now on this site refuses to train for it."""
        if self.ended_runs.record(run_id, round_, reason):
            log.info("%s: run %r ended after round %d (%s)", self.site_id, run_id, round_, reason)

    def evaluate(self, adapter: dict[str, np.ndarray], fingerprint: str = "") -> dict[str, float]:
        self._set_global(adapter, fingerprint)
        torch.set_num_threads(self.cfg.train.torch_threads)
        val_set = on_device(self.val_set, next(self.model.parameters()).device)
        return self.cfg.task.head.evaluate(self.model, val_set, self.cfg.train.eval_batch_size)
