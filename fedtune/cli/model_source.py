"""Which fine-tuned model a command means: a run directory's, a checkpoint's or a bare merged directory's.

``fedtune evaluate``, ``predict`` and ``generate`` take one PATH:

- a run directory (``run.json``): its merged model, else the checkpoint ``best.json`` kept, else the newest;
- a checkpoint directory (``RUN_DIR/checkpoints/round-0003``): that round's adapter on the base model;
- a merged model directory (``config.json`` of a Hugging Face model): read as the run exported it,
  with the config from its ``fedtune.json``, or from ``--config``/``--preset`` when it has none.

The config tells the task, the agreed labels, how to read data files and where the base model is.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from fedtune.common.config import ConfigError, FedtuneConfig, ModelConfig, config_from_dict
from fedtune.common.models.builtin import ModelFetchError
from fedtune.common.tasks.base import TaskShape
from fedtune.common.tasks.registry import task_for
from fedtune.server.checkpoints import CheckpointStore
from fedtune.server.exported_model import portable_config, read_export_record


@dataclass(frozen=True)
class TrainedModel:
    """A fine-tuned model and the run config it was trained with (``raw_config``, as stored)."""

    raw_config: dict[str, Any]
    config_base: Path  # what relative paths in raw_config are relative to
    description: str  # for the console and eval.json, e.g. "runs/x/merged (round 5)"
    default_out: Path
    merged_dir: Path | None = None
    checkpoint_dir: Path | None = None
    round: int | None = None

    @property
    def task(self) -> TaskShape:
        name = self.raw_config.get("data", {}).get("task", "question-answer")
        try:
            return task_for(name)
        except (KeyError, ValueError) as exc:
            raise ConfigError(f"{self.description}: data.task = {name!r} is not a task fedtune knows") from exc

    @property
    def max_length(self) -> int:
        return int(self.raw_config.get("model", {}).get("max_length", ModelConfig().max_length))

    def model_config(self) -> ModelConfig:
        """The base model's section, paths resolved; a ConfigError when it no longer validates."""
        raw = dict(self.raw_config.get("model", {}))
        if isinstance(raw.get("path"), str):
            raw["path"] = str((self.config_base / raw["path"]).resolve())
        try:
            return ModelConfig.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            raise ConfigError(f"{self.description}: model.{'.'.join(map(str, first['loc']))}: {first['msg']}") from exc

    def labels(self) -> list[str]:
        """The agreed labels: the merged model's own ``id2label`` where there is one, else the config's."""
        if not self.task.classifies:
            return []
        if self.merged_dir is not None:
            id2label = json.loads((self.merged_dir / "config.json").read_text(encoding="utf-8")).get("id2label")
            if id2label:
                return [str(id2label[k]) for k in sorted(id2label, key=int)]
        data = self.raw_config.get("data", {})
        if data.get("labels"):
            return [str(x) for x in data["labels"]]
        if data.get("labels_file"):
            path = self.config_base / data["labels_file"]
            if path.exists():
                return [str(x) for x in json.loads(path.read_text(encoding="utf-8"))]
        raise ConfigError(
            f"{self.description}: the agreed labels are unknown (no id2label, data.labels or data.labels_file); "
            "give --config with the labels"
        )

    def config_for(self, data_path: Path, overrides: list[str]) -> FedtuneConfig:
        """The run's config reading ``data_path`` as its data (the server's own files dropped), overrides applied."""
        raw = copy.deepcopy(self.raw_config)
        data = raw.setdefault("data", {})
        for key in ("path", "test_path", "site_paths", "labels_file"):
            data.pop(key, None)
        data["path"] = str(Path(data_path).expanduser().resolve())
        labels = self.labels()
        if labels:
            data["labels"] = labels
        if raw.get("partition", {}).get("scheme") == "files":
            raw["partition"]["scheme"] = "iid"
        model = raw.get("model", {})
        if self.merged_dir is not None and model.get("path") and not (self.config_base / model["path"]).exists():
            del model["path"]  # the base model stayed behind; the merged weights do not need it
        return config_from_dict(raw, f"the config of {self.description}", self.config_base, overrides)

    def load(self) -> tuple[Any, Any]:
        """The fine-tuned model (eval mode) and its tokenizer."""
        if self.merged_dir is not None:
            return _load_merged(self.merged_dir, self.task.classifies, self.model_config().dtype)
        assert self.checkpoint_dir is not None
        return _load_checkpoint(self, self.checkpoint_dir)

    def load_base(self) -> tuple[Any, Any]:
        """The base model the run started from (eval mode) and its tokenizer."""
        from fedtune.common.models.loading import BaseModelSpec, load_base_model, load_tokenizer, resolve_model_dir

        seed = int(self.raw_config.get("run", {}).get("seed", 0))
        model_cfg = self.model_config()
        spec = BaseModelSpec(
            resolve_model_dir(model_cfg, seed),
            self.task.name,
            model_cfg.dtype,
            tuple(self.labels()),
            model_cfg.pooling,
            model_cfg.quantization,  # the base the adapter was trained on, quantised as it was
        )
        tokenizer = load_tokenizer(spec)
        return _loaded(spec.directory, lambda: load_base_model(spec, tokenizer.pad_token_id)).eval(), tokenizer


