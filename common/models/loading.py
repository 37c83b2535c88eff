"""Load a base model and tokenizer for a task from a built-in name, a tiny config or a local directory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedtune.common.config import MODEL_NAMES, ConfigError, FedtuneConfig, ModelConfig
from fedtune.common.models.builtin import BUILTIN_WEIGHTS, resolve_builtin
from fedtune.common.models.directory import model_dir_problem
from fedtune.common.models.tiny import TINY_MODELS, resolve_tiny
from fedtune.common.tasks.registry import task_for


@dataclass(frozen=True)
class BaseModelSpec:
    """Everything needed to rebuild the same base model in any process."""

    directory: Path
    task: str  # a name in the task registry (data.task)
    dtype: str
    labels: tuple[str, ...] = ()
    pooling: str = "auto"  # classification only: see common.models.pooling


def resolve_model_dir(model: ModelConfig, seed: int = 0) -> Path:
    """Local directory of the configured base model, fetching or building it once if needed."""
    if model.path is not None:
        directory = Path(model.path)
        problem = model_dir_problem(directory)  # checked at validation too; the directory may have changed since
        if problem:
            raise ConfigError(f"model.path: {problem}")
        return directory
    if model.name in BUILTIN_WEIGHTS:
        return resolve_builtin(model.name)
    if model.name in TINY_MODELS:
        return resolve_tiny(model.name, seed)
    raise ConfigError(
        f"model.name = {model.name!r} is not a built-in model (known: {', '.join(MODEL_NAMES)}); "
        "give a local Hugging Face model directory with model.path instead"
    )


def model_spec(cfg: FedtuneConfig) -> BaseModelSpec:
    """The configured base model, fetched or built once, with the federation's agreed labels."""
    from fedtune.common.data.federation_data import agreed_labels

    return BaseModelSpec(
        resolve_model_dir(cfg.model, cfg.run.seed),
        cfg.data.task,
        cfg.model.dtype,
        tuple(agreed_labels(cfg)),
        cfg.model.pooling,
    )


def load_tokenizer(spec: BaseModelSpec):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spec.directory)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(spec: BaseModelSpec, pad_token_id: int | None = None) -> Any:
    """The frozen base model of the task's head (a classifier gets its head over the agreed labels)."""
    import torch

    model = task_for(spec.task).head.load_model(spec.directory, getattr(torch, spec.dtype), spec.labels, spec.pooling)
    if pad_token_id is not None and model.config.pad_token_id is None:
        model.config.pad_token_id = pad_token_id
    model.requires_grad_(False)
    return model


def load_exported_classifier(directory: Path) -> Any:
    """A merged classifier written by ``fedtune`` (``RUN_DIR/merged``), with the pooling it was trained with.

    Plain ``AutoModelForSequenceClassification.from_pretrained`` would put BERT's untrained [CLS]
    pooler back under a head trained on mean-pooled states; this re-installs the mean pooling
    that ``config.json`` records under ``fedtune_pooling``.
    """
    from transformers import AutoModelForSequenceClassification

    from fedtune.common.models.pooling import POOLING_KEY, install_mean_pooling

    model = AutoModelForSequenceClassification.from_pretrained(directory)
    if getattr(model.config, POOLING_KEY, None) == "mean":
        install_mean_pooling(model)
    return model.eval()
