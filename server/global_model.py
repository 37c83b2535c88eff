"""The server's copy of the shared model: base plus global adapter, for evaluation and export."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fedtune.common.atomic_files import write_dir_atomically
from fedtune.common.config import FedtuneConfig
from fedtune.common.data.encoding import EncodedSet
from fedtune.common.devices import on_device, resolve_device
from fedtune.common.models.loading import BaseModelSpec, load_base_model
from fedtune.common.models.lora import adapter_state, build_adapted_model, frozen_a_fingerprint, load_adapter_state
from fedtune.common.models.placement import is_quantized, place_model
from fedtune.server.exported_model import write_export_record


class GlobalModel:
    def __init__(self, cfg: FedtuneConfig, spec: BaseModelSpec) -> None:
        self.cfg, self.spec = cfg, spec
        self.model, self.tokenizer = build_adapted_model(spec, cfg.lora)
        #: train.device: where the held-out evaluation and the merge run (the adapter travels as float32 arrays).
        self.device = resolve_device(cfg.train.device)
        place_model(self.model, self.device)
        self.a_fingerprint = frozen_a_fingerprint(self.model) if cfg.lora.ffa else ""

    def state(self) -> dict[str, np.ndarray]:
        """The tensors sent to sites (B and head only under FFA-LoRA)."""
        return adapter_state(self.model, self.cfg.lora.ffa)

    def update(self, state: dict[str, np.ndarray]) -> None:
        load_adapter_state(self.model, state, self.cfg.lora.ffa)

    def restore(self, checkpoint_dir: Path) -> None:
        """Load a peft checkpoint written by :class:`server.checkpoints.CheckpointStore`."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        tensors = load_file(str(Path(checkpoint_dir) / "adapter_model.safetensors"))
        set_peft_model_state_dict(self.model, tensors)
        if self.cfg.lora.ffa and frozen_a_fingerprint(self.model) != self.a_fingerprint:
            raise ValueError(f"{checkpoint_dir}: its LoRA A matrices are not the ones of lora.init_seed; cannot resume")

    def evaluate(self, data: EncodedSet) -> dict[str, float]:
        return self.cfg.task.head.evaluate(self.model, on_device(data, self.device), self.cfg.train.eval_batch_size)

    def export_merged(self, checkpoint_dir: Path, out_dir: Path) -> Path:
        """Base + adapter merged into plain weights that ``AutoModelFor...from_pretrained`` loads.

        A mean-pooled BERT classifier ships its pooling as code (``trust_remote_code=True``); the
        directory's ``fedtune.json`` says which round it is and how to read data for it.
        """
        from peft import PeftModel

        from fedtune.common.models.pooling import ship_mean_pooling_code

        base = load_base_model(self.spec, pad_token_id=self.tokenizer.pad_token_id, device=self.device)
        # Merged on the device in the base's dtype, written from the CPU (save_pretrained copies there anyway).
        merged: Any = PeftModel.from_pretrained(base, str(checkpoint_dir)).merge_and_unload()
        if not is_quantized(merged):
            merged.to("cpu")

        def build(staging: Path) -> None:
            merged.save_pretrained(staging)
            self.tokenizer.save_pretrained(staging)
            ship_mean_pooling_code(staging)  # a mean-pooled classifier: plain transformers with trust_remote_code
            write_export_record(staging, self.cfg, list(self.spec.labels), Path(checkpoint_dir))

        return write_dir_atomically(Path(out_dir), build)
