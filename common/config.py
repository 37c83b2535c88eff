"""One typed configuration for a federation, validated once at the edge.

A run is described by a TOML file (see ``common/presets``) plus ``--set key=value``
overrides. Everything downstream receives a :class:`FedtuneConfig`, never raw dicts.
Relative paths are resolved against the directory of the TOML file that names them.
"""

from __future__ import annotations

import ast
import json
import logging
import math
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fedtune.common.models.builtin import BUILTIN_WEIGHTS
from fedtune.common.models.directory import model_dir_problem
from fedtune.common.models.hub import is_hub_id
from fedtune.common.models.tiny import TINY_MODELS
from fedtune.common.schedules import schedule_problem
from fedtune.common.tasks.base import TaskShape
from fedtune.common.tasks.registry import TASK_NAMES, task_for

log = logging.getLogger("fedtune.config")
PRESETS_DIR = Path(__file__).parent / "presets"
DEFAULT_PRESET = "banking77-minilm"


#: Every name model.name accepts: the fetched built-in models, then the tiny ones built locally for tests.
MODEL_NAMES: tuple[str, ...] = (*sorted(BUILTIN_WEIGHTS), *TINY_MODELS)
#: What a delimiter may be spelled as where a literal tab is awkward to type (``--set "data.delimiter='\t'"``).
DELIMITER_NAMES = {"\\t": "\t", "tab": "\t", "comma": ",", "semicolon": ";", "pipe": "|", "space": " "}

#: The server's held-out metrics (``common.evaluation``) early stopping may watch, for classification (True) or not.
HELD_OUT_METRICS: dict[bool, tuple[str, ...]] = {True: ("loss", "accuracy", "macro-f1"), False: ("loss", "perplexity")}

#: The deprecated ``model.task`` values, and the data.task each implied when data.task was not given.
LEGACY_MODEL_TASKS = {"classification": "classification", "causal-lm": "question-answer"}


class ConfigError(ValueError):
    """A configuration that cannot be run; the message names the file and field."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RunConfig(_Section):
    """What the run is called and where it is kept."""

    name: str = Field(
        "fedtune",
        description="Name of the run: prefix of its directory; in a deployment, the run id "
        "sites key their ledgers by (a site's policy.toml lists the run ids it accepts).",
    )
    description: str = Field("", description="One line saying what this config is for (shown by `fedtune presets`).")
    data_description: str = Field(
        "",
        description="What the sites' data is, in the operator's words (source, period, population, consent); "
        "written into the model card of every exported model and adapter.",
    )
    output_dir: Path = Field(Path("runs"), description="Folder that receives one directory per run.")
    seed: int = Field(
        0,
        description="Seed of everything public and reproducible: partitioning, splits, the held-out "
        "sample, tiny models. Never the DP noise or sampling, which come from the OS CSPRNG.",
    )


class ModelConfig(_Section):
    """Which base model to adapt: a built-in name, a Hugging Face model id or a local Hugging Face directory."""

    name: str = Field(
        "minilm-l6",
        description="Built-in model (minilm-l6, smollm2-135m; tiny-llama, tiny-bert for "
        "tests), or a Hugging Face model id such as Qwen/Qwen2.5-0.5B-Instruct, read from the huggingface_hub "
        "cache (HF_HUB_CACHE or HF_HOME) and downloaded once unless HF_HUB_OFFLINE is set. Ignored when "
        "model.path is set.",
    )
    revision: str | None = Field(
        None,
        description="Branch, tag or commit of a Hugging Face model id in model.name (unset: main); pin a commit "
        "so every site trains the very same weights.",
    )
    path: Path | None = Field(
        None, description="Local Hugging Face model directory (config.json, weights, tokenizer); overrides model.name."
    )
    max_length: int = Field(
        64,
        gt=0,
        description="Tokens per record after truncation (prompt and response together for the generative tasks).",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32",
        description="Precision of the frozen base weights. bfloat16 (or float16 on GPUs without bf16) halves "
        "the base's memory; the LoRA tensors, their per-record gradients, clipping and DP noise stay float32 "
        "(common/models/precision.py).",
    )
    quantization: Literal["none", "8bit", "4bit"] = Field(
        "none",
        description="QLoRA: load the frozen base in 8-bit or 4-bit (NF4) through bitsandbytes (the optional "
        "`qlora` extra; CUDA only); the adapter, DP and aggregation are unchanged. 4bit computes in model.dtype.",
    )
    pooling: Literal["auto", "mean", "model"] = Field(
        "auto",
        description="Classification: `mean` pools token states over the mask (how sentence encoders such "
        "as MiniLM were trained); `model` keeps the architecture's own head; `auto` picks `mean` for BERT-style "
        "encoders (see common/models/pooling.py).",
    )
    head_init: Literal["random", "label_names"] = Field(
        "random",
        description="Classification: how the head over the agreed labels starts. `random`: the architecture's "
        "own initialisation. `label_names`: each label's row is the model's pooled features of the label's name "
        "(underscores as spaces) scaled to model.head_init_scale, so round 0 already classifies zero-shot; only "
        "the agreed label list goes in, so it reads no record and spends no epsilon. Helps under strong DP "
        "(Banking77 at epsilon 1, docs/benchmarks.md); without DP or at epsilon 8 a random head did as well or "
        "better (common/models/label_prior.py).",
    )
    head_init_scale: float = Field(
        3.0,
        gt=0,
        description="L2 norm of each label's row under model.head_init = 'label_names': larger trusts the names "
        "longer against the training steps.",
    )

    @field_validator("path")
    @classmethod
    def _a_model_directory(cls, value: Path | None) -> Path | None:
        """A missing directory, a non-model or a missing tokenizer is said now, before any data is read."""
        problem = model_dir_problem(value) if value is not None else None
        if problem:
            raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _known_name(self) -> ModelConfig:
        if self.path is None and self.name not in MODEL_NAMES and not is_hub_id(self.name):
            raise ValueError(
                f"model.name = {self.name!r} is not a built-in model (known: {', '.join(MODEL_NAMES)}); "
                "give a local Hugging Face model directory with model.path instead"
            )
        if self.revision is not None and (self.path is not None or not is_hub_id(self.name)):
            raise ValueError(
                f"model.revision = {self.revision!r} applies to a Hugging Face model id in model.name only; unset it"
            )
        return self


class LoraSettings(_Section):
    """The LoRA adapter (Hu et al., 2021): the only weights that are trained and travel."""

    rank: int = Field(8, gt=0, description="LoRA rank r of each adapted matrix.")
    alpha: float = Field(16.0, gt=0, description="LoRA scaling alpha (the update is scaled by alpha / rank).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] = Field(
        default_factory=list,
        description="Names of the linear modules to adapt (empty: the architecture's attention projections).",
    )
    ffa: bool = Field(
        False,
        description="FFA-LoRA (Sun et al., ICLR 2024): A frozen from a shared seed, only B "
        "trained and sent; exact averaging, half the traffic, fewer noisy coordinates under DP.",
    )
    init_seed: int = Field(
        0,
        description="Seed of the adapter's initial weights; identical on every site and the "
        "server (FFA-LoRA's shared A).",
    )
    site_ranks: list[int] = Field(
        default_factory=list,
        description="Each site's own LoRA rank, 1..lora.rank, by partition id (empty: every site at lora.rank). "
        "A site trains the global adapter's first components and sends zeros for the rest (HetLoRA); "
        "without FFA the server then re-factorises the adapter by SVD each round (README: sites of "
        "different ranks). In deployment a site's policy lora_rank wins over its entry here.",
    )

    @property
    def svd_refactorisation(self) -> bool:
        """Some site trains fewer components than the global adapter holds, and A is trained: the server
        re-orders each layer's components by singular value after every round (``common.models.lora_ranks``)."""
        return not self.ffa and any(r < self.rank for r in self.site_ranks)

    def site_rank(self, partition_id: int) -> int:
        """The rank ``lora.site_ranks`` gives the site of this partition id (``lora.rank`` where it names none)."""
        return self.site_ranks[partition_id] if 0 <= partition_id < len(self.site_ranks) else self.rank


