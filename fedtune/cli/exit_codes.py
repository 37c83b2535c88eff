"""The documented exit statuses of ``fedtune`` (README, "Exit statuses")."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    #: The job ran and did not succeed: data not trainable, a federation that could not go on.
    FAILED = 1
    #: Bad usage, configuration or input files; nothing was run.
    USAGE = 2
    #: The base model could not be fetched or loaded (package index unreachable, unknown model).
    MODEL = 3
    #: Interrupted (Ctrl-C); a simulation can be resumed.
    INTERRUPTED = 130
