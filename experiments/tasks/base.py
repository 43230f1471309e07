"""What an experiment task provides to the runner, and what one run is and returns."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import optax
from flax import nnx

Batch = Any
SCHEDULES = ("constant", "warmup_cosine")


def example_order(num_examples: int, seed: int, step: int, batch_size: int) -> np.ndarray:
  """Indices of batch ``step``: a fresh seeded permutation every epoch.

  A pure function of its arguments, so every optimizer, learning rate and
  resumed run sees the same batches. The last partial batch of an epoch is
  dropped (one compiled shape).
  """
  per_epoch = num_examples // batch_size
  if per_epoch == 0:
    raise ValueError(f"batch_size {batch_size} > {num_examples} examples")
  epoch, position = divmod(step, per_epoch)
  order = np.random.default_rng([seed, epoch]).permutation(num_examples)
  return order[position * batch_size : (position + 1) * batch_size]


def limit(count: int, maximum: int | None) -> int:
  return count if maximum is None else min(count, maximum)


@dataclasses.dataclass(frozen=True)
class Budget:
  """Step budget of one run under a preset.

  Attributes:
    steps: optimizer steps per run.
    eval_every: evaluate the held-out metric every this many steps (and at the end).
    seeds: seeds per learning rate (LoRA init and data order).
    checkpoint_every: save a resumable checkpoint every this many steps.
    max_train_examples: use at most this many training examples (None: all).
    max_eval_examples: evaluate on at most this many held-out examples
      (None: all); a fixed subset, the same for every run.
    schedule: the learning rate over the run, for every optimizer alike:
      ``"constant"``, or ``"warmup_cosine"`` (linear warmup from 0 over
      ``warmup_fraction`` of the steps, then cosine decay to 0 at the last
      step).
    warmup_fraction: see ``schedule``.
  """

  steps: int
  eval_every: int
  seeds: int
  checkpoint_every: int = 0
  max_train_examples: int | None = None
  max_eval_examples: int | None = None
  schedule: str = "constant"
  warmup_fraction: float = 0.0

  def __post_init__(self):
    if self.schedule not in SCHEDULES:
      raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
    if not 0.0 <= self.warmup_fraction < 1.0:
      raise ValueError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")

  def learning_rate(self, peak: float) -> optax.ScalarOrSchedule:
    """The learning rate of a run whose (peak) learning rate is ``peak``."""
    if self.schedule == "constant":
      return peak
    return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=peak,
      warmup_steps=round(self.warmup_fraction * self.steps),
      decay_steps=self.steps,
      end_value=0.0,
    )


@dataclasses.dataclass(frozen=True)
class Task:
  """A LoRA fine-tuning task on real data.

  The runner guarantees identical LoRA initialization and data order across
  optimizers and learning rates: ``build_model(seed, ...)`` and
  ``train_batch(seed, step, budget)`` depend only on their arguments.

  Attributes:
    name: task name used on the command line and in result files.
    model: pretrained model description.
    dataset: data set description.
    metric: name of the final held-out metric.
    higher_is_better: direction of ``metric``.
    presets: step budgets, at least ``"smoke"`` and ``"full"``.
    build_model: ``(seed, exact_statistics) -> (model, trainable filter)``;
      ``exact_statistics`` selects ``adaprelora_jax.nn.LoRALinear`` over
      ``nnx.LoRALinear`` (same parameters and initial values).
    train_batch: ``(seed, step, budget) -> batch``.
    loss_fn: ``(model, batch) -> scalar``, differentiable.
    evaluate: ``(model, budget) -> {metric: value, ...}`` on held-out data.
    prepare: ``budget -> None``, one-time work shared by every run in the
      process (e.g. encoding the data set with frozen pretrained blocks);
      :func:`experiments.training.train` calls it before starting a run's
      clock, so the first run's seconds are not charged for it.
    trainer: trains one run in another loop than
      :func:`experiments.training.train` (e.g. Tunix's ``PeftTrainer``), with
      its signature and contract; None: that function.
  """

  name: str
  model: str
  dataset: str
  metric: str
  higher_is_better: bool
  presets: dict[str, Budget]
  build_model: Callable[[int, bool], tuple[nnx.Module, Any]]
  train_batch: Callable[[int, int, Budget], Batch]
  loss_fn: Callable[[nnx.Module, Batch], Any]
  evaluate: Callable[[nnx.Module, Budget], dict[str, float]]
  prepare: Callable[[Budget], None] = lambda budget: None
  trainer: Callable[..., Any] | None = None


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """Identity of one run."""

  task: str
  optimizer: str
  learning_rate: float
  seed: int
  preset: str
  steps: int

  def identity(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


@dataclasses.dataclass
class RunResult:
  """Outcome of one run (``model``/``optimizer`` are the live objects).

  Returned by :func:`experiments.training.train` and by a task's ``trainer``.

  ``seconds`` is the run's wall-clock time from building the model to the last
  evaluation, compilation included; the task's one-time ``prepare`` is not in it.
  """

  config: RunConfig
  final: dict[str, float]
  curves: dict[str, list[float]]
  seconds: float
  completed: bool
  model: nnx.Module
  optimizer: nnx.Optimizer
