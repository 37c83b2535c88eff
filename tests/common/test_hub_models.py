"""A base model named by its Hugging Face id, read from a hub cache built here: never the network.

The cache is laid out as huggingface_hub writes it (``models--owner--name/refs/<branch>`` holding
a commit hash, ``snapshots/<commit>/`` the files); HF_HUB_CACHE points at it and HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from fedtune.common.config import ConfigError, ModelConfig, load_config
from fedtune.common.models.hub import hub_cache_dir, is_hub_id
from fedtune.common.models.loading import resolve_model_dir
from fedtune.common.models.lora import build_adapted_model, checked_model_spec
from fedtune.common.models.tiny import resolve_tiny

MAIN, PINNED = "a" * 40, "b" * 40


def _snapshot(cache: Path, repo_id: str, commit: str, source: Path, refs: tuple[str, ...] = ()) -> Path:
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    shutil.copytree(source, snapshot)
    for ref in refs:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)  # no newline, as huggingface_hub writes it
    return snapshot


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An offline hub cache holding hospital-ai/tiny-bert at main (seed 0) and at a pinned commit tagged v1 (seed 1)."""
    cache = tmp_path / "hub"
    _snapshot(cache, "hospital-ai/tiny-bert", MAIN, resolve_tiny("tiny-bert", 0), refs=("main",))
    _snapshot(cache, "hospital-ai/tiny-bert", PINNED, resolve_tiny("tiny-bert", 1), refs=("v1",))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_a_hub_id_in_the_cache_resolves_offline_and_builds(hub_cache):
    cfg = load_config(None, ["model.name='hospital-ai/tiny-bert'"])
    spec = checked_model_spec(cfg)  # the start of a run: resolved, LoRA targets checked
    assert spec.directory == hub_cache / "models--hospital-ai--tiny-bert" / "snapshots" / MAIN
    model, tokenizer = build_adapted_model(spec, cfg.lora)
    assert model.config.model_type == "bert" and tokenizer("hello")["input_ids"]


@pytest.mark.parametrize("revision", [PINNED, "v1"])
def test_a_pinned_revision_resolves_to_its_own_snapshot(hub_cache, revision):
    directory = resolve_model_dir(ModelConfig(name="hospital-ai/tiny-bert", revision=revision))
    assert directory == hub_cache / "models--hospital-ai--tiny-bert" / "snapshots" / PINNED
    main = resolve_model_dir(ModelConfig(name="hospital-ai/tiny-bert"))
    assert (directory / "model.safetensors").read_bytes() != (main / "model.safetensors").read_bytes()


def test_a_model_absent_from_the_cache_says_what_to_copy_where(hub_cache):
    with pytest.raises(ConfigError) as info:
        resolve_model_dir(
            ModelConfig(name="Qwen/Qwen2.5-0.5B-Instruct", revision="7ae557604adf67be50417f59c2c2f167def9a775")
        )
    assert str(info.value) == (
        "model.name = 'Qwen/Qwen2.5-0.5B-Instruct' (model.revision = '7ae557604adf67be50417f59c2c2f167def9a775'): "
        f"not in the Hugging Face cache at {hub_cache} (HF_HUB_OFFLINE is set); on a machine with internet run "
        "`hf download Qwen/Qwen2.5-0.5B-Instruct --revision 7ae557604adf67be50417f59c2c2f167def9a775` and copy its "
        "models--Qwen--Qwen2.5-0.5B-Instruct folder (from ~/.cache/huggingface/hub, or $HF_HOME/hub) into "
        f"{hub_cache}, or set model.path to a local model directory"
    )
    with pytest.raises(ConfigError, match=r"hospital-ai/tiny-bert.*revision = 'v2'.*--revision v2"):
        resolve_model_dir(ModelConfig(name="hospital-ai/tiny-bert", revision="v2"))  # cached, but not that tag


def test_an_unreachable_hub_gives_the_same_line(hub_cache, monkeypatch):
    """Online but no route to the hub: the download fails with a connection error, said in one line."""
    import huggingface_hub

    real = huggingface_hub.snapshot_download

    def no_network(*args, local_files_only=False, **kwargs):
        if not local_files_only:
            raise OSError("Connection refused\nsecond line")
        return real(*args, local_files_only=True, **kwargs)

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    with pytest.raises(ConfigError) as info:
        resolve_model_dir(ModelConfig(name="hospital-ai/absent"))
    assert "(the hub could not be reached: Connection refused); on a machine with internet run" in str(info.value)
    assert "\n" not in str(info.value)
    assert resolve_model_dir(ModelConfig(name="hospital-ai/tiny-bert")).name == MAIN  # cached: no network call


def test_a_cached_repository_that_is_not_a_base_model_is_named(hub_cache, tmp_path):
    weights_only = tmp_path / "weights-only"
    weights_only.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(resolve_tiny("tiny-bert") / name, weights_only / name)
    _snapshot(hub_cache, "hospital-ai/no-tokenizer", MAIN, weights_only, refs=("main",))
    with pytest.raises(ConfigError, match=r"^model.name = 'hospital-ai/no-tokenizer': .* has no tokenizer"):
        resolve_model_dir(ModelConfig(name="hospital-ai/no-tokenizer"))


def test_config_accepts_hub_ids_and_refuses_a_revision_without_one():
    assert (
        load_config(None, ["model.name='Qwen/Qwen2.5-0.5B-Instruct'", "model.revision=main"]).model.revision == "main"
    )
    with pytest.raises(ConfigError, match="model.revision = 'main' applies to a Hugging Face model id"):
        load_config(None, ["model.name='tiny-bert'", "model.revision=main"])
    with pytest.raises(ConfigError, match="'not/a/hub/id' is not a built-in model"):
        load_config(None, ["model.name='not/a/hub/id'"])
    assert [is_hub_id(n) for n in ("Qwen/Qwen2.5-0.5B-Instruct", "gpt2", "a/b/c", "a/../b", "/abs", "org/x--y")] == [
        True,
        False,
        False,
        False,
        False,
        False,
    ]


def test_the_cache_is_found_by_huggingface_hubs_own_precedence(monkeypatch, tmp_path):
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    assert hub_cache_dir() == Path.home() / ".cache" / "huggingface" / "hub"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub_cache_dir() == tmp_path / "xdg" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub_cache_dir() == tmp_path / "home" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    assert hub_cache_dir() == tmp_path / "cache"
