"""The task registry: ``data.task`` names one of these, and everything that depends on the task asks it here.

A task is named by its record shape; whether the model classifies or generates is a property
of the task (its head), not a second config field. Config validation, data preparation,
encoding, the loss DP-SGD clips, evaluation, the summary's headline metric, the base model
class and peft's ``TaskType`` all come from the :class:`TaskShape` that :func:`task_for` returns.

Adding a task shape: write its builder in the module of its family (``generative.py`` for a
new prompt/response layout, ``classification.py`` for a new labelled one) or in a new module
here if it learns differently (then with its own head), add it to ``TASKS`` below, and test
it in ``tests/common/test_tasks.py``. Nothing else names tasks.
"""

from __future__ import annotations

from fedtune.common.tasks.base import TaskShape
from fedtune.common.tasks.classification import CLASSIFICATION
from fedtune.common.tasks.generative import CHAT, INSTRUCTION, PROMPT_COMPLETION, QUESTION_ANSWER

TASKS: dict[str, TaskShape] = {
    t.name: t for t in (CLASSIFICATION, CHAT, PROMPT_COMPLETION, QUESTION_ANSWER, INSTRUCTION)
}
TASK_NAMES: tuple[str, ...] = tuple(TASKS)


def task_for(name: str) -> TaskShape:
    """The task called ``name``, or a ValueError that lists the known ones."""
    try:
        return TASKS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASK_NAMES)}") from None
