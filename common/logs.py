"""Readable logs: a quiet console, the details in log files.

The console shows fedtune's warnings and errors (``verbose``: its INFO lines and Flower's
and Ray's chatter too); a log file, when given, receives everything at DEBUG from
fedtune and Flower, so a run's directory holds what happened even when the console was
quiet.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

_QUIET_WARNINGS = (
    "Optimal order is the largest alpha",  # Opacus RDP on short histories; the bound is still valid
    "Full backward hook is firing",  # Opacus hooks on frozen-input modules; expected with LoRA
    "`is_gradient_checkpointing` is deprecated",
)
_FORMAT = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
_LIBRARIES = ("transformers", "httpx", "urllib3", "matplotlib", "peft", "ray", "filelock")


class _ConsoleHandler(logging.StreamHandler):
    """fedtune's own console handler (told apart from file handlers when reconfigured)."""


def configure_logging(verbose: bool = False, log_file: Path | None = None, *, service: bool = False) -> None:
    """Console at WARNING (INFO and library DEBUG when ``verbose``); ``log_file`` gets everything.

    ``service``: a process that Flower's deployment engine runs (the ServerApp under a
    SuperLink, a ClientApp under a SuperNode), whose console is the operator's log stream
    (``flwr run --stream``, the SuperNode's log): fedtune's INFO lines, and Flower's own
    console handler left as Flower set it, so its errors reach the operator.
    """
    logger = logging.getLogger("fedtune")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    console = next((h for h in logger.handlers if isinstance(h, _ConsoleHandler)), None)
    if console is None:
        console = _ConsoleHandler()
        console.setFormatter(_FORMAT)
        logger.addHandler(console)
    console.setLevel(logging.INFO if verbose or service else logging.WARNING)
    for name in _LIBRARIES:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.ERROR)
    if not service:
        _quiet_flower(verbose)
    if log_file is not None:
        add_log_file(log_file)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    for message in _QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=f".*{message}.*")


def _quiet_flower(verbose: bool) -> None:
    """Flower's own console handler prints INFO and DEBUG lines; they go to the log file unless verbose."""
    from flwr.common.logger import update_console_handler

    update_console_handler(level=logging.DEBUG if verbose else logging.CRITICAL + 1)
    # Ray installs a handler on the root logger; Flower's DEBUG records must not reach it.
    logging.getLogger("flwr").propagate = False


def add_log_file(path: Path) -> Path:
    """Send fedtune's and Flower's records, at DEBUG, to ``path`` too (once per path)."""
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    for name in ("fedtune", "flwr"):
        logger = logging.getLogger(name)
        if not any(isinstance(h, logging.FileHandler) and Path(h.baseFilename) == path for h in logger.handlers):
            handler = logging.FileHandler(path, encoding="utf-8")
            handler.setLevel(logging.DEBUG)
            handler.setFormatter(_FORMAT)
            logger.addHandler(handler)
    return path
