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

from fedtune.common.config import LoraSettings
from fedtune.common.models.loading import BaseModelSpec, load_base_model, load_tokenizer
from fedtune.common.tasks.base import TaskShape
from fedtune.common.tasks.registry import task_for

# Attention projections per architecture; peft's own table is the fallback.
DEFAULT_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "bert": ["query", "key", "value"],
    "gpt2": ["c_attn"],
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


def build_lora_config(settings: LoraSettings, task: TaskShape, model_type: str):
    from peft import LoraConfig, TaskType

    return LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,  # type: ignore[arg-type]  # peft annotates int; it scales by any number
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules) or default_target_modules(model_type),
        task_type=TaskType(task.head.peft_task_type),
    )


def build_adapted_model(spec: BaseModelSpec, settings: LoraSettings) -> tuple[Any, Any]:
    """Base model + fresh LoRA adapter, identical in every process for the same seed."""
    import torch
    from peft import get_peft_model

    tokenizer = load_tokenizer(spec)
    torch.manual_seed(settings.init_seed)
    base = load_base_model(spec, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(settings.init_seed + 1)
    model = get_peft_model(base, build_lora_config(settings, task_for(spec.task), base.config.model_type))
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
