"""Base models named by their Hugging Face id (``model.name = "Qwen/Qwen2.5-0.5B-Instruct"``), read from the hub cache.

A hospital's machine is often offline, so the cache comes first: a snapshot already in
``huggingface_hub``'s cache (``HF_HUB_CACHE``, else ``HF_HOME/hub``, else
``~/.cache/huggingface/hub``) is used as it is, with no network call, the same on every
start. Only a model not yet cached is downloaded, and only when the hub may be reached
(``HF_HUB_OFFLINE`` unset). Otherwise one line says what to copy where. Only what a base
model needs is fetched (config, safetensors weights, tokenizer files): no ``.bin`` duplicates,
GGUF, ONNX or original checkpoints.

The cache location and offline switch are read from the environment on every call, not when
``huggingface_hub`` is first imported (its ``constants``), so a process that sets them late
(a test, a site's start script) is obeyed.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

#: A hub model id: ``owner/name`` of letters, digits, ``-``, ``_`` and ``.`` (huggingface_hub's repo-id rule).
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")
#: The files of a repository a base model is loaded from (weights, configs, tokenizer, chat template).
BASE_MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
_TRUE = {"1", "true", "yes", "on"}


class HubModelError(RuntimeError):
    """A model named by its hub id is not in the cache and cannot be fetched; the message says what to do."""


def is_hub_id(name: str) -> bool:
    """Whether ``model.name`` names a Hugging Face repository (``owner/name``) rather than a built-in model."""
    return HUB_ID.fullmatch(name) is not None and ".." not in name and "--" not in name


def hub_cache_dir() -> Path:
    """huggingface_hub's cache, by its own precedence: HF_HUB_CACHE, HUGGINGFACE_HUB_CACHE, HF_HOME/hub, XDG."""
    env = os.environ
    explicit = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(os.path.expandvars(explicit)).expanduser()
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or the older ``TRANSFORMERS_OFFLINE``) forbids any call to the hub."""
    return any(os.environ.get(var, "").strip().lower() in _TRUE for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def cache_folder(repo_id: str) -> str:
    """The folder a repository's snapshots live in, under the cache (``models--owner--name``)."""
    return "models--" + repo_id.replace("/", "--")


def _not_cached(repo_id: str, revision: str | None, cache: Path, reason: str) -> HubModelError:
    pinned = f" --revision {revision}" if revision else ""
    return HubModelError(
        f"model.name = {repo_id!r}{f' (model.revision = {revision!r})' if revision else ''}: not in the Hugging Face "
        f"cache at {cache} ({reason}); on a machine with internet run `hf download {repo_id}{pinned}` and copy its "
        f"{cache_folder(repo_id)} folder (from ~/.cache/huggingface/hub, or $HF_HOME/hub) into {cache}, "
        "or set model.path to a local model directory"
    )


def resolve_hub_model(repo_id: str, revision: str | None = None) -> Path:
    """The local snapshot directory of ``repo_id`` at ``revision`` (a branch, tag or commit; None: ``main``).

    Cached: returned without a network call. Not cached: downloaded once unless offline.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    cache = hub_cache_dir()

    def snapshot(local_files_only: bool) -> Path:
        return Path(
            snapshot_download(
                repo_id,
                revision=revision,
                cache_dir=cache,
                allow_patterns=BASE_MODEL_FILES,
                local_files_only=local_files_only,
            )
        )

    try:
        return snapshot(local_files_only=True)
    except LocalEntryNotFoundError:
        pass
    if hub_offline():
        raise _not_cached(repo_id, revision, cache, "HF_HUB_OFFLINE is set") from None
    try:
        return snapshot(local_files_only=False)
    except (RepositoryNotFoundError, RevisionNotFoundError):
        raise _not_cached(
            repo_id, revision, cache, "the hub has no such repository or revision, or it is gated: set HF_TOKEN"
        ) from None
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise _not_cached(repo_id, revision, cache, f"the hub could not be reached: {first}") from None