class FieldMap(_Section):
    """Which column (CSV/Parquet) or key (JSON) holds each part of a record.

    Only the parts of the configured ``data.task`` are read; every name defaults to the part's
    own name. ``system`` optionally names a column with a per-record system prompt.
    """

    text: str = Field("text", description="classification: the text to classify.")
    label: str = Field("label", description="classification: the label (a name or an index into the agreed labels).")
    prompt: str = Field("prompt", description="prompt-completion: the raw prompt.")
    completion: str = Field("completion", description="prompt-completion: the continuation to learn.")
    question: str = Field("question", description="question-answer: the question.")
    answer: str = Field("answer", description="question-answer: the answer to learn.")
    instruction: str = Field("instruction", description="instruction: the instruction.")
    input: str = Field("input", description="instruction: optional extra input, appended to the instruction.")
    output: str = Field("output", description="instruction: the response to learn.")
    messages: str = Field(
        "messages", description="chat: a list of {role, content} messages; the last assistant turn is learned."
    )
    system: str = Field("", description="Optional column with a per-record system prompt (empty: none).")

    @field_validator("*", mode="before")
    @classmethod
    def _column_number(cls, value: Any) -> Any:
        """A header-less file's columns are named 1, 2, ...: ``--set data.fields.text=1`` gives an integer."""
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


class DataConfig(_Section):
    """Where the records are, how to read them and which fields hold what."""

    path: Path | None = Field(None, description="Simulation: the records shared among the simulated sites.")
    site_paths: list[Path] = Field(
        default_factory=list,
        description="partition.scheme = 'files': one file or folder per site, read on that site only.",
    )
    test_path: Path | None = Field(
        None, description="The server's own held-out set (else a share of data.path is held out)."
    )
    labels_file: Path | None = Field(None, description="JSON list of the agreed label names (classification).")
    labels: list[str] = Field(
        default_factory=list, description="The agreed label names, inline (instead of data.labels_file)."
    )
    task: str = Field(
        "classification",
        description="The task, named by the records' shape: "
        f"{', '.join(TASK_NAMES)}. `classification` trains a head over the agreed labels; the others "
        "tune generation (see common/tasks).",
    )
    fields: FieldMap = Field(FieldMap(), description="Which column or key holds each part of a record.")
    format: Literal["auto", "jsonl", "json", "csv", "tsv", "parquet"] = Field(
        "auto",
        description="File format; `auto` goes by the extension (.jsonl, .json, .csv, .tsv, .txt, .parquet); "
        "`tsv` is delimited text with a tab unless data.delimiter says otherwise.",
    )
    header: Literal["auto", "yes", "no"] = Field(
        "auto",
        description="CSV: whether the first row names the columns; `auto` weighs the evidence (mapped field "
        "names, agreed labels, types, repeated values) and says which way it decided.",
    )
    delimiter: str = Field(
        "",
        max_length=1,
        description="CSV: the field separator (empty: detected); `\\t` or `tab` for a tab.",
    )
    quoting: Literal["auto", "none", "csv"] = Field(
        "auto",
        description='CSV: `csv` reads "quoted" fields (RFC 4180, line breaks allowed inside); `none` takes quotes '
        "as text, one record a line; `auto` is `csv` unless a quote would swallow whole lines as one field, "
        "then `none`, with a warning naming the lines.",
    )
    column_names: list[str] = Field(
        default_factory=list,
        description="CSV without a header: names of the columns, in order (one per column). Setting it means "
        'the file has no header unless data.header = "yes" (then its first row is skipped).',
    )
    max_record_bytes: int = Field(1_000_000, gt=0, description="Records larger than this are malformed.")
    on_malformed: Literal["fail", "skip"] = Field(
        "fail",
        description="`fail`: a malformed record stops the site with its line named; `skip`: it is dropped and counted.",
    )
    max_records: int = Field(0, ge=0, description="Read at most this many records (0: all).")
    holdout_fraction: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="Simulation without data.test_path: share of data.path held out for the server's evaluation.",
    )
    val_fraction: float = Field(
        0.1, ge=0, lt=1, description="Share of each site's records kept for its own validation."
    )
    max_eval_examples: int = Field(
        256, gt=0, description="Cap on the server's held-out set and each site's validation split."
    )

    @field_validator("task")
    @classmethod
    def _known_task(cls, value: str) -> str:
        return task_for(value).name

    @field_validator("delimiter", mode="before")
    @classmethod
    def _named_delimiter(cls, value: Any) -> Any:
        """``'\\t'`` in TOML (a literal string) is a backslash and a t; the tab was meant."""
        return DELIMITER_NAMES.get(value, value) if isinstance(value, str) else value

    @field_validator("delimiter")
    @classmethod
    def _usable_delimiter(cls, value: str) -> str:
        if value and value in '"\r\n':
            raise ValueError(f"{value!r} cannot separate fields; use e.g. ',', ';', '|' or '\\t' (tab)")
        return value

    @field_validator("path", "test_path", "labels_file")
    @classmethod
    def _must_exist(cls, value: Path | None) -> Path | None:
        if value is not None and not value.exists():
            raise ValueError(f"file not found: {value}")
        return value

    @field_validator("site_paths")
    @classmethod
    def _all_exist(cls, value: list[Path]) -> list[Path]:
        missing = [str(p) for p in value if not p.exists()]
        if missing:
            raise ValueError(f"not found: {', '.join(missing)}")
        return value


