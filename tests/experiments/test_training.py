"""Tests for experiments.training beyond checkpointing (see test_checkpointing)."""

import dataclasses

from experiments import optimizers
from experiments import training
from experiments.tasks import TASKS
from experiments.tasks.base import RunConfig
from experiments.training import train

TASK = TASKS["digits"]


def test_one_time_task_preparation_is_not_charged_to_the_run(monkeypatch):
  # A fake clock that only `prepare` moves by a day: if train started its
  # clock before preparing, the run would report at least a day.
  clock = {"now": 0.0}
  monkeypatch.setattr(training.time, "perf_counter", lambda: clock["now"])
  calls = []

  def prepare(budget):
    calls.append(budget)
    clock["now"] += 86_400.0

  task = dataclasses.replace(TASK, prepare=prepare)
  budget = dataclasses.replace(TASK.presets["smoke"], steps=2, eval_every=2)
  result = train(
    task,
    optimizers.OPTIMIZERS["adamw"],
    RunConfig("digits", "adamw", 1e-3, 0, "smoke", 2),
    budget,
    progress=False,
  )
  assert calls == [budget]
  assert result.completed
  assert result.seconds == 0.0
