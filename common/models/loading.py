"""Load a base model and tokenizer for a task from a built-in name, a tiny config or a local directory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedtune.common.config import FedtuneConfig, ModelConfig
from fedtune.common.models.builtin import BUILTIN_WEIGHTS, resolve_builtin
from fedtune.common.models.tiny import TINY_MODELS, resolve_tiny


@dataclass(frozen=True)
class BaseModelSpec:
    """Everything needed to rebuild the same base model in any process."""

    directory: Path
    task: str
    dtype: str
    labels: tuple[str, ...] = ()
    pooling: str = "auto"  # classification only: see common.models.pooling


def resolve_model_dir(model: ModelConfig, seed: int = 0) -> Path:
    """Local directory of the configured base model, fetching or building it once if needed."""
    if model.path is not None:
        directory = Path(model.path)
        if not (directory / "config.json").exists():
            raise FileNotFoundError(
                f"model.path = {directory}: no config.json there; expected a Hugging Face model directory"
            )
        return directory
    if model.name in BUILTIN_WEIGHTS:
        return resolve_builtin(model.name)
    if model.name in TINY_MODELS:
        return resolve_tiny(model.name, seed)
    known = sorted(BUILTIN_WEIGHTS) + list(TINY_MODELS)
    raise ValueError(f"model.name = {model.name!r} is not a built-in model ({known}); set model.path instead")


def model_spec(cfg: FedtuneConfig) -> BaseModelSpec:
    """The configured base model, fetched or built once, with the federation's agreed labels."""
    from fedtune.common.data.federation_data import load_label_set

    labels = tuple(load_label_set(cfg.data)) if cfg.model.task == "classification" else ()
    return BaseModelSpec(
        resolve_model_dir(cfg.model, cfg.run.seed), cfg.model.task, cfg.model.dtype, labels, cfg.model.pooling
    )


def load_tokenizer(spec: BaseModelSpec):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spec.directory)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(spec: BaseModelSpec, pad_token_id: int | None = None) -> Any:
    """The frozen base model for the task; a classification head is added with the agreed labels."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from fedtune.common.models.pooling import install_mean_pooling, resolve_pooling

    dtype = getattr(torch, spec.dtype)
    if spec.task == "causal-lm":
        model = AutoModelForCausalLM.from_pretrained(spec.directory, dtype=dtype)
    else:
        labels = list(spec.labels)
        model = AutoModelForSequenceClassification.from_pretrained(
            spec.directory,
            dtype=dtype,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)},
        )
        if resolve_pooling(spec.pooling, model) == "mean":
            install_mean_pooling(model)
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