class PartitionConfig(_Section):
    """How a simulation shares ``data.path`` among sites; ``files`` gives each site its own ``data.site_paths``."""

    scheme: Literal["iid", "dirichlet", "column", "files"] = Field(
        "iid",
        description="`iid`: uniform shares; `dirichlet`: label skew of strength partition.alpha; `column`: "
        "one site per value of partition.column; `files`: each site its own data.site_paths entry.",
    )
    num_clients: int = Field(3, gt=0, description="Number of sites.")
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration: smaller is more skewed.")
    column: str = Field("source", description="scheme = 'column': the field whose values name the sites.")
    min_examples: int = Field(20, gt=0, description="Fewest training records a simulated site may get.")


class ServerOptimizerConfig(_Section):
    """Hyperparameters of the server optimiser that ``federation.strategy`` names; each strategy reads its own.

    The server optimises over the sites' example-weighted mean delta, taken as a pseudo-gradient
    (Reddi et al., "Adaptive Federated Optimization", ICLR 2021), so every setting here works
    unchanged under secure aggregation, where the server sees only the sum.
    """

    lr: float = Field(
        0.0,
        ge=0,
        description="Server learning rate (eta). 0: the strategy's default, as in Flower: fedavgm 1.0, fedadam "
        "0.1, fedadagrad 0.1, fedyogi 0.01. fedavg ignores it (eta = 1).",
    )
    momentum: float = Field(
        0.9,
        ge=0,
        lt=1,
        description="fedavgm: server momentum beta (Hsu et al. 2019); the steady-state step is about "
        "lr / (1 - momentum) times the mean delta.",
    )
    beta1: float = Field(
        0.9, ge=0, lt=1, description="fedadam, fedyogi: decay of the mean delta's first moment (fedadagrad keeps none)."
    )
    beta2: float = Field(0.99, ge=0, lt=1, description="fedadam, fedyogi: decay of the mean delta's second moment.")
    tau: float = Field(
        1e-3,
        gt=0,
        description="fedadam, fedyogi, fedadagrad: adaptivity tau, added to the square root of the second moment "
        "(which starts at tau^2); smaller is more adaptive.",
    )


class EarlyStoppingConfig(_Section):
    """Stop the federation when the server's held-out metric stops improving (``server.early_stopping``).

    After each round the server compares its held-out ``metric`` with the best value so far; a round
    improves on it only by more than ``min_delta``. After ``patience`` rounds in a row without such an
    improvement the server stops, tells the sites the run ended (they then refuse to train for it, so
    no more privacy budget is spent) and merges the best round (``federation.keep``).
    """

    enabled: bool = Field(False, description="Stop the run early when the held-out metric stops improving.")
    metric: str = Field(
        "",
        description="The server's held-out metric watched: loss, accuracy or macro-f1 (classification); loss or "
        "perplexity (generative tasks). Empty: the task's headline metric (accuracy; loss).",
    )
    mode: Literal["auto", "min", "max"] = Field(
        "auto",
        description="Whether lower (min) or higher (max) is better; auto: min for loss and perplexity, max otherwise.",
    )
    patience: int = Field(
        3, gt=0, description="Rounds in a row without an improvement of more than min_delta before the run stops."
    )
    min_delta: float = Field(
        0.0,
        ge=0,
        description="Smallest change of the metric that counts as an improvement (in the metric's units: 0.01 is "
        "one accuracy point). Under DP the held-out metric is noisy from round to round: leave room for that.",
    )


