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
"""Which leaves a LoRA transform owns, and the others routed by composition.

The ``scale_by_*`` cores of this package transform the LoRA factors and the
exact-statistics probes beside them (:class:`adaprelora_jax.nn.LoRA`,
:class:`adaprelora_jax.qwix.LoraProvider`), and nothing else: a core given
another leaf raises, naming it. The aliases (:func:`adaprelora_jax.adaprelora`
and the baselines) hand every other leaf (a head, biases, norms) to a
transform of its own with ``optax.partition``, as ``optax.contrib.muon`` does
(:func:`partition_non_lora`); :func:`lora_labels` gives the labels for a
partition of one's own::

  tx = optax.partition(
      {"lora": ap.scale_by_adaprelora(), "non_lora": optax.scale_by_adam()},
      ap.lora_labels())
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import optax

from adaprelora_jax._src.discovery import pairing as pairing_lib
from adaprelora_jax._src.discovery import pairs as pairs_lib
from adaprelora_jax._src.discovery import plan as plan_lib
from adaprelora_jax._src.engine import nnx_labels

LORA = "lora"
NON_LORA = "non_lora"


def lora_labels(pairing: pairing_lib.Pairing = "nnx") -> Callable[[Any], Any]:
  """Labels for ``optax.partition``: ``"lora"`` or ``"non_lora"`` per leaf.

  ``"lora"`` marks the factors of every pair ``pairing`` finds and their
  exact-statistics probes (a core reads the probes and gives them zero
  updates); ``"non_lora"`` marks every other leaf.

  Example::

    >>> import jax.numpy as jnp
    >>> import adaprelora_jax as ap
    >>> params = {"lora_a": jnp.ones((4, 2)), "lora_b": jnp.zeros((2, 3)),
    ...           "head": jnp.ones((3,))}
    >>> ap.lora_labels()(params)
    {'head': 'non_lora', 'lora_a': 'lora', 'lora_b': 'lora'}

  Args:
    pairing: ``"nnx"``, ``"peft"`` or a pairing callable (see
      :func:`adaprelora_jax.plan_pairs`).

  Returns:
    A function from a parameter tree to a tree of labels of its structure.
  """
  return _labels(pairing_lib.resolve_pairing(pairing), strict=False)


def _labels(pairing_fn: pairing_lib.PairingFn, strict: bool) -> Callable[[Any], Any]:
  def labels(params: Any) -> Any:
    plan = plan_lib.plan_pairs(params, pairing_fn, strict=strict)
    leaf_labels = [LORA] * plan.num_leaves
    for index in plan.other_indices:
      leaf_labels[index] = NON_LORA
    return plan.unflatten(leaf_labels)

  return labels


def partition_non_lora(
  lora: optax.GradientTransformation,
  *,
  pairing: pairing_lib.Pairing,
  non_lora: optax.GradientTransformation | None,
  strict: bool,
) -> optax.GradientTransformationExtraArgs:
  """``lora`` on the LoRA factors and probes, ``non_lora`` on the other leaves.

  ``optax.partition`` over :func:`lora_labels`. Over an ``nnx.State`` the
  state holds a bare ``optax.MaskedNode`` wherever ``optax.masked`` would
  leave a flax ``Variable`` holding one, so that Orbax restores against the
  state's shardings (Tunix's ``CheckpointManager``) see one structure
  (:func:`adaprelora_jax._src.engine.nnx_labels.unwrap_masked_nodes`); the update reads
  it back in ``optax.partition``'s own structure.

  Args:
    lora: the core for the LoRA leaves.
    pairing: as the core's.
    non_lora: transform for the other leaves; None means
      ``optax.scale_by_adam()``.
    strict: raise, naming them, if the params hold leaves that are not LoRA
      factors, instead of routing them.

  Returns:
    The :class:`optax.GradientTransformationExtraArgs`.
  """
  transforms = {LORA: lora, NON_LORA: optax.scale_by_adam() if non_lora is None else non_lora}
  labels = _labels(pairing_lib.resolve_pairing(pairing), strict)

  def partition(params: Any) -> optax.GradientTransformationExtraArgs:
    # Labelled from the params (optax.partition's callable labels would be
    # given the updates), so that gradients are checked against the params.
    return optax.partition(transforms, labels(params))

  def init_fn(params):
    return nnx_labels.unwrap_masked_nodes(partition(params).init(params))

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError(
        "The optimizer needs the params to find the LoRA pairs: call update(grads, state, params)."
      )
    transform = partition(params)
    if not nnx_labels.holds_variables(params):
      # Nothing was unwrapped: the state is in partition's structure already
      # (and tracing init again for it would cost compile time).
      return transform.update(updates, state, params, **extra_args)
    # Back from the bare MaskedNodes: the same leaves in partition's structure.
    structure = jax.tree.structure(jax.eval_shape(transform.init, params))
    state = jax.tree.unflatten(structure, jax.tree.leaves(state))
    updates, state = transform.update(updates, state, params, **extra_args)
    return updates, nnx_labels.unwrap_masked_nodes(state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class PairFinder(NamedTuple):
  """The pairs a core transforms, found and checked once per trace.

  Attributes:
    owner: the transform's public name, for error messages.
    pairing: the resolved pairing function.
    statistics: which pairs receive exact statistics (see
      :func:`adaprelora_jax._src.discovery.plan.plan_pairs`).
    check_pair: called with every pair found; raises for pairs the rule
      cannot handle.
    pass_others: let other leaves through unchanged (a pass-through such as
      :func:`adaprelora_jax.track_step_metrics`) instead of raising.
  """

  owner: str
  pairing: pairing_lib.PairingFn
  statistics: pairing_lib.Statistics = "tangent"
  check_pair: Callable[[pairs_lib.PairInfo], None] | None = None
  pass_others: bool = False

  @classmethod
  def create(
    cls,
    owner: str,
    pairing: pairing_lib.Pairing,
    statistics: pairing_lib.Statistics = "tangent",
    check_pair: Callable[[pairs_lib.PairInfo], None] | None = None,
    pass_others: bool = False,
  ) -> PairFinder:
    """A finder; fails early on a bad pairing.

    Raises:
      ValueError: for an unknown pairing preset name.
    """
    return cls(owner, pairing_lib.resolve_pairing(pairing), statistics, check_pair, pass_others)

  def plan(self, params: Any) -> plan_lib.LoRAPlan:
    """The validated pairs of ``params`` (errors name the parameter paths).

    Raises:
      ValueError: without params, for malformed pairs, or (unless
        ``pass_others``) for leaves that are not LoRA factors.
    """
    if params is None:
      raise ValueError(
        f"{self.owner} needs the params to find the LoRA pairs: call update(grads, state, params)."
      )
    plan = plan_lib.plan_pairs(params, self.pairing, statistics=self.statistics)
    if plan.other_indices and not self.pass_others:
      raise ValueError(
        f"{self.owner} transforms LoRA factors only, but {len(plan.other_indices)} leaves "
        f"are not LoRA factors: {plan_lib.quoted_paths(plan.paths, plan.other_indices)}. "
        "Use the optimizer's alias (e.g. adaprelora(...)), which trains them with its "
        "non_lora transform, or route them with optax.partition and "
        "adaprelora_jax.lora_labels()."
      )
    if self.check_pair is not None:
      for pair in plan.pairs:
        self.check_pair(pair)
    return plan

  def find(self, params: Any) -> tuple[plan_lib.LoRAPlan, nnx_labels.StateLabels]:
    """The params' plan (:meth:`plan`) and how their state is labelled (nnx
    sharding names; the identity for params without ``nnx.Variable`` nodes).

    Raises:
      ValueError: as :meth:`plan`, or for same-shaped pairs whose state would
        be sharded differently.
    """
    plan = self.plan(params)
    labels = nnx_labels.StateLabels.of(plan, params)
    labels.check_uniform()
    return plan, labels
