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
"""Applying an ordinary optax transform to the LoRA factors only.

:func:`factorwise_transform` hands ``optax.scale_by_adam`` and the like the
``lora_a``/``lora_b`` leaves, leaf by leaf, with float32 state whatever the
parameter dtype; like the pairwise transforms (:mod:`adaprelora_jax._src.engine.pairwise`)
it owns the LoRA factors and their statistics probes only. For element-wise
rules this avoids the copies that stacking same-shaped pairs would cost.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import chex
import jax.numpy as jnp
import optax

from adaprelora_jax._src.discovery import plan as plan_lib
from adaprelora_jax._src.engine import nnx_labels
from adaprelora_jax._src.engine import slots as slots_lib
from adaprelora_jax._src.engine import state_layout

if TYPE_CHECKING:
  from adaprelora_jax._src.engine import routing


class FactorwiseState(NamedTuple):
  """State of :func:`factorwise_transform`.

  Attributes:
    factors: state of the inner transform, over a tree shaped like the params
      with float32 (or wider) arrays at the LoRA factors and
      ``optax.MaskedNode()`` elsewhere.
    layout_version: the state layout (int32,
      :data:`adaprelora_jax.STATE_LAYOUT_VERSION`).
  """

  factors: optax.OptState
  layout_version: chex.Array


def _factor_tree(plan: plan_lib.LoRAPlan, leaves: Sequence[Any]) -> Any:
  """The factor leaves in float32 (or wider), ``MaskedNode`` elsewhere."""
  tree: list[Any] = [optax.MaskedNode()] * plan.num_leaves
  for pair in plan.pairs:
    for index in (pair.a_index, pair.b_index):
      # The pair's dtype, not the leaf's: gradients wider than their
      # parameters must not widen the inner state.
      tree[index] = leaves[index].astype(slots_lib.state_dtype(jnp.float32, pair.dtype))
  return nnx_labels.unwrap_masked_nodes(plan.unflatten(tree))


def factorwise_transform(
  inner: optax.GradientTransformation,
  *,
  finder: routing.PairFinder,
) -> optax.GradientTransformationExtraArgs:
  """Applies ``inner`` to the LoRA factors, leaf by leaf.

  ``inner`` sees a tree shaped like the params that holds float32 (or wider,
  as the parameter) copies of the ``lora_a``/``lora_b`` leaves, in their own
  layout, and ``optax.MaskedNode()`` elsewhere, so its state is float32
  whatever the narrower parameter dtype, and keeps the dtypes of its
  ``init``; its updates are cast back to the parameter dtype.
  Pairs are validated as in :meth:`adaprelora_jax._src.engine.routing.PairFinder.plan`;
  statistics probes get zero updates.

  Args:
    inner: transform for the factor leaves (element-wise or per leaf).
    finder: finds the pairs; other leaves raise
      (:meth:`adaprelora_jax._src.engine.routing.PairFinder.create`).

  Returns:
    The :class:`optax.GradientTransformationExtraArgs`.
  """
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    plan = finder.plan(params)
    return FactorwiseState(
      factors=inner.init(_factor_tree(plan, plan.leaves(params))),
      layout_version=state_layout.version_leaf(),
    )

  def update_fn(updates, state, params=None, **extra_args):
    plan = finder.plan(params)
    grads = plan_lib.check_matching_tree(plan, updates, "gradient")
    param_leaves = plan.leaves(params)
    factor_updates, factors_state = inner.update(
      _factor_tree(plan, grads),
      state.factors,
      _factor_tree(plan, param_leaves),
      **extra_args,
    )
    # Float64 hyperparameters (NumPy scalars under x64) would widen float32
    # moments: keep the dtypes of init.
    factors_state = optax.tree.cast_like(factors_state, state.factors)
    factor_leaves = plan.leaves(factor_updates)
    out = list(grads)
    for pair in plan.pairs:
      for index in (pair.a_index, pair.b_index):
        out[index] = factor_leaves[index].astype(param_leaves[index].dtype)
    return plan.update_tree(out), FactorwiseState(factors_state, state.layout_version)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
