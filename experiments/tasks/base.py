"""What an experiment task provides to the runner."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from flax import nnx

Batch = Any


@dataclasses.dataclass(frozen=True)
class Budget:
  """Step budget of one run under a preset.

  Attributes:
    steps: optimizer steps per run.
    eval_every: evaluate the held-out metric every this many steps (and at the end).
    seeds: seeds per learning rate (LoRA init and data order).
    checkpoint_every: save a resumable checkpoint every this many steps.
  """

  steps: int
  eval_every: int
  seeds: int
  checkpoint_every: int = 0


@dataclasses.dataclass(frozen=True)
class Task:
  """A LoRA fine-tuning task on real data.

  The runner guarantees identical LoRA initialization and data order across
  optimizers and learning rates: ``build_model(seed, ...)`` and
  ``train_batch(seed, step)`` depend only on their arguments.

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
    train_batch: ``(seed, step) -> batch``.
    loss_fn: ``(model, batch) -> scalar``, differentiable.
    evaluate: ``model -> {metric: value, ...}`` on held-out data.
  """

  name: str
  model: str
  dataset: str
  metric: str
  higher_is_better: bool
  presets: dict[str, Budget]
  build_model: Callable[[int, bool], tuple[nnx.Module, Any]]
  train_batch: Callable[[int, int], Batch]
  loss_fn: Callable[[nnx.Module, Batch], Any]
  evaluate: Callable[[nnx.Module], dict[str, float]]