class FederationConfig(_Section):
    """Rounds, how the server waits for sites, and how it optimises."""

    rounds: int = Field(3, gt=0, description="Training rounds.")
    min_clients: int = Field(1, gt=0, description="Fewest contributing sites for a round to be aggregated.")
    sites_per_round: int = Field(
        0,
        ge=0,
        description="Sites sampled to train in each round, uniformly from those connected (0: use "
        "fraction_per_round). A site not sampled neither trains nor spends privacy budget that round.",
    )
    fraction_per_round: float = Field(
        1.0,
        gt=0,
        le=1,
        description="Fraction of the connected sites sampled to train in each round (rounded up, at least "
        "min_clients); used when sites_per_round = 0.",
    )
    poisson_sampling: bool = Field(
        False,
        description="Sample each connected site independently with probability fraction_per_round (Poisson "
        "sampling), the draw site-level DP's accountant analyses; false: a fixed-size sample.",
    )
    min_sites_to_start: int = Field(
        0,
        ge=0,
        description="Sites that must be connected before round 1 starts (0: every site, partition.num_clients). "
        "A site that connects later receives the global adapter and takes part from the next round.",
    )
    strategy: str = Field(
        "fedavg",
        description="How the server turns the sites' mean update into the next global adapter: fedavg, "
        "fedavgm, fedadam, fedyogi, fedadagrad (see server/strategies/). FedProx is fedavg with train.proximal_mu > 0.",
    )
    cpus_per_client: float = Field(1.0, gt=0, description="Simulation: CPUs Ray reserves for each site's actor.")
    gpus_per_client: float = Field(
        0.0,
        ge=0,
        description="Simulation: GPUs Ray reserves for each site's actor; fractions share a GPU (0.5: two sites a "
        "GPU). 0 with train.device = auto/cuda: every actor sees all GPUs (set it to keep sites from crowding one).",
    )
    round_timeout_s: float = Field(
        3600.0,
        gt=0,
        description="Each round's deadline in seconds: a site that has not replied by then is a dropout "
        "for that round (under secure aggregation, handled as one) and is asked again in later rounds.",
    )
    server_optimizer: ServerOptimizerConfig = Field(
        ServerOptimizerConfig(), description="Hyperparameters of the server optimiser (federation.strategy)."
    )
    aggregation_rule: Literal["mean", "trimmed_mean", "krum"] = Field(
        "mean",
        description="How the sites' updates become the delta federation.strategy applies: `mean` (example-weighted); "
        "with secure_aggregation.enabled = false also the byzantine-robust `trimmed_mean` (coordinate-wise, Yin et "
        "al. 2018) or `krum` (Blanchard et al. 2017), which ignore example counts (see server/robust_aggregation.py).",
    )
    trim_fraction: float = Field(
        0.2,
        ge=0,
        lt=0.5,
        description="trimmed_mean: share of the values of each coordinate dropped at each end (int(fraction * "
        "updates) a side; a round where that is 0 is skipped). At least the share of sites that may be byzantine.",
    )
    krum_byzantine: int = Field(
        1,
        ge=0,
        description="krum: f, the number of sites assumed byzantine; a round needs more than 2f + 2 updates "
        "(fewer: it is skipped, the global adapter kept).",
    )
    krum_select: int = Field(
        1,
        gt=0,
        description="krum: m, how many best-scored updates are averaged (1: Krum; more: multi-Krum), at most "
        "the round's updates minus federation.krum_byzantine.",
    )
    early_stopping: EarlyStoppingConfig = Field(
        EarlyStoppingConfig(),
        description="Stop when the held-out metric has not improved by min_delta for patience rounds.",
    )
    keep: Literal["best", "last"] = Field(
        "best",
        description="Which round's checkpoint the merged model is built from: `best` (by the early-stopping "
        "metric, or the task's headline metric when early stopping is off; recorded in RUN_DIR/best.json) or "
        "`last` (the newest round).",
    )


class TrainConfig(_Section):
    """Each site's local training in a round."""

    local_steps: int = Field(10, gt=0, description="Optimiser steps per site per round.")
    batch_size: int = Field(32, gt=0, description="Expected records per step (Poisson sampling under DP).")
    lr: float = Field(5e-3, gt=0, description="Learning rate of the local optimiser.")
    optimizer: Literal["adam", "sgd"] = Field(
        "adam", description="Local optimiser (fresh each round unless train.keep_optimizer_state)."
    )
    lr_schedule: Literal["constant", "linear_warmup", "cosine"] = Field(
        "constant",
        description="How train.lr changes from round to round (common/schedules.py; the server sends each round's "
        "rate): `constant`; `linear_warmup`: lr * r / warmup_rounds for the first warmup_rounds rounds, then lr; "
        "`cosine`: the same warm-up, then half a cosine from lr towards min_lr (reached one round after the last, so "
        "no round trains at 0).",
    )
    warmup_rounds: int = Field(
        0, ge=0, description="Rounds of linear warm-up (linear_warmup and cosine schedules); round 1 trains at lr / W."
    )
    min_lr: float = Field(
        0.0, ge=0, description="The cosine schedule's floor, approached in the last rounds (at most train.lr)."
    )
    keep_optimizer_state: bool = Field(
        False,
        description="Each site keeps its local Adam moments from one round to the next (on its own disk, by run "
        "id) instead of starting a fresh optimiser each round. Under DP the moments are computed from the clipped, "
        "noised gradients only: post-processing, no privacy cost.",
    )
    eval_batch_size: int = Field(32, gt=0, description="Records per evaluation batch.")
    torch_threads: int = Field(1, gt=0, description="CPU threads torch uses on a site.")
    device: str = Field(
        "auto",
        pattern=r"^(auto|cpu|cuda(:[0-9]+)?|mps)$",
        description="Where a site trains and evaluates, and the server evaluates and merges: auto (CUDA when "
        "torch sees a GPU, else cpu), cpu, cuda, cuda:N or mps. In a deployment CUDA_VISIBLE_DEVICES picks the GPUs.",
    )
    max_physical_batch_size: int = Field(
        0,
        ge=0,
        description="Most records in one forward/backward pass (0: no limit). A larger (Poisson) batch is run in "
        "micro-batches whose clipped per-record gradients are summed, then noised once and stepped once: the "
        "same DP step, less memory (client/micro_batches.py).",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute the base model's activations in the backward pass instead of keeping them: less "
        "memory for about a third more compute; compatible with per-record clipping of the LoRA tensors.",
    )
    class_weighting: Literal["none", "balanced"] = Field(
        "none",
        description="Classification: `balanced` re-weights the loss by inverse class frequency (from a DP "
        "label histogram under DP); never oversampling.",
    )
    proximal_mu: float = Field(
        0.0,
        ge=0,
        description="FedProx (Li et al., MLSys 2020): weight mu of the proximal term mu/2 * ||w - w_global||^2 in "
        "each site's local objective (0: off). Under DP-SGD its gradient is added after clipping and noise (no "
        "privacy cost). With train.optimizer = 'sgd' keep lr * mu below 1.",
    )
    max_update_norm: float = Field(
        0.0,
        ge=0,
        description="Bound on the L2 norm of a site's update (trained adapter minus the global one), checked "
        "by the site before it sends (it refuses the round otherwise) and by the server on the mean it applies "
        "(the round is discarded otherwise) and, without secure aggregation, on each site's update (0: no norm "
        "bound; non-finite values and wrong shapes are always refused). Under DP-SGD the noise makes "
        "lr * local_steps * max_grad_norm no hard bound, so it is a setting: leave generous headroom. Must be 0 "
        "with privacy.site_level (its clip_norm bounds each update; the noised mean would fail any useful bound); "
        "a site whose own config sets it checks its clipped update against it.",
    )