def _loaded(directory: Path, load: Any) -> Any:
    """``load()``, its failure said as a ModelFetchError naming ``directory`` (exit status 3, one line)."""
    try:
        return load()
    except (OSError, ValueError, KeyError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelFetchError(f"{directory}: the model could not be loaded: {reason}") from exc


def _load_merged(directory: Path, classifies: bool, dtype: str) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedtune.common.models.loading import load_exported_classifier
    from fedtune.common.models.pooling import register_exported_config

    register_exported_config()  # a mean-pooled classifier's config.json names fedtune's own model type
    tokenizer = _loaded(directory, lambda: AutoTokenizer.from_pretrained(directory))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if classifies:
        return _loaded(directory, lambda: load_exported_classifier(directory)), tokenizer
    model = _loaded(directory, lambda: AutoModelForCausalLM.from_pretrained(directory, dtype=getattr(torch, dtype)))
    return model.eval(), tokenizer


def _load_checkpoint(trained: TrainedModel, checkpoint: Path) -> tuple[Any, Any]:
    from peft import PeftModel

    base, tokenizer = trained.load_base()
    return _loaded(checkpoint, lambda: PeftModel.from_pretrained(base, str(checkpoint))).eval(), tokenizer


def _kept_checkpoint(run_dir: Path) -> tuple[Path, int] | None:
    """The checkpoint the run kept (``best.json``), else its newest one."""
    store = CheckpointStore(run_dir / "checkpoints")
    rounds = store.rounds()
    best_file = run_dir / "best.json"
    if best_file.exists():
        kept = json.loads(best_file.read_text(encoding="utf-8")).get("kept-round")
        if isinstance(kept, int) and kept in rounds:
            return store.path_for(kept), kept
    return (store.path_for(rounds[-1]), rounds[-1]) if rounds else None


def _run_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "config.json"
    if not path.exists():
        raise ConfigError(f"{run_dir} has run.json but no config.json: not a complete fedtune run directory")
    return json.loads(path.read_text(encoding="utf-8"))


def _given_config(given: FedtuneConfig | None) -> dict[str, Any] | None:
    if given is None:
        return None
    from fedtune.common.data.federation_data import agreed_labels

    return portable_config(given, agreed_labels(given))


def locate(path: Path, given: FedtuneConfig | None = None) -> TrainedModel:
    """The model at ``path`` (see the module docstring); ``given`` (``--config``/``--preset``) replaces the stored
    config. A path that is none of these is a one-line error naming it."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such run or model directory")
    if not path.is_dir():
        raise ConfigError(f"{path} is a file: give a run directory, a checkpoint directory or a merged model directory")
    given_raw = _given_config(given)
    if (path / "run.json").exists():
        raw = given_raw or _run_config(path)
        if (path / "merged" / "config.json").exists():
            record = read_export_record(path / "merged")
            round_ = record.round if record else None
            merged = path / "merged"
            where = f"{merged} (round {round_})" if round_ is not None else str(merged)
            return TrainedModel(raw, path, where, path / "eval", merged_dir=merged, round=round_)
        kept = _kept_checkpoint(path)
        if kept is None:
            raise ConfigError(f"{path}: the run has no merged model and no checkpoint yet; nothing to load")
        return TrainedModel(
            raw, path, f"{kept[0]} (round {kept[1]})", path / "eval", checkpoint_dir=kept[0], round=kept[1]
        )
    if (path / "adapter_config.json").exists():
        run_dir = path.parent.parent
        round_info = path / "round.json"
        round_ = json.loads(round_info.read_text(encoding="utf-8")).get("round") if round_info.exists() else None
        if given_raw is None and not (run_dir / "run.json").exists():
            raise ConfigError(f"{path}: an adapter outside its run directory: give --config or --preset")
        raw = given_raw or _run_config(run_dir)
        return TrainedModel(raw, run_dir, str(path), run_dir / "eval", checkpoint_dir=path, round=round_)
    if (path / "config.json").exists():
        record = read_export_record(path)
        stored = given_raw or (record.config if record else None)
        if stored is None:
            raise ConfigError(
                f"{path} has no fedtune.json (exported by an older fedtune, or not by fedtune): give --config FILE "
                "or --preset NAME, the config it was trained with"
            )
        round_ = record.round if record else None
        where = f"{path} (round {round_})" if round_ is not None else str(path)
        return TrainedModel(stored, path, where, path.parent / "eval", merged_dir=path, round=round_)
    raise ConfigError(
        f"{path} is neither a fedtune run directory (run.json), a checkpoint (adapter_config.json) nor a model "
        "directory (config.json)"
    )
