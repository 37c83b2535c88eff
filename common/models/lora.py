"""LoRA adapters on a base model, and the adapter tensors that travel between sites and server.

Only adapter tensors ever leave a process: the LoRA matrices, plus the task head for
classification. With FFA-LoRA (Sun et al., ICLR 2024) every A matrix is drawn from a shared
seed and frozen, so only B (and the head) is trained and sent: averaging B is then exactly
averaging the weight updates B·A, and traffic halves.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from fedtune.common.config import ConfigError, FedtuneConfig, LoraSettings
from fedtune.common.models.label_prior import LabelPriorError, install_label_prior, label_prior_problem
from fedtune.common.models.loading import BaseModelSpec, load_base_model, load_tokenizer, model_spec
from fedtune.common.tasks.base import TaskShape
from fedtune.common.tasks.registry import task_for

# Attention projections per architecture; peft's own table is the fallback. Each family listed
# here is proven by tests/client/test_architectures.py: LoRA on a tiny random-init model of it,
# DP-SGD at zero noise equal to plain SGD, and per-record clipping equal to a loop over records.
DEFAULT_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma3_text": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "phi3": ["qkv_proj", "o_proj"],  # fused q/k/v; not in peft's table
    "gpt2": ["c_attn"],  # fused q/k/v, a transformers Conv1D (see build_lora_config's fan_in_fan_out)
    "bert": ["query", "key", "value"],
    "roberta": ["query", "key", "value"],
    "deberta-v2": ["query_proj", "key_proj", "value_proj"],
}


def default_target_modules(model_type: str) -> list[str]:
    if model_type in DEFAULT_TARGETS:
        return DEFAULT_TARGETS[model_type]
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    if model_type in TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING:
        return list(TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING[model_type])
    raise ValueError(
        f"no default LoRA target modules for model type {model_type!r}; set lora.target_modules in the config"
    )


def _lora_linear_types() -> tuple[type, ...]:
    """Layers whose LoRA matrices A and B are ``torch.nn.Linear``: Opacus computes their per-record gradients.

    transformers' ``Conv1D`` (GPT-2) is a linear layer stored transposed: peft wraps it with
    ``fan_in_fan_out=True`` and its A and B are ordinary ``nn.Linear``. LoRA on an ``nn.Embedding``
    keeps A and B as bare parameters, which Opacus cannot sample ("Per sample gradient is not
    initialized"). Anything else (convolutions, fused expert tensors, whole blocks) is refused
    under DP-SGD too: no test here shows its per-record gradients right.
    """
    import torch
    from transformers.pytorch_utils import Conv1D

    return (torch.nn.Linear, Conv1D)


def linear_module_names(model: Any) -> list[str]:
    """The distinct last names of a model's linear layers, in order: what lora.target_modules may name."""
    linear = _lora_linear_types()
    names: list[str] = []
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, linear) and leaf not in names:
            names.append(leaf)
    return names


def target_modules(model: Any, targets: list[str]) -> dict[str, Any]:
    """The modules LoRA adapts, by full name: those whose name is a target or ends in ``.target`` (peft's rule)."""
    return {
        name: module
        for name, module in model.named_modules()
        if name and any(name == t or name.endswith(f".{t}") for t in targets)
    }