class SiteLevelPrivacyConfig(_Section):
    """Site-level (client-level) DP: a whole site's participation, not one record, is what is protected.

    DP-FedAvg (McMahan et al., "Learning Differentially Private Recurrent Language Models", ICLR 2018):
    each site clips its round's update to an L2 norm of ``clip_norm`` and counts 1 in the mean, and
    Gaussian noise of std at least ``noise_multiplier * clip_norm`` is added to the sum. With
    ``noise = "distributed"`` each site adds its own share before masking (Kairouz et al., "The
    Distributed Discrete Gaussian Mechanism for Federated Learning with Secure Aggregation", ICML 2021,
    here with continuous Gaussian shares before quantisation), so the operator never sees the sum
    without it; ``"server"`` is the fallback in which the server adds it (the operator is trusted).
    """

    enabled: bool = Field(
        False,
        description="Site-level DP (DP-FedAvg): each site clips its update and counts 1 in the mean; Gaussian "
        "noise on the sum protects a site's whole participation. On top of (not instead of) record-level DP-SGD.",
    )
    clip_norm: float = Field(
        1.0,
        gt=0,
        description="S: bound on the L2 norm of a site's update (trained adapter minus the global one) in a "
        "round; a larger update is scaled down to it, never up. Each site logs its update's norm before clipping.",
    )
    noise_multiplier: float = Field(
        1.0,
        ge=0,
        description="z: the noise in every revealed sum of clipped updates has std at least z * S per "
        "coordinate; the site-level epsilon follows from it, the rounds and the site sampling rate.",
    )
    delta: float = Field(
        1e-3,
        gt=0,
        lt=1,
        description="Site-level delta. It must be below 1 / partition.num_clients (else a mechanism that "
        "publishes one whole site's update would qualify); 1e-3 keeps it well below that for up to a few "
        "hundred sites.",
    )
    noise: Literal["distributed", "server"] = Field(
        "distributed",
        description="`distributed`: each site adds a Gaussian share of std z * S / sqrt(m) before masking "
        "(m: the site's own policy min_aggregation_sites, at least 2, checked against the finished sites it "
        "can vouch for before it unmasks), so no one, the operator included, sees the sum "
        "without noise; needs secure_aggregation.enabled. `server`: the server adds N(0, (z * S)^2) to the "
        "sum: protects against whoever sees the model, not against the operator.",
    )


class PrivacyConfig(_Section):
    """Target (epsilon, delta) for each site over the whole federation."""

    enabled: bool = Field(True, description="DP-SGD on every site (record-level differential privacy).")
    epsilon: float = Field(8.0, gt=0, description="Each site's target epsilon over the whole run.")
    delta: float = Field(1e-5, gt=0, lt=1, description="Each site's delta; must be below 1/n of its training records.")
    max_grad_norm: float = Field(1.0, gt=0, description="Per-record gradient clipping norm.")
    accountant: Literal["rdp", "prv"] = Field("rdp", description="Opacus accountant behind calibration and the ledger.")
    share_site_metrics: bool = Field(
        False,
        description="Sites send their validation loss/accuracy (aggregate "
        "scalars, not DP-protected) only when this and their policy allow it.",
    )
    histogram_noise: float = Field(
        10.0,
        gt=0,
        description="Noise multiplier of the label histogram behind train.class_weighting = 'balanced' under DP.",
    )
    site_level: SiteLevelPrivacyConfig = Field(
        SiteLevelPrivacyConfig(),
        description="Site-level DP: protects a whole site's participation (see the README, Two guarantees).",
    )


class SecureAggregationConfig(_Section):
    """SecAgg+ for training rounds: the server learns only the sum of the sites' updates.

    Each coordinate of a site's update is clipped to ``clip_range`` before quantisation
    (0: derived from the optimiser, see ``auto_clip_range``); clipped values are counted
    and reported. The sum is revealed only over at least ``max(2, federation.min_clients)``
    sites; ``threshold_fraction`` of each site's neighbourhood must stay to rebuild masks.
    """

    enabled: bool = Field(
        True, description="Mask every update (SecAgg+, Bell et al. 2020): the server learns only the sum."
    )
    neighbours: int = Field(
        0, ge=0, description="Size of each site's masking neighbourhood (0: derived from the number of sites)."
    )
    threshold_fraction: float = Field(
        0.5,
        ge=0.5,
        lt=1,
        description="Share of a neighbourhood that must stay to rebuild a dropped site's masks. Against an "
        "operator that deviates, c sites colluding with it among a site's k neighbours are withstood only while "
        "2t > k + 1 + c (t this share of k + 1): none at 0.5, fewer than a third of a neighbourhood at 0.67, "
        "which in turn fails a round when more than a third of a neighbourhood drops.",
    )
    clip_range: float = Field(
        0.0,
        ge=0,
        description="Each update coordinate is clipped to +-clip_range before "
        "quantisation (0: derived from the optimiser).",
    )
    stage_timeout_s: float = Field(
        300.0, gt=0, description="Seconds the server waits for each secure-aggregation exchange."
    )
    record_masked_inputs: bool = Field(
        False,
        description="Keep every masked vector the server received in the run "
        "directory, for an auditor (d+1 uint64 a site a round).",
    )


class SimulationConfig(_Section):
    """What-if settings of a simulated federation: sites that connect late or answer slowly.

    Ignored by deployments, where sites come and go on their own.
    """

    late_joiners: int = Field(
        0,
        ge=0,
        description="Simulation: this many sites are not connected until round join_round starts (which ones "
        "is up to the simulation engine's node ids; the run's records name them once they train).",
    )
    join_round: int = Field(2, ge=1, description="Simulation: the round at whose start the late joiners connect.")
    slow_sites: int = Field(
        0,
        ge=0,
        description="Simulation: this many sites (the lowest node ids) deliver every training reply "
        "slow_site_delay_s late, as sites on slow hardware; past federation.round_timeout_s they are dropouts.",
    )
    slow_site_delay_s: float = Field(
        30.0, ge=0, description="Simulation: seconds a slow site's training reply is late."
    )


