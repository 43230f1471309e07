# Copyright 2026 The adaprelora_jax Authors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Tunix training hooks: the optimizer's step metrics in the trainer's logs.

Needs google-tunix (the ``integrations`` extra).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tunix.sft import hooks

from adaprelora_jax import reports


class StepMetricsHook(hooks.TrainingHooks):
  """Logs :func:`adaprelora_jax.step_metrics` to a Tunix trainer's metrics logger.

  Each update's metrics go to ``train_ctx.metrics_logger`` under
  ``prefix + name`` in the train mode, at the step Tunix logs that update's
  loss at (``train_ctx.train_steps`` after the update), so loss and metrics
  line up. They are read when the next step starts (Tunix calls no hook
  between an update and the next one otherwise) and, like Tunix's own
  metrics, fetched from the device one step later, so logging does not wait
  for the step that is running; the last step's are logged at the end of
  training. A resumed run logs from its first new update on. Build the
  optimizer with ``metrics=True`` (or
  :func:`adaprelora_jax.track_step_metrics` in its chain).

  Example::

    trainer = peft_trainer.PeftTrainer(model, ap.adaprelora(1e-3, metrics=True), config)
    trainer.with_training_hooks(StepMetricsHook())

  Args:
    prefix: prepended to every metric name.
  """

  def __init__(self, prefix: str = "optimizer/"):
    self.prefix = prefix
    self._pending: tuple[int, dict[str, jax.Array]] | None = None
    self._last_step = -1

  def _take(self, train_ctx: Any) -> None:
    """Copies the current update's metrics, unless this step was taken."""
    step = train_ctx.train_steps
    if step <= self._last_step:
      return
    self._flush(train_ctx)
    # Copies, dispatched now: the trainer may donate the optimizer state's
    # buffers to the next step before these are read.
    metrics = reports.step_metrics(train_ctx.optimizer.opt_state)
    self._pending = (step, {name: jnp.copy(value) for name, value in metrics.items()})
    self._last_step = step

  def _flush(self, train_ctx: Any) -> None:
    if self._pending is None:
      return
    step, metrics = self._pending
    self._pending = None
    for name, value in jax.device_get(metrics).items():
      train_ctx.metrics_logger.log(
        train_ctx.metrics_prefix, self.prefix + name, np.asarray(value), "train", step
      )

  def on_train_start(self, train_ctx: Any) -> None:
    # A restored state holds the metrics of an update logged before.
    self._last_step = train_ctx.train_steps

  def on_train_step_start(self, train_ctx: Any) -> None:
    # The state holds the last update's metrics until this step's update.
    self._take(train_ctx)

  def on_train_step_end(self, train_ctx: Any, train_step: int, train_loss: float) -> None:
    del train_ctx, train_step, train_loss

  def on_train_end(self, train_ctx: Any) -> None:
    self._take(train_ctx)
    self._flush(train_ctx)

  def on_eval_step_start(self, train_ctx: Any) -> None:
    del train_ctx

  def on_eval_step_end(self, train_ctx: Any, eval_loss: float) -> None:
    del train_ctx, eval_loss
