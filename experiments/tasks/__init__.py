"""Registered experiment tasks (name → :class:`experiments.tasks.base.Task`)."""

from experiments.tasks import digits
from experiments.tasks import flagship
from experiments.tasks import milton
from experiments.tasks import minilm
from experiments.tasks.base import Budget
from experiments.tasks.base import Task

TASKS: dict[str, Task] = {
  task.name: task
  for task in (
    minilm.BBC,
    minilm.SHAKESPEARE_GENRE,
    milton.TASK,
    digits.TASK,
    flagship.TASK,
    flagship.BBC_TASK,
  )
}

__all__ = ["Budget", "TASKS", "Task"]
