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
"""The pretraining recipe of the studies' base models, shared by both pretraining scripts.

:class:`PretrainConfig` (steps, batch, schedule, regularization) and
:func:`pretrain_optimizer`, full-parameter AdamW with linear warm-up and
cosine decay, as used by ``python -m experiments.pretrain_char_lm`` (the
character transformer) and ``python -m experiments.pretrain_llama`` (the
flagship's Llama 3).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import optax


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
  """Steps, batch, schedule and regularization of a pretraining run (not the model's)."""

  seed: int = 0
  steps: int = 2000
  batch_size: int = 32
  warmup_steps: int = 100
  peak_learning_rate: float = 3e-3
  final_learning_rate: float = 1e-4
  weight_decay: float = 0.1
  clip_norm: float = 1.0
  eval_every: int = 250


# Cached so that runs with equal configs share one transform object, which
# is static in the jitted step: it then compiles once per process.
@functools.cache
def pretrain_optimizer(config: PretrainConfig) -> optax.GradientTransformation:
  """Full-parameter AdamW of ``config``: clipping, linear warm-up, cosine decay.

  Weight decay applies to matrices only.
  """
  schedule = optax.warmup_cosine_decay_schedule(
    0.0, config.peak_learning_rate, config.warmup_steps, config.steps, config.final_learning_rate
  )

  # Decay matrices only, as is usual for transformers: shrinking gains,
  # biases and LayerNorm parameters only hurts.
  def decay_mask(params):
    return jax.tree.map(lambda p: p.ndim >= 2, params)

  return optax.chain(
    optax.clip_by_global_norm(config.clip_norm),
    optax.adamw(schedule, weight_decay=config.weight_decay, mask=decay_mask),
  )