class TrackingConfig(_Section):
    """Where a run's curves go besides metrics.jsonl and curves.png (server/tracking.py).

    Every round's record is written as scalars: the server's held-out metrics, the validation
    metrics sites share, each site's epsilon, noise multiplier, steps and bytes, the round's time.
    """

    tensorboard: bool = Field(
        True,
        description="Write TensorBoard event files to RUN_DIR/tensorboard (view them with `tensorboard --logdir "
        "RUN_DIR/tensorboard`, or point --logdir at runs/ to compare runs).",
    )
    mlflow_uri: str = Field(
        "",
        description="MLflow tracking URI (empty: MLflow off). `local`: a file store in RUN_DIR/mlruns (`mlflow ui "
        "--backend-store-uri RUN_DIR/mlruns`); else any URI MLflow takes (file:/path, http://host:5000). Logs "
        "the config as params, each round's scalars as metrics, summary.txt, curves.png and metrics.jsonl as "
        "artifacts. Needs `pip install 'fedtune[mlflow]'`.",
    )
    mlflow_experiment: str = Field(
        "", description="MLflow experiment the run is logged under (empty: run.name); created if missing."
    )


class FedtuneConfig(_Section):
    """A whole federation: one section a concern, as in the TOML file."""

    run: RunConfig = Field(RunConfig(), description="What the run is called and where it is kept.")
    model: ModelConfig = Field(ModelConfig(), description="The base model.")
    lora: LoraSettings = Field(LoraSettings(), description="The LoRA adapter.")
    data: DataConfig = Field(description="The records and how to read them.")
    partition: PartitionConfig = Field(PartitionConfig(), description="How sites get their data.")
    federation: FederationConfig = Field(FederationConfig(), description="Rounds and aggregation.")
    train: TrainConfig = Field(TrainConfig(), description="Local training.")
    privacy: PrivacyConfig = Field(PrivacyConfig(), description="Record-level differential privacy.")
    secure_aggregation: SecureAggregationConfig = Field(SecureAggregationConfig(), description="SecAgg+.")
    simulation: SimulationConfig = Field(
        SimulationConfig(), description="Simulation only: sites that connect late or answer slowly."
    )
    tracking: TrackingConfig = Field(
        TrackingConfig(), description="Experiment tracking: TensorBoard event files, MLflow optionally."
    )

    @property
    def task(self) -> TaskShape:
        """The registry's entry for data.task: the record shape and what the model learns from it."""
        return task_for(self.data.task)

    @model_validator(mode="before")
    @classmethod
    def _legacy_model_task(cls, raw: Any) -> Any:
        """``model.task`` (classification | causal-lm) is deprecated: read so older files load, never kept.

        It must agree with data.task; without data.task it picks the shape it used to imply.
        """
        if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict) or "task" not in raw["model"]:
            return raw
        model = dict(raw["model"])
        legacy = model.pop("task")
        if not isinstance(legacy, str) or legacy not in LEGACY_MODEL_TASKS:
            raise ValueError(
                f"model.task = {legacy!r} is not 'classification' or 'causal-lm'; model.task is "
                f"deprecated: remove it and name the task in data.task ({', '.join(TASK_NAMES)})"
            )
        out = {**raw, "model": model}
        data = raw.get("data")
        if isinstance(data, dict) and data.get("task") is None:
            out["data"] = {**data, "task": LEGACY_MODEL_TASKS[legacy]}
        elif isinstance(data, dict) and data["task"] in TASK_NAMES:
            if task_for(data["task"]).classifies != task_for(LEGACY_MODEL_TASKS[legacy]).classifies:
                raise ValueError(
                    f"data.task = {data['task']!r} does not fit model.task = {legacy!r}: classification data "
                    "needs model.task = 'classification'; chat, prompt-completion, question-answer and instruction "
                    "data need 'causal-lm'. model.task is deprecated: remove it, data.task alone names the task"
                )
        log.warning("model.task is deprecated: data.task alone names the task; remove model.task from the config")
        return out

    @model_validator(mode="after")
    def _cross_checks(self) -> FedtuneConfig:
        if self.federation.min_clients > self.partition.num_clients:
            raise ValueError(
                f"federation.min_clients ({self.federation.min_clients}) exceeds "
                f"partition.num_clients ({self.partition.num_clients})"
            )
        fed = self.federation
        if fed.sites_per_round and fed.fraction_per_round < 1:
            raise ValueError(
                f"federation.sites_per_round = {fed.sites_per_round} and federation.fraction_per_round = "
                f"{fed.fraction_per_round} both sample sites: set one of them"
            )
        for name in ("sites_per_round", "min_sites_to_start"):
            if getattr(fed, name) > self.partition.num_clients:
                raise ValueError(
                    f"federation.{name} ({getattr(fed, name)}) exceeds partition.num_clients "
                    f"({self.partition.num_clients})"
                )
        if fed.poisson_sampling and (fed.sites_per_round or fed.fraction_per_round == 1):
            raise ValueError(
                "federation.poisson_sampling asks each site with probability federation.fraction_per_round: "
                "set fraction_per_round below 1 (and sites_per_round = 0)"
            )
        floor = max(2, fed.min_clients) if self.secure_aggregation.enabled else fed.min_clients
        expected = fed.sites_per_round or fed.fraction_per_round * self.partition.num_clients
        if (fed.sites_per_round or fed.fraction_per_round < 1) and expected < floor:
            why = "secure aggregation needs 2 sites and " if self.secure_aggregation.enabled else ""
            raise ValueError(
                f"federation sampling asks {expected:g} sites a round, fewer than the {floor} every round needs "
                f"({why}federation.min_clients = {fed.min_clients}): raise sites_per_round or fraction_per_round"
            )
        if self.privacy.site_level.enabled and (
            fed.sites_per_round or (fed.fraction_per_round < 1 and not fed.poisson_sampling)
        ):
            raise ValueError(
                "privacy.site_level with a fixed-size sample of sites: site-level DP's accountant analyses "
                "Poisson sampling, where each site is asked independently (with a fixed-size sample one "
                "hospital joining displaces another); set federation.poisson_sampling = true with "
                "fraction_per_round, or sample no sites (sites_per_round = 0, fraction_per_round = 1)"
            )
        late = self.simulation.late_joiners
        if late >= self.partition.num_clients:
            raise ValueError(
                f"simulation.late_joiners ({late}) must leave at least one of the "
                f"{self.partition.num_clients} sites connected from the start"
            )
        if late and (fed.min_sites_to_start or self.partition.num_clients) > self.partition.num_clients - late:
            raise ValueError(
                f"simulation.late_joiners = {late} sites connect only at round {self.simulation.join_round}, so "
                f"at most {self.partition.num_clients - late} can be there at the start: set "
                f"federation.min_sites_to_start to {self.partition.num_clients - late} or fewer"
            )
        if late + self.simulation.slow_sites > self.partition.num_clients:
            raise ValueError(
                f"simulation.late_joiners ({late}) + simulation.slow_sites ({self.simulation.slow_sites}) exceed "
                f"partition.num_clients ({self.partition.num_clients})"
            )
        if self.secure_aggregation.enabled and self.partition.num_clients < 2:
            raise ValueError(
                "secure_aggregation.enabled needs at least 2 sites (a sum over one site is its update): "
                "raise partition.num_clients or set secure_aggregation.enabled = false"
            )
        if self.partition.scheme == "files":
            if len(self.data.site_paths) != self.partition.num_clients:
                raise ValueError(
                    f"partition.scheme = 'files' needs one data.site_paths entry per site: got "
                    f"{len(self.data.site_paths)} for partition.num_clients = {self.partition.num_clients}"
                )
            if self.data.test_path is None:
                raise ValueError(
                    "partition.scheme = 'files' needs data.test_path: the server's own held-out set "
                    "(it never reads the sites' files)"
                )
        elif self.data.path is None:
            raise ValueError(
                f"partition.scheme = {self.partition.scheme!r} shares data.path among sites; set it, "
                "or use partition.scheme = 'files' with data.site_paths"
            )
        if self.task.classifies and not (self.data.labels or self.data.labels_file):
            raise ValueError("classification needs the agreed label set: set data.labels or data.labels_file")
        if self.model.head_init == "label_names" and not self.task.classifies:
            raise ValueError(
                f"model.head_init = 'label_names' starts a classification head; data.task = {self.data.task!r} "
                "has none: set model.head_init = 'random'"
            )
        return self

    @model_validator(mode="after")
    def _schedule_and_early_stopping_fit(self) -> FedtuneConfig:
        """train.lr_schedule's fields agree; federation.early_stopping.metric is one the server measures."""
        t = self.train
        if problem := schedule_problem(t.lr_schedule, t.lr, self.federation.rounds, t.warmup_rounds, t.min_lr):
            raise ValueError(problem)
        metric = self.federation.early_stopping.metric
        known = HELD_OUT_METRICS[self.task.classifies]
        if metric and metric not in known:
            raise ValueError(
                f"federation.early_stopping.metric = {metric!r} is not measured for data.task = {self.data.task!r}: "
                f"use one of {', '.join(known)}"
            )
        return self

    @model_validator(mode="after")
    def _site_ranks_fit(self) -> FedtuneConfig:
        """lora.site_ranks: one rank a site, each within the global adapter's; its SVD step needs a stateless server."""
        ranks, sites = self.lora.site_ranks, self.partition.num_clients
        if not ranks:
            return self
        if len(ranks) != sites:
            raise ValueError(
                f"lora.site_ranks has {len(ranks)} entries for partition.num_clients = {sites}: give one rank a "
                "site (by partition id), or leave it empty for every site at lora.rank"
            )
        if any(not 1 <= r <= self.lora.rank for r in ranks):
            raise ValueError(
                f"lora.site_ranks {ranks}: every entry must be within 1..lora.rank = {self.lora.rank} (the global "
                "adapter's rank, the most a site can train); lower the entries or raise lora.rank"
            )
        if self.lora.svd_refactorisation and self.federation.strategy != "fedavg":
            raise ValueError(
                f"lora.site_ranks below lora.rank without lora.ffa makes the server re-factorise the adapter by SVD "
                f"every round, which rotates the coordinates federation.strategy = {self.federation.strategy!r} keeps "
                "its moments in: use federation.strategy = 'fedavg', or lora.ffa = true (exact, no re-factorisation)"
            )
        return self

    @model_validator(mode="after")
    def _site_level_checks(self) -> FedtuneConfig:
        site = self.privacy.site_level
        if not site.enabled:
            return self
        if site.noise == "distributed" and not self.secure_aggregation.enabled:
            raise ValueError(
                'privacy.site_level.noise = "distributed" needs secure_aggregation.enabled = true (each site\'s '
                "noise share alone is too small to protect it in the clear): turn secure aggregation on, or set "
                'privacy.site_level.noise = "server" (the operator is then trusted with the noise)'
            )
        if self.federation.aggregation_rule != "mean":
            raise ValueError(
                f"privacy.site_level needs federation.aggregation_rule = 'mean' (got "
                f"{self.federation.aggregation_rule!r}): a robust rule's sensitivity to one site is not the clip norm"
            )
        if self.train.max_update_norm > 0:
            raise ValueError(
                f"train.max_update_norm = {self.train.max_update_norm:g} with privacy.site_level: each site's update "
                f"is already clipped to privacy.site_level.clip_norm = {site.clip_norm:g}, and the noised mean the "
                "server applies has a norm of about noise_multiplier * clip_norm * sqrt(values) / sites, far above "
                "any bound that would catch a bad update, so every round would be discarded. Set "
                "train.max_update_norm = 0 (non-finite and misshapen updates are still refused)"
            )
        if site.delta >= 1.0 / self.partition.num_clients:
            raise ValueError(
                f"privacy.site_level.delta = {site.delta:g} is not below 1 / partition.num_clients = "
                f"1/{self.partition.num_clients}: lower privacy.site_level.delta"
            )
        return self

    @model_validator(mode="after")
    def _robust_rule_fits(self) -> FedtuneConfig:
        """A robust rule ranks or trims single updates: the server must see them, and there must be enough."""
        fed, sites = self.federation, self.partition.num_clients
        rule = fed.aggregation_rule
        if rule == "mean":
            return self
        if fed.sites_per_round or fed.fraction_per_round < 1:  # the updates a round has are those sampled
            sampled = fed.sites_per_round or max(fed.min_clients, math.ceil(fed.fraction_per_round * sites - 1e-9))
            if rule == "krum" and sampled <= 2 * fed.krum_byzantine + 2:
                raise ValueError(
                    f"federation.aggregation_rule = 'krum' with federation.krum_byzantine = {fed.krum_byzantine} "
                    f"needs more than {2 * fed.krum_byzantine + 2} updates a round (n > 2f + 2), but only {sampled} "
                    "sites are sampled (federation.sites_per_round / fraction_per_round): sample more sites"
                )
            sites = sampled
        if self.secure_aggregation.enabled:
            raise ValueError(
                f"federation.aggregation_rule = {rule!r} needs secure_aggregation.enabled = false: under secure "
                "aggregation the server sees only the sum of the updates, so it cannot trim or rank sites; "
                "set secure_aggregation.enabled = false (giving up that guarantee) or "
                "federation.aggregation_rule = 'mean'"
            )
        if rule == "trimmed_mean" and int(fed.trim_fraction * sites) < 1:
            raise ValueError(
                f"federation.trim_fraction = {fed.trim_fraction:g} trims no update of partition.num_clients = {sites} "
                f"(int(trim_fraction * sites) = 0, the plain mean): raise it to at least {1 / sites:.3g} or add sites"
            )
        if rule == "krum" and sites <= 2 * fed.krum_byzantine + 2:
            raise ValueError(
                f"federation.aggregation_rule = 'krum' with federation.krum_byzantine = {fed.krum_byzantine} needs "
                f"more than {2 * fed.krum_byzantine + 2} sites (n > 2f + 2), partition.num_clients = {sites}: "
                "lower krum_byzantine or add sites"
            )
        if rule == "krum" and fed.krum_select > sites - fed.krum_byzantine:
            raise ValueError(
                f"federation.krum_select = {fed.krum_select} exceeds partition.num_clients - federation.krum_byzantine "
                f"= {sites - fed.krum_byzantine}, the honest sites there may be"
            )
        return self


