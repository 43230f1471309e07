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
"""What every LoRA transform does around its rule: find pairs, route leaves.

:class:`Router` finds and validates the LoRA pairs of the params (the one
place a transform resolves its ``pairing``), hands the leaves that are not
LoRA factors to a fallback transform, and gives the exact-statistics probe
leaves of :class:`adaprelora_jax.nn.LoRA` zero updates. Both engines,
:func:`adaprelora_jax.pairwise.pairwise_transform` and
:func:`adaprelora_jax.factorwise.factorwise_transform`, use it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adaprelora_jax import nnx_metadata
from adaprelora_jax import pairing as pairing_lib
from adaprelora_jax import pairs as pairs_lib
from adaprelora_jax import plan as plan_lib


def default_non_lora(
  non_lora: optax.GradientTransformation | None,
) -> optax.GradientTransformation:
  """The fallback for leaves that are not LoRA factors: Adam unless given."""
  return optax.scale_by_adam() if non_lora is None else non_lora


class Router(NamedTuple):
  """Pair finding and leaf routing for one transform.

  Build it with :meth:`create`, which fails early on a bad pairing.

  Attributes:
    owner: the transform's public name, for error messages.
    pairing: the resolved pairing function.
    non_lora: transform for leaves that are not LoRA factors.
    strict: raise if the params contain leaves that are not LoRA factors.
    statistics: which pairs receive exact statistics (see
      :func:`adaprelora_jax.plan.plan_pairs`).
    check_pair: called with every pair found; raises for pairs the rule
      cannot handle.
  """

  owner: str
  pairing: pairing_lib.PairingFn
  non_lora: optax.GradientTransformation
  strict: bool
  statistics: pairing_lib.Statistics
  check_pair: Callable[[pairs_lib.PairInfo], None] | None = None

  @classmethod
  def create(
    cls,
    owner: str,
    pairing: pairing_lib.Pairing,
    non_lora: optax.GradientTransformation | None,
    strict: bool,
    statistics: pairing_lib.Statistics = "tangent",
    check_pair: Callable[[pairs_lib.PairInfo], None] | None = None,
  ) -> Router:
    """A router; ``non_lora=None`` means :func:`default_non_lora`.

    Raises:
      ValueError: for an unknown pairing preset name.
    """
    return cls(
      owner,
      pairing_lib.resolve_pairing(pairing),
      default_non_lora(non_lora),
      strict,
      statistics,
      check_pair,
    )

  def plan(self, params: Any) -> plan_lib.LoRAPlan:
    """The validated pairs of ``params`` (errors name the parameter paths)."""
    if params is None:
      raise ValueError(
        f"{self.owner} needs the params to find the LoRA pairs: call update(grads, state, params)."
      )
    plan = plan_lib.plan_pairs(params, self.pairing, strict=self.strict, statistics=self.statistics)
    if self.check_pair is not None:
      for pair in plan.pairs:
        self.check_pair(pair)
    return plan

  def non_lora_transform(self, plan: plan_lib.LoRAPlan) -> optax.GradientTransformation:
    return optax.masked(self.non_lora, plan.other_mask())

  def init_non_lora(self, plan: plan_lib.LoRAPlan, params: Any) -> optax.OptState:
    """The fallback's state, masked positions as bare ``MaskedNode``s.

    ``optax.masked`` leaves a flax ``Variable`` holding a ``MaskedNode`` at
    each masked position of an ``nnx.State``; the bare node has the same (no)
    leaves and keeps Orbax restores working
    (:func:`adaprelora_jax.nnx_metadata.unwrap_masked_nodes`). :meth:`finish`
    reads the state back in ``optax.masked``'s own structure.
    """
    return nnx_metadata.unwrap_masked_nodes(self.non_lora_transform(plan).init(params))

  def finish(
    self,
    plan: plan_lib.LoRAPlan,
    out: list[Any],
    updates: Any,
    non_lora_state: optax.OptState,
    params: Any,
  ) -> tuple[Any, optax.OptState]:
    """Zero updates for statistics probes and the fallback for other leaves.

    Args:
      plan: the params' plan.
      out: the flattened updates with the LoRA factors already set.
      updates: the incoming updates (for the fallback).
      non_lora_state: the fallback's state.
      params: the params.

    Returns:
      The update tree and the fallback's new state.
    """
    for index in plan.statistics_indices:
      # Statistics probes are not parameters to move.
      out[index] = jnp.zeros_like(out[index])
    if plan.other_indices:
      transform = self.non_lora_transform(plan)
      # Back from init_non_lora's bare MaskedNodes: same leaves, masked's structure.
      structure = jax.tree.structure(jax.eval_shape(transform.init, params))
      masked_state = jax.tree.unflatten(structure, jax.tree.leaves(non_lora_state))
      other_updates, masked_state = transform.update(updates, masked_state, params)
      non_lora_state = nnx_metadata.unwrap_masked_nodes(masked_state)
      other_leaves = plan.leaves(other_updates)
      for index in plan.other_indices:
        out[index] = other_leaves[index]
    return plan.unflatten(out), non_lora_state
