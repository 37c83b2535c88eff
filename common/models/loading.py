"""Load a base model and tokenizer for a task from a built-in name, a tiny config or a local directory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.config import FedtuneConfig, ModelConfig
from common.models.builtin import BUILTIN_WEIGHTS, resolve_builtin
from common.models.tiny import TINY_MODELS, resolve_tiny


@dataclass(frozen=True)
class BaseModelSpec:
    """Everything needed to rebuild the same base model in any process."""

    directory: Path
    task: str
    dtype: str
    labels: tuple[str, ...] = ()


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
    from common.data.federation_data import load_label_set

    labels = tuple(load_label_set(cfg.data)) if cfg.model.task == "classification" else ()
    return BaseModelSpec(resolve_model_dir(cfg.model, cfg.run.seed), cfg.model.task, cfg.model.dtype, labels)


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
    if pad_token_id is not None and model.config.pad_token_id is None:
        model.config.pad_token_id = pad_token_id
    model.requires_grad_(False)
    return model