_PATH_FIELDS = {("data", "path"), ("data", "test_path"), ("data", "labels_file"), ("model", "path")}


def _resolve(value: str, base: Path) -> str:
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else (base / path).resolve())


def _resolve_paths(raw: dict[str, Any], base: Path) -> None:
    for section, key in _PATH_FIELDS:
        value = raw.get(section, {}).get(key)
        if isinstance(value, str) and value:
            raw[section][key] = _resolve(value, base)
    site_paths = raw.get("data", {}).get("site_paths")
    if isinstance(site_paths, list):
        raw["data"]["site_paths"] = [_resolve(v, base) if isinstance(v, str) else v for v in site_paths]


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected SECTION.KEY=VALUE, e.g. train.lr=1e-3")
    key, text = item.split("=", 1)
    try:
        value: Any = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
    return key.strip().split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides; values are parsed as TOML literals."""
    for item in overrides:
        keys, value = _parse_override(item)
        node = raw
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {k!r} is not a section")
        node[keys[-1]] = value
    return raw


def _format_validation_error(source: str, err: ValidationError) -> str:
    """One line for one error (the command line prints it as is), a list for several."""
    lines = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling against the README's config reference)"
        elif e["type"] == "missing":
            msg = "required field is missing"
        got = e.get("input")
        named = isinstance(got, str | Path) and len(str(got)) > 2 and str(got) in msg  # the message names it
        shown = e["type"] == "missing" or isinstance(got, dict) or named
        names_itself = not field or msg.startswith((f"{field}.", f"{field} "))
        lines.append(f"{'' if names_itself else f'{field}: '}{msg}{'' if shown else f' (got {got!r})'}")
    if len(lines) == 1:
        return f"invalid configuration in {source}: {lines[0]}"
    return "\n".join([f"invalid configuration in {source}:", *(f"  - {line}" for line in lines)])


def preset_path(name: str) -> Path:
    path = PRESETS_DIR / f"{name}.toml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in PRESETS_DIR.glob("*.toml")))
        raise ConfigError(f"unknown preset {name!r}; known presets: {known}")
    return path


def load_config(path: Path | str | None = None, overrides: list[str] | None = None) -> FedtuneConfig:
    """Read a TOML file (default: the built-in preset), apply overrides, validate."""
    path = Path(path) if path is not None else preset_path(DEFAULT_PRESET)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    return config_from_dict(raw, str(path), path.parent, overrides)


def config_from_dict(raw: dict[str, Any], source: str, base: Path, overrides: list[str] | None = None) -> FedtuneConfig:
    """Validate a raw config (relative paths against ``base``); errors name ``source`` and the field."""
    apply_overrides(raw, overrides or [])
    _resolve_paths(raw, base)
    try:
        return FedtuneConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(source, exc)) from exc


def config_from_run_config(run_config: Mapping[str, Any]) -> FedtuneConfig:
    """The federation's config as an app bundle carries it (``fedtune-config``, JSON), for server and sites."""
    if "fedtune-config" not in run_config:
        raise ConfigError(
            "the app bundle has no fedtune-config in [tool.flwr.app.config]; rebuild it with `fedtune deploy init`"
        )
    raw = json.loads(str(run_config["fedtune-config"]))
    return config_from_dict(raw, "the app bundle's fedtune-config (rebuild it with `fedtune deploy init`)", Path.cwd())


def config_to_toml_dict(cfg: FedtuneConfig) -> dict[str, Any]:
    """A JSON/TOML-serialisable view (paths as strings, None dropped) for the run directory."""
    return cfg.model_dump(mode="json", exclude_none=True)