def _skeleton(spec: BaseModelSpec) -> Any:
    """The task's model class built from the directory's config on the meta device: its modules, no weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if task_for(spec.task).classifies else AutoModelForCausalLM
    try:
        config = AutoConfig.from_pretrained(spec.directory)
        with torch.device("meta"):
            return auto.from_config(config)
    except (ValueError, KeyError, OSError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"the base model in {spec.directory} cannot be built for {spec.task} ({auto.__name__}): {reason}"
        ) from None


def check_target_modules(spec: BaseModelSpec, settings: LoraSettings, private: bool = True) -> None:
    """Every LoRA target must be a module of the base model; else one line listing the model's linear modules.

    peft would otherwise stop a site with ``NoMatchingPeftModuleError`` (no target found) or
    silently adapt fewer matrices (some found), after data was read and rounds had begun. Under
    DP-SGD every target must also be a linear layer (``_lora_linear_types``): Opacus would stop
    the first private step otherwise.
    """
    model = _skeleton(spec)
    model_type = model.config.model_type
    linear = ", ".join(linear_module_names(model))
    try:
        targets = list(settings.target_modules) or default_target_modules(model_type)
    except ValueError as exc:
        raise ConfigError(f"{exc}; its linear modules are: {linear}") from None
    matched = target_modules(model, targets)
    absent = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in matched)]
    source = "lora.target_modules" if settings.target_modules else f"the default LoRA targets of {model_type!r}"
    if absent:
        raise ConfigError(
            f"{source}: no module named {', '.join(map(repr, absent))} in the base model ({spec.directory}, "
            f"model type {model_type!r}); its linear modules are: {linear}. Set lora.target_modules to some of them"
        )
    unsupported = sorted(
        {
            f"{n.rsplit('.', 1)[-1]!r} ({type(m).__name__})"
            for n, m in matched.items()
            if not isinstance(m, _lora_linear_types())
        }
    )
    if private and unsupported:
        raise ConfigError(
            f"{source}: model type {model_type!r} cannot be trained with DP-SGD on {', '.join(unsupported)}: "
            f"Opacus computes per-record gradients of LoRA on linear layers only; set lora.target_modules "
            f"to some of: {linear}"
        )


def checked_model_spec(cfg: FedtuneConfig) -> BaseModelSpec:
    """The configured base model (fetched or built once) with LoRA's targets checked against it.

    For the start of a run, before any data is read or run directory written: a model problem
    is then one line naming the setting to change.
    """
    spec = model_spec(cfg)
    check_target_modules(spec, cfg.lora, private=cfg.privacy.enabled)
    if spec.head_init == "label_names" and (problem := label_prior_problem(spec.directory, len(spec.labels))):
        raise ConfigError(problem)
    return spec


def build_lora_config(settings: LoraSettings, task: TaskShape, model_type: str, fan_in_fan_out: bool = False):
    """peft's LoraConfig; ``fan_in_fan_out`` for layers that store their weight transposed (GPT-2's ``Conv1D``)."""
    from peft import LoraConfig, TaskType

    return LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,  # type: ignore[arg-type]  # peft annotates int; it scales by any number
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules) or default_target_modules(model_type),
        task_type=TaskType(task.head.peft_task_type),
        fan_in_fan_out=fan_in_fan_out,
    )


def stores_weights_transposed(model: Any, settings: LoraSettings) -> bool:
    """Whether LoRA's targets are transformers ``Conv1D`` layers (GPT-2), whose weight is (in, out), not (out, in)."""
    from transformers.pytorch_utils import Conv1D

    targets = list(settings.target_modules) or default_target_modules(model.config.model_type)
    return any(isinstance(m, Conv1D) for m in target_modules(model, targets).values())


def build_adapted_model(spec: BaseModelSpec, settings: LoraSettings) -> tuple[Any, Any]:
    """Base model + fresh LoRA adapter, identical in every process for the same seed."""
    import torch
    from peft import get_peft_model

    tokenizer = load_tokenizer(spec)
    torch.manual_seed(settings.init_seed)
    base = load_base_model(spec, pad_token_id=tokenizer.pad_token_id)
    if spec.head_init == "label_names":
        try:
            install_label_prior(base, tokenizer, spec.labels, spec.head_init_scale, spec.max_length)
        except LabelPriorError as exc:
            raise ConfigError(str(exc)) from None
    torch.manual_seed(settings.init_seed + 1)
    transposed = stores_weights_transposed(base, settings)
    model = get_peft_model(
        base, build_lora_config(settings, task_for(spec.task), base.config.model_type, fan_in_fan_out=transposed)
    )
    if settings.ffa:
        for name, param in model.named_parameters():
            if "lora_A" in name:
                param.requires_grad_(False)
    return model, tokenizer


def _is_sent(key: str, ffa: bool) -> bool:
    return not (ffa and "lora_A" in key)


def adapter_state(model: Any, ffa: bool) -> dict[str, np.ndarray]:
    """The tensors a site sends: LoRA matrices (B only under FFA) and the trainable head, as float32."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(model)
    return {k: v.detach().float().cpu().numpy().copy() for k, v in state.items() if _is_sent(k, ffa)}


def load_adapter_state(model: Any, state: dict[str, np.ndarray], ffa: bool) -> None:
    """Overwrite the adapter tensors that travel; refuses unknown or missing keys."""
    import torch
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    expected = {k for k in get_peft_model_state_dict(model) if _is_sent(k, ffa)}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(f"adapter tensors do not match this model: missing {missing[:3]}, unexpected {extra[:3]}")
    tensors = {k: torch.from_numpy(np.asarray(v)) for k, v in state.items()}
    result = set_peft_model_state_dict(model, tensors)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"adapter tensors not used by the model: {unexpected[:3]}")


def adapter_digest(tensors: dict[str, np.ndarray]) -> str:
    """sha256 over names and float32 bytes, in name order."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        digest.update(key.encode())
        digest.update(np.ascontiguousarray(tensors[key], dtype=np.float32).tobytes())
    return digest.hexdigest()


def frozen_a_fingerprint(model: Any) -> str:
    """Hash of all LoRA A matrices: under FFA every site must hold the very same ones."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(model)
    return adapter_digest({k: v.detach().float().cpu().numpy() for k, v in state.items() if "lora_A" in k})[:16]
