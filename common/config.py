"""One typed configuration for a federation, validated once at the edge.

A run is described by a TOML file (see ``common/presets``) plus ``--set key=value``
overrides. Everything downstream receives a :class:`FedtuneConfig`, never raw dicts.
Relative paths are resolved against the directory of the TOML file that names them.
"""

from __future__ import annotations

import ast
import json
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DataTask = Literal["classification", "chat", "prompt-completion", "question-answer", "instruction"]
PRESETS_DIR = Path(__file__).parent / "presets"
DEFAULT_PRESET = "banking77-minilm"


class ConfigError(ValueError):
    """A configuration that cannot be run; the message names the file and field."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RunConfig(_Section):
    name: str = "fedtune"
    output_dir: Path = Path("runs")
    seed: int = 0


class ModelConfig(_Section):
    """Which base model to adapt: a built-in name or a local Hugging Face directory."""

    name: str = "minilm-l6"
    path: Path | None = None
    task: Literal["causal-lm", "classification"] = "classification"
    max_length: int = Field(64, gt=0)
    dtype: Literal["float32", "bfloat16"] = "float32"
    # Classification: "mean" pools token states over the mask (how sentence encoders such as
    # MiniLM were trained); "model" keeps the architecture's own head; "auto" picks "mean" for
    # BERT-style encoders. See common/models/pooling.py.
    pooling: Literal["auto", "mean", "model"] = "auto"


class LoraSettings(_Section):
    rank: int = Field(8, gt=0)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=list)
    ffa: bool = False
    init_seed: int = 0


class FieldMap(_Section):
    """Which column (CSV/Parquet) or key (JSON) holds each part of a record.

    Only the parts of the configured ``data.task`` are read; every name defaults to the part's
    own name. ``system`` optionally names a column with a per-record system prompt.
    """

    text: str = "text"
    label: str = "label"
    prompt: str = "prompt"
    completion: str = "completion"
    question: str = "question"
    answer: str = "answer"
    instruction: str = "instruction"
    input: str = "input"
    output: str = "output"
    messages: str = "messages"
    system: str = ""


class DataConfig(_Section):
    """Where the records are, how to read them and which fields hold what."""

    path: Path | None = None
    site_paths: list[Path] = Field(default_factory=list)
    test_path: Path | None = None
    labels_file: Path | None = None
    labels: list[str] = Field(default_factory=list)
    task: DataTask | None = None
    fields: FieldMap = FieldMap()
    format: Literal["auto", "jsonl", "json", "csv", "parquet"] = "auto"
    header: Literal["auto", "yes", "no"] = "auto"
    delimiter: str = Field("", max_length=1)
    column_names: list[str] = Field(default_factory=list)
    max_record_bytes: int = Field(1_000_000, gt=0)
    on_malformed: Literal["fail", "skip"] = "fail"
    max_records: int = Field(0, ge=0)
    holdout_fraction: float = Field(0.1, ge=0, lt=1)
    val_fraction: float = Field(0.1, ge=0, lt=1)
    max_eval_examples: int = Field(256, gt=0)

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
    """How a simulation shares ``data.path`` among sites; ``files`` gives each site its own ``data.site_paths`` entry."""

    scheme: Literal["iid", "dirichlet", "column", "files"] = "iid"
    num_clients: int = Field(3, gt=0)
    alpha: float = Field(0.5, gt=0)
    column: str = "source"
    min_examples: int = Field(20, gt=0)


class FederationConfig(_Section):
    rounds: int = Field(3, gt=0)
    min_clients: int = Field(1, gt=0)
    cpus_per_client: float = Field(1.0, gt=0)
    round_timeout_s: float = Field(3600.0, gt=0)


class TrainConfig(_Section):
    local_steps: int = Field(10, gt=0)
    batch_size: int = Field(32, gt=0)
    lr: float = Field(5e-3, gt=0)
    optimizer: Literal["adam", "sgd"] = "adam"
    eval_batch_size: int = Field(32, gt=0)
    torch_threads: int = Field(1, gt=0)
    # Imbalanced classes are re-weighted in the loss, never oversampled (see common/data/preparation.py).
    class_weighting: Literal["none", "balanced"] = "none"


class PrivacyConfig(_Section):
    """Target (epsilon, delta) for each site over the whole federation."""

    enabled: bool = True
    epsilon: float = Field(8.0, gt=0)
    delta: float = Field(1e-5, gt=0, lt=1)
    max_grad_norm: float = Field(1.0, gt=0)
    accountant: Literal["rdp", "prv"] = "rdp"
    # Sites send their validation loss/accuracy (aggregate scalars over their own validation
    # split, not DP-protected) only when they opt in.
    share_site_metrics: bool = False
    # Noise multiplier of the label histogram behind train.class_weighting = "balanced" under DP.
    histogram_noise: float = Field(10.0, gt=0)


class SecureAggregationConfig(_Section):
    """SecAgg+ for training rounds: the server learns only the sum of the sites' updates.

    Each coordinate of a site's update is clipped to ``clip_range`` before quantisation
    (0: derived from the optimiser, see ``auto_clip_range``); clipped values are counted
    and reported. The sum is revealed only over at least ``max(2, federation.min_clients)``
    sites; ``threshold_fraction`` of each site's neighbourhood must stay to rebuild masks.
    ``record_masked_inputs`` keeps, in the run directory, every masked vector the server
    received: what the server holds, for an auditor to inspect (d+1 uint32 a site a round).
    """

    enabled: bool = True
    neighbours: int = Field(0, ge=0)
    threshold_fraction: float = Field(0.5, ge=0.5, lt=1)
    clip_range: float = Field(0.0, ge=0)
    stage_timeout_s: float = Field(300.0, gt=0)
    record_masked_inputs: bool = False


class FedtuneConfig(_Section):
    run: RunConfig = RunConfig()
    model: ModelConfig = ModelConfig()
    lora: LoraSettings = LoraSettings()
    data: DataConfig
    partition: PartitionConfig = PartitionConfig()
    federation: FederationConfig = FederationConfig()
    train: TrainConfig = TrainConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    secure_aggregation: SecureAggregationConfig = SecureAggregationConfig()

    @model_validator(mode="before")
    @classmethod
    def _default_data_task(cls, raw: Any) -> Any:
        """A generative model defaults to question/answer records, a classifier to text/label."""
        if isinstance(raw, dict) and isinstance(raw.get("data"), dict) and raw["data"].get("task") is None:
            model_task = (raw.get("model") or {}).get("task", ModelConfig().task)
            raw = {**raw, "data": {**raw["data"], "task": "classification" if model_task == "classification"
                                   else "question-answer"}}
        return raw

    @model_validator(mode="after")
    def _cross_checks(self) -> FedtuneConfig:
        if self.federation.min_clients > self.partition.num_clients:
            raise ValueError(
                f"federation.min_clients ({self.federation.min_clients}) exceeds "
                f"partition.num_clients ({self.partition.num_clients})"
            )
        if self.secure_aggregation.enabled and self.partition.num_clients < 2:
            raise ValueError("secure_aggregation.enabled needs at least 2 sites (a sum over one site is its update): "
                             "raise partition.num_clients or set secure_aggregation.enabled = false")
        if (self.data.task == "classification") != (self.model.task == "classification"):
            raise ValueError(
                f"data.task = {self.data.task!r} does not fit model.task = {self.model.task!r}: classification "
                "data needs a classification model; chat, prompt-completion, question-answer and instruction "
                "data need causal-lm"
            )
        if self.partition.scheme == "files":
            if len(self.data.site_paths) != self.partition.num_clients:
                raise ValueError(f"partition.scheme = 'files' needs one data.site_paths entry per site: got "
                                 f"{len(self.data.site_paths)} for partition.num_clients = {self.partition.num_clients}")
            if self.data.test_path is None:
                raise ValueError("partition.scheme = 'files' needs data.test_path: the server's own held-out set "
                                 "(it never reads the sites' files)")
        elif self.data.path is None:
            raise ValueError(f"partition.scheme = {self.partition.scheme!r} shares data.path among sites; set it, "
                             "or use partition.scheme = 'files' with data.site_paths")
        if self.model.task == "classification" and not (self.data.labels or self.data.labels_file):
            raise ValueError("classification needs the agreed label set: set data.labels or data.labels_file")
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
    lines = [f"invalid configuration in {source}:"]
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling against the README's config reference)"
        elif e["type"] == "missing":
            msg = "required field is missing"
        got = e.get("input")
        got_text = "" if e["type"] in ("missing",) or isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"  - {field}: {msg}{got_text}")
    return "\n".join(lines)


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


def config_from_dict(
    raw: dict[str, Any], source: str, base: Path, overrides: list[str] | None = None
) -> FedtuneConfig:
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
        raise ConfigError("the app bundle has no fedtune-config in [tool.flwr.app.config]; rebuild it with "
                          "`fedtune deploy init`")
    return FedtuneConfig.model_validate(json.loads(str(run_config["fedtune-config"])))


def config_to_toml_dict(cfg: FedtuneConfig) -> dict[str, Any]:
    """A JSON/TOML-serialisable view (paths as strings, None dropped) for the run directory."""
    return cfg.model_dump(mode="json", exclude_none=True)
