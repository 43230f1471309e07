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
"""Per-step metrics: what an optimizer's last update did, as a few scalars.

A pairwise optimizer built with ``metrics=True`` keeps a :class:`StepMetrics`
beside its state (:class:`WithMetricsState`): per-pair scalars of the last
update, aggregated over all pairs (stacked layers count one pair each). Every such optimizer reports
``factor_norm_a`` / ``factor_norm_b`` (``‖a‖_F`` and ``‖b‖_F`` before the
update), and its kernel adds its own: :func:`adaprelora_jax.scale_by_adaprelora`
the step's H-norm, the clipping factor, the tangent share and skipped pairs
(all free: the step computes them anyway);
:func:`adaprelora_jax.track_step_metrics`, which any chain can hold,
``update_norm``, ``‖s·(δa b + a δb)‖_F``: the first-order change of the
pair's weight for the updates reaching it, ``s`` the pairing's LoRA scale
(two 2r×2r Grams per pair, :func:`weight_change_norm`).
Each per-pair metric ``m`` becomes ``m/mean`` and ``m/max`` (``m/min`` for
factors in (0, 1], where the smallest is the notable one); a per-pair
``skipped`` flag becomes ``skipped_pairs`` (their number), and skipped pairs
are left out of the other aggregates. :func:`adaprelora_jax.step_metrics`
reads them from a whole optimizer state.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from adaprelora_jax._src.maths import linalg

# Per-pair factors in (0, 1] whose smallest value is the one to watch.
_MINIMUM_NOTABLE = frozenset({"clip_factor", "tangent_share"})
SKIPPED = "skipped"


class StepMetrics(NamedTuple):
  """Scalars describing an optimizer's last update.

  Attributes:
    values: ``{name: scalar}`` (float32; ``skipped_pairs`` int32), zeros
      before the first update. The names are fixed when the optimizer is
      initialized, so the state's structure never changes.
  """

  values: dict[str, jax.Array]


class WithMetricsState(NamedTuple):
  """State of a transform built with ``metrics=True``.

  A wrapper, like optax's ``InjectHyperparamsState``, so that the wrapped
  state keeps the structure it has without metrics (and checkpoints saved
  without them keep restoring into it).

  Attributes:
    inner_state: the transform's own state.
    metrics: the last update's :class:`StepMetrics`.
  """

  inner_state: Any
  metrics: StepMetrics


def weight_change_norm(
  lora_a: jax.Array, lora_b: jax.Array, delta_a: jax.Array, delta_b: jax.Array
) -> jax.Array:
  """``‖δa b + a δb‖_F`` from two 2r×2r Grams, without the d_in×d_out matrix.

  ``δa b + a δb = L R`` with ``L = [δa, a]`` (d_in, 2r) and
  ``R = [b; δb]`` (2r, d_out), and ``‖L R‖²_F = Σ (LᵀL) ∘ (R Rᵀ)``.
  """
  dtype = linalg.compute_dtype(lora_a, lora_b, delta_a, delta_b)
  left = jnp.concatenate([delta_a, lora_a], axis=-1).astype(dtype)
  right = jnp.concatenate([lora_b, delta_b], axis=-2).astype(dtype)
  squared = jnp.sum(linalg.matmul(left.T, left) * linalg.matmul(right, right.T))
  return jnp.sqrt(jnp.maximum(squared, 0.0))


def factor_norms(lora_a: jax.Array, lora_b: jax.Array) -> dict[str, jax.Array]:
  """One pair's metrics that every pairwise optimizer reports (above)."""
  dtype = linalg.compute_dtype(lora_a, lora_b)
  return {
    "factor_norm_a": jnp.linalg.norm(lora_a.astype(dtype)),
    "factor_norm_b": jnp.linalg.norm(lora_b.astype(dtype)),
  }


def aggregate(per_pair: Sequence[Mapping[str, jax.Array]]) -> dict[str, jax.Array]:
  """Aggregates per-pair metrics over pairs (module docstring).

  Args:
    per_pair: per group of pairs, ``{name: (pairs,) array}``; a name may be
      missing from some groups (e.g. the tangent share, for pairs without
      exact statistics) and is then aggregated over the groups that have it.

  Returns:
    ``{aggregate name: scalar}``, sorted by name. An aggregate over no
    (unskipped) pair is NaN.
  """
  skipped = [
    jnp.ravel(group[SKIPPED]) if SKIPPED in group else jnp.zeros(_num_pairs(group), bool)
    for group in per_pair
  ]
  out: dict[str, jax.Array] = {}
  names = sorted({name for group in per_pair for name in group} - {SKIPPED})
  for name in names:
    kept = [
      (jnp.ravel(group[name]).astype(jnp.float32), ~skip)
      for group, skip in zip(per_pair, skipped, strict=True)
      if name in group
    ]
    values = jnp.concatenate([value for value, _ in kept])
    valid = jnp.concatenate([ok for _, ok in kept])
    count = jnp.sum(valid)
    total = jnp.sum(jnp.where(valid, values, 0.0))
    out[f"{name}/mean"] = jnp.where(count > 0, total / jnp.maximum(count, 1), jnp.nan)
    if name in _MINIMUM_NOTABLE:
      extreme = jnp.min(jnp.where(valid, values, jnp.inf))
      out[f"{name}/min"] = jnp.where(count > 0, extreme, jnp.nan)
    else:
      extreme = jnp.max(jnp.where(valid, values, -jnp.inf))
      out[f"{name}/max"] = jnp.where(count > 0, extreme, jnp.nan)
  if any(SKIPPED in group for group in per_pair):
    out["skipped_pairs"] = jnp.sum(jnp.concatenate(skipped), dtype=jnp.int32)
  return out


def _num_pairs(group: Mapping[str, jax.Array]) -> int:
  return jnp.size(next(iter(group.values())))
