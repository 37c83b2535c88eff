"""Load a base model and tokenizer for a task from a built-in name, a tiny config, a hub id or a local directory."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedtune.common.config import MODEL_NAMES, ConfigError, FedtuneConfig, ModelConfig
from fedtune.common.models.builtin import BUILTIN_WEIGHTS, resolve_builtin
from fedtune.common.models.directory import model_dir_problem
from fedtune.common.models.hub import HubModelError, is_hub_id, resolve_hub_model
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
    quantization: str = "none"  # model.quantization: none, 8bit or 4bit (bitsandbytes, CUDA only)
    head_init: str = "random"  # model.head_init: random or label_names (common/models/label_prior.py)
    head_init_scale: float = 3.0
    max_length: int = 64  # model.max_length: the label names are tokenised with it under label_names


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
    if is_hub_id(model.name):
        try:
            directory = resolve_hub_model(model.name, model.revision)
        except HubModelError as exc:
            raise ConfigError(str(exc)) from None
        problem = model_dir_problem(directory)  # a snapshot of a repository that is not a base model
        if problem:
            raise ConfigError(f"model.name = {model.name!r}: {problem}")
        return directory
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
        cfg.model.quantization,
        cfg.model.head_init,
        cfg.model.head_init_scale,
        cfg.model.max_length,
    )


def load_tokenizer(spec: BaseModelSpec):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spec.directory)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def quantization_config(quantization: str, dtype: str) -> Any:
    """transformers' ``BitsAndBytesConfig`` for ``model.quantization`` (None for ``none``): 8-bit LLM.int8, or
    4-bit NF4 with double quantisation computing in ``dtype`` (Dettmers et al., "QLoRA", NeurIPS 2023)."""
    if quantization == "none":
        return None
    import torch
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    if quantization == "4bit":
        compute = torch.float32 if dtype == "float32" else getattr(torch, dtype)
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
        )
    raise ConfigError(f"model.quantization = {quantization!r}: use none, 8bit or 4bit")


def quantization_problem(spec: BaseModelSpec, device: Any) -> str | None:
    """Why ``spec``'s quantised base cannot be loaded here (None: it can, or it is not quantised)."""
    import importlib.util

    if spec.quantization == "none":
        return None
    if task_for(spec.task).classifies:
        return f"model.quantization = {spec.quantization!r} applies to the generative tasks: set it to 'none'"
    if importlib.util.find_spec("bitsandbytes") is None:
        return (
            f"model.quantization = {spec.quantization!r} needs bitsandbytes, which is not installed: "
            "pip install 'fedtune[qlora]', or set model.quantization = 'none'"
        )
    if getattr(device, "type", str(device)) != "cuda":
        return (
            f"model.quantization = {spec.quantization!r} needs a CUDA GPU (train.device resolves to {device}): "
            "set model.quantization = 'none' on this machine"
        )
    return None


def load_base_model(spec: BaseModelSpec, pad_token_id: int | None = None, device: Any = None) -> Any:
    """The frozen base model of the task's head (a classifier gets its head over the agreed labels), on
    ``device`` if given. A quantised base is loaded straight onto the GPU (bitsandbytes quantises as it loads)."""
    import torch

    if spec.quantization != "none":
        if device is None:  # a quantised base is built on a GPU or not at all: the first one torch sees
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        problem = quantization_problem(spec, device)
        if problem:
            raise ConfigError(problem)
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(
            spec.directory,
            dtype=torch.float32 if spec.dtype == "float32" else getattr(torch, spec.dtype),
            quantization_config=quantization_config(spec.quantization, spec.dtype),
            device_map={"": torch.device(device).index or 0},
        )
    else:
        model = task_for(spec.task).head.load_model(
            spec.directory, getattr(torch, spec.dtype), spec.labels, spec.pooling
        )
        if device is not None:
            model.to(device)
    if pad_token_id is not None and model.config.pad_token_id is None:
        model.config.pad_token_id = pad_token_id
    model.requires_grad_(False)
    return model


def load_exported_classifier(directory: Path) -> Any:
    """A merged classifier written by ``fedtune`` (``RUN_DIR/merged``), with the pooling it was trained with.

    Plain ``AutoModelForSequenceClassification.from_pretrained`` would put BERT's untrained [CLS]
    pooler back under a head trained on mean-pooled states; this re-installs the mean pooling
    that ``config.json`` records under ``fedtune_pooling``, or, for a directory that ships its
    code (``modeling_fedtune.py``), runs fedtune's own copy of that code, not the shipped file.
    """
    from transformers import AutoModelForSequenceClassification

    from fedtune.common.models.mean_pooled_bert import MODEL_TYPE, FedtuneMeanPooledBertForSequenceClassification
    from fedtune.common.models.pooling import POOLING_KEY, install_mean_pooling, register_exported_config

    register_exported_config()
    saved = json.loads((Path(directory) / "config.json").read_text(encoding="utf-8"))
    if saved.get("model_type") == MODEL_TYPE:
        return FedtuneMeanPooledBertForSequenceClassification.from_pretrained(directory).eval()
    model = AutoModelForSequenceClassification.from_pretrained(directory)
    if getattr(model.config, POOLING_KEY, None) == "mean":
        install_mean_pooling(model)
    return model.eval()
