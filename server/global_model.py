"""The server's copy of the shared model: base plus global adapter, for evaluation and export."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fedtune.common.atomic_files import write_dir_atomically
from fedtune.common.config import FedtuneConfig
from fedtune.common.data.encoding import EncodedSet
from fedtune.common.models.loading import BaseModelSpec, load_base_model
from fedtune.common.models.lora import adapter_state, build_adapted_model, frozen_a_fingerprint, load_adapter_state


class GlobalModel:
    def __init__(self, cfg: FedtuneConfig, spec: BaseModelSpec) -> None:
        self.cfg, self.spec = cfg, spec
        self.model, self.tokenizer = build_adapted_model(spec, cfg.lora)
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
        return self.cfg.task.head.evaluate(self.model, data, self.cfg.train.eval_batch_size)

    def export_merged(self, checkpoint_dir: Path, out_dir: Path) -> Path:
        """Base + adapter merged into plain weights that ``AutoModelFor...from_pretrained`` loads."""
        from peft import PeftModel

        base = load_base_model(self.spec, pad_token_id=self.tokenizer.pad_token_id)
        merged: Any = PeftModel.from_pretrained(base, str(checkpoint_dir)).merge_and_unload()

        def build(staging: Path) -> None:
            merged.save_pretrained(staging)
            self.tokenizer.save_pretrained(staging)

        return write_dir_atomically(Path(out_dir), build)
