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
"""Tunix's YAML launcher with this library's optimizers selectable by name.

Tunix's ``tunix.cli.peft_main`` builds the optimizer of a YAML config with
``getattr(optax, opt_type)``, so ``adaprelora`` cannot be named there.
:class:`PeftPipeline` is Tunix's pipeline with one change: an ``opt_type`` of
:data:`OPTIMIZERS` builds that optimizer of this library, with its arguments
from the same ``optimizer_config`` section and the learning rate (a scalar,
or ``schedule_type`` and its arguments) read by Tunix's own machinery; every
other ``opt_type`` goes to Tunix unchanged. Run it as Tunix's launcher::

  python -m adaprelora_jax.tunix_cli base_config.yaml \\
    optimizer_config.opt_type=adaprelora optimizer_config.lora_scale=2.0

with, for example::

  optimizer_config:
    opt_type: adaprelora_adamw
    schedule_type: warmup_cosine_decay_schedule
    init_value: 0.0
    peak_value: 3.0e-3
    warmup_steps: 10
    decay_steps: 200
    weight_decay: 0.01
    lora_scale: 2.0        # qwix's alpha / rank
    statistics: tangent

**Static arguments.** Like Tunix, the optimizer is wrapped in
``optax.inject_hyperparams`` so that its learning rate is in the state and
logged. ``inject_hyperparams`` turns every numeric argument into a traced
float (so it can be scheduled) and takes every callable for a schedule;
arguments that select code rather than scale numbers must be listed in its
``static_args``: strings (``statistics``, ``tie_breaker``), booleans
(``project_gradients``, ``nesterov``), None, and callables that are not
schedules (``pairing``, ``mask``, ``decay_rate_fn``). :func:`create_optimizer`
passes every argument that is not a number as static; do the same when you
wrap these optimizers yourself, e.g.
``optax.inject_hyperparams(ap.adaprelora, static_args=("pairing",))``.

The model is built by Tunix from ``model_config`` (``lora_config`` uses
``qwix.LoraProvider``, hence tangent statistics): build it with
:class:`adaprelora_jax.qwix.LoraProvider` in your own script for exact ones.

This module calls Tunix's config helpers (the section lookup, the learning
rate and schedule builders of ``tunix.cli.config.HyperParameters``); it is
tested against the google-tunix of the package's ``integrations`` extra.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
import optax
from tunix.cli import peft_main

from adaprelora_jax import baselines
from adaprelora_jax import transform

__all__ = ["OPTIMIZERS", "PeftPipeline", "create_optimizer", "main"]

# The optimizers an ``opt_type`` may name (the full optimizers, not the
# ``scale_by_*`` cores).
OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
  "adaprelora": transform.adaprelora,
  "adaprelora_adamw": transform.adaprelora_adamw,
  "lora_plus": baselines.lora_plus,
  "scaled_gd": baselines.scaled_gd,
  "scaled_adamw": baselines.scaled_adamw,
  "lora_pro": baselines.lora_pro,
  "lora_rite": baselines.lora_rite,
}

# Keys of an optimizer section that Tunix reads itself.
_TUNIX_KEYS = ("opt_type", "schedule_type", "learning_rate")


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def create_optimizer(
  optimizer_config: Mapping[str, Any],
  learning_rate: optax.ScalarOrSchedule,
  *,
  schedule_keys: tuple[str, ...] = (),
  where: str = "optimizer_config",
) -> optax.GradientTransformation:
  """One of :data:`OPTIMIZERS` from a Tunix optimizer section.

  Args:
    optimizer_config: the section: ``opt_type`` and the optimizer's
      arguments by name.
    learning_rate: the learning rate or schedule Tunix built from the section.
    schedule_keys: the section's keys that are the schedule's arguments.
    where: the section's path, for messages.

  Returns:
    ``optax.inject_hyperparams(optimizer, static_args=..., hyperparam_dtype=
    float32)(learning_rate=..., **arguments)``, every non-numeric argument
    static (module docstring).

  Raises:
    ValueError: naming the section, for an ``opt_type`` not in
      :data:`OPTIMIZERS` or a key that is neither the optimizer's argument nor
      the schedule's.
  """
  name = str(optimizer_config["opt_type"]).lower()
  if name not in OPTIMIZERS:
    raise ValueError(f"{where}: opt_type {name!r} is not one of {sorted(OPTIMIZERS)}.")
  factory = OPTIMIZERS[name]
  parameters = inspect.signature(factory).parameters
  arguments = {}
  for key, value in optimizer_config.items():
    if key in _TUNIX_KEYS or key in schedule_keys:
      continue
    if key not in parameters:
      raise ValueError(
        f"{where}: {key!r} is not an argument of adaprelora_jax.{name} "
        f"(its arguments: {', '.join(parameters)})."
      )
    arguments[key] = value
  static = tuple(key for key, value in arguments.items() if not _is_number(value))
  injected = optax.inject_hyperparams(factory, static_args=static, hyperparam_dtype=jnp.float32)
  return injected(learning_rate=learning_rate, **arguments)


class PeftPipeline(peft_main.PeftPipeline):
  """Tunix's PEFT pipeline, with :data:`OPTIMIZERS` selectable by ``opt_type``."""

  def create_optimizer(self, *optimizer_keys: str) -> optax.GradientTransformation:
    """This library's optimizer if ``opt_type`` names one, else Tunix's."""
    section = self._get_nested_config(optimizer_keys) if optimizer_keys else {}
    if str(section.get("opt_type", "")).lower() not in OPTIMIZERS:
      return super().create_optimizer(*optimizer_keys)
    where = " -> ".join(optimizer_keys)
    learning_rate = self._create_learning_rate(section, where)
    if learning_rate is None:
      raise ValueError(f"{where}: give learning_rate, or schedule_type and its arguments.")
    schedule_keys: tuple[str, ...] = ()
    if section.get("schedule_type"):
      schedule = self._get_schedule_fn(section["schedule_type"], where)
      schedule_keys = tuple(inspect.signature(schedule).parameters)
    return create_optimizer(dict(section), learning_rate, schedule_keys=schedule_keys, where=where)


def main(argv: list[str], **kwargs: Any) -> None:
  """``tunix.cli.peft_main.main`` with :class:`PeftPipeline`."""
  pipeline = PeftPipeline(argv, **kwargs)
  pipeline.run_peft_trainer()


if __name__ == "__main__":
  from absl import app  # noqa: PLC0415  (Tunix's entry point uses absl)

  app.run(main)
