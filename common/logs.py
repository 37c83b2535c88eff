"""Readable logs: fedtune's own INFO lines, libraries' chatter kept to warnings and errors."""

from __future__ import annotations

import logging
import warnings

_QUIET_WARNINGS = (
    "Optimal order is the largest alpha",  # Opacus RDP on short histories; the bound is still valid
    "Full backward hook is firing",  # Opacus hooks on frozen-input modules; expected with LoRA
    "`is_gradient_checkpointing` is deprecated",
)


def configure_logging(level: int = logging.INFO) -> None:
    logger = logging.getLogger("fedtune")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level)
    for name in ("transformers", "httpx", "urllib3", "matplotlib", "peft"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    for message in _QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=f".*{message}.*")
