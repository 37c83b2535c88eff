"""Sentence pooling for encoder classifiers: the mean of the token states over the attention mask.

Sentence-transformer encoders such as all-MiniLM-L6-v2 were trained to be read by their mean
token state. Their checkpoints carry no trained [CLS] pooler, so ``BertForSequenceClassification``
would put a randomly initialised, frozen ``tanh(W h_CLS)`` under the head: features dominated by
one shared direction, on which a linear head learns slowly and DP-SGD's noise costs most (on
Banking77 at epsilon=8 the head-only probe of docs/benchmarks.md goes from 0.37 to 0.81 accuracy).
``MaskedMeanPooler`` takes the pooler's place inside the model, so training, evaluation, Opacus'
per-record gradients and the merged export all see the same network. The export ships the
pooling as code (``mean_pooled_bert.py``, see :func:`ship_mean_pooling_code`), so plain
transformers rebuilds that network too.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from torch import nn

from fedtune.common.atomic_files import atomic_write_json
from fedtune.common.models import mean_pooled_bert
from fedtune.common.models.mean_pooled_bert import MODEL_TYPE, MaskedMeanPooler

__all__ = [
    "POOLING_KEY",
    "MaskedMeanPooler",
    "install_mean_pooling",
    "register_exported_config",
    "resolve_pooling",
    "ship_mean_pooling_code",
]

POOLING_KEY = "fedtune_pooling"  # written into config.json of exported models
REMOTE_CODE_FILE = "modeling_fedtune.py"  # mean_pooled_bert.py, as shipped beside an exported model


def _encoder_with_pooler(model: Any) -> Any | None:
    encoder = getattr(model, getattr(model, "base_model_prefix", ""), None)
    return encoder if encoder is not None and isinstance(getattr(encoder, "pooler", None), nn.Module) else None


def resolve_pooling(requested: str, model: Any) -> str:
    """``auto`` is ``mean`` for encoders with a BERT-style pooler and the model's own head otherwise."""
    supported = _encoder_with_pooler(model) is not None
    if requested == "auto":
        return "mean" if supported else "model"
    if requested == "mean" and not supported:
        raise ValueError(
            f"model.pooling = 'mean' needs an encoder with a BERT-style pooler; {type(model).__name__} has none: "
            "set model.pooling = 'model' (or 'auto')"
        )
    return requested


def _keep_mask(encoder: nn.Module, args: tuple, kwargs: dict) -> None:
    # The pooler is looked up on the module called, not closed over: a deep copy of the model
    # (a twin for a test, a worker's replica) must feed its own pooler.
    mask = kwargs.get("attention_mask")
    if mask is None and len(args) > 1:
        mask = args[1]
    pooler = encoder.pooler
    if isinstance(pooler, MaskedMeanPooler):  # the pooler installed with this hook, unless replaced since
        pooler.mask = mask


def install_mean_pooling(model: Any) -> None:
    """Replace the encoder's [CLS] pooler by :class:`MaskedMeanPooler`, fed each forward's attention mask."""
    encoder = _encoder_with_pooler(model)
    if encoder is None:
        raise ValueError(f"{type(model).__name__} has no BERT-style pooler to replace")
    encoder.pooler = MaskedMeanPooler()
    encoder.register_forward_pre_hook(_keep_mask, with_kwargs=True)
    model.config.update({POOLING_KEY: "mean"})


def ship_mean_pooling_code(directory: Path) -> bool:
    """Make a saved mean-pooled BERT classifier load with plain transformers (``trust_remote_code=True``).

    Copies :mod:`fedtune.common.models.mean_pooled_bert` beside the weights and points
    ``config.json`` at it (``auto_map``, its own ``model_type``). Returns False, changing nothing,
    when the model is not mean-pooled, or is not a BERT (only fedtune's loader rebuilds those).
    """
    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    if config.get(POOLING_KEY) != "mean" or config.get("model_type") not in ("bert", MODEL_TYPE):
        return False
    module = Path(REMOTE_CODE_FILE).stem
    shutil.copyfile(mean_pooled_bert.__file__, directory / REMOTE_CODE_FILE)
    config |= {
        "model_type": MODEL_TYPE,
        "architectures": [mean_pooled_bert.FedtuneMeanPooledBertForSequenceClassification.__name__],
        "auto_map": {
            "AutoConfig": f"{module}.{mean_pooled_bert.FedtuneMeanPooledBertConfig.__name__}",
            "AutoModelForSequenceClassification": (
                f"{module}.{mean_pooled_bert.FedtuneMeanPooledBertForSequenceClassification.__name__}"
            ),
        },
    }
    atomic_write_json(directory / "config.json", config)
    return True


def register_exported_config() -> None:
    """Tell this process's ``AutoConfig`` the exported model type, so fedtune reads such a directory's config and
    tokenizer with its own copy of the code: the ``modeling_fedtune.py`` inside a directory is never run by fedtune."""
    from transformers import AutoConfig

    AutoConfig.register(MODEL_TYPE, mean_pooled_bert.FedtuneMeanPooledBertConfig, exist_ok=True)
