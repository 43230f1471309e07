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
"""Sharding names for optimizer state built from flax nnx parameters.

With an ``nnx.State`` as params, optax builds every state entry inside a
copy of its factor's ``nnx.Variable``, metadata included, and
``nnx.Optimizer`` then shards the entry by the factor's ``out_sharding``. That
does not fit a row vector or an r×r matrix. :class:`StateLabels` gives such
entries the names of the parameter axes they run along instead (a ``d_in``
axis like ``lora_a``'s input axis, a ``d_out`` axis like ``lora_b``'s output
axis, rank axes replicated), so ``nnx.get_partition_spec`` of the optimizer
state lays them out like the parameters (``docs/design.md`` §10).

This is the only flax-facing part of the optimizer engine: the engine
(:mod:`adaprelora_jax._src.engine.pairwise`) hands it the params and calls it on every
entry it builds; for params without ``Variable`` nodes it changes nothing.
It does not import flax: a leaf can only be an ``nnx.Variable`` once flax is
imported, so :func:`is_variable` looks flax up in ``sys.modules`` and the
optimizer on plain array trees runs without flax installed or imported.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import optax

from adaprelora_jax._src.discovery import pairs as pairs_lib

if TYPE_CHECKING:
  from adaprelora_jax._src.discovery import plan as plan_lib
  from adaprelora_jax._src.engine import slots as slots_lib


def is_variable(node: Any) -> bool:
  """Whether ``node`` is a flax ``nnx.Variable`` (False while flax is not imported)."""
  nnx = sys.modules.get("flax.nnx")
  return nnx is not None and isinstance(node, nnx.Variable)


def holds_variables(tree: Any) -> bool:
  """Whether ``tree`` holds a flax ``nnx.Variable`` (e.g. an ``nnx.State``)."""
  return "flax.nnx" in sys.modules and any(
    is_variable(node) for node in jax.tree.leaves(tree, is_leaf=is_variable)
  )


def unwrap(node: Any) -> Any:
  """The array held by a ``Variable`` node, or ``node`` itself."""
  return node.get_value() if is_variable(node) else node


def unwrap_masked_nodes(tree: Any) -> Any:
  """``tree`` with every flax ``Variable`` that holds an ``optax.MaskedNode``
  replaced by the bare ``MaskedNode``.

  Unflattened against an ``nnx.State``, a masked position becomes a
  ``Variable`` holding no array; ``nnx.get_named_sharding`` still gives it a
  sharding, and Orbax restores (Tunix's ``CheckpointManager``) then fail on a
  tree whose structure differs from the shardings'. The bare node has the
  same (no) leaves, so the state is unchanged.
  """

  def unwrap(node: Any) -> Any:
    if is_variable(node) and isinstance(node.get_value(), optax.MaskedNode):
      return optax.MaskedNode()
    return node

  return jax.tree.map(unwrap, tree, is_leaf=is_variable)


def _labeled(node: Any, value: jax.Array, names: tuple[Any, ...]) -> Any:
  """``value`` in a copy of the ``Variable`` ``node`` sharded by ``names``."""
  metadata = {**node.get_metadata(), "out_sharding": names}
  metadata.pop("optimizer_sharding", None)
  return type(node)(value, **metadata)


def slot_sharding(
  pair: pairs_lib.PairInfo,
  slot: slots_lib.Slot | slots_lib.GroupSlot,
  a_names: Sequence[Any],
  b_names: Sequence[Any],
) -> tuple[Any, ...]:
  """Per-axis sharding names of a slot from those of the pair's factors."""
  lead, d_in, d_out = pairs_lib.pair_axes(pair, a_names, b_names)
  by_dim = {"d_in": d_in, "rank": None, "d_out": d_out}
  return (*lead, *(by_dim[dim] for dim in slot.dims))


class StateLabels(NamedTuple):
  """The params' ``Variable`` nodes and sharding names, for labelling state.

  Attributes:
    plan: the params' LoRA plan.
    nodes: one per param leaf: a ``Variable`` or a plain array; None when the
      params hold no ``Variable`` (labelling is then the identity).
    treedef: of the params with ``Variable`` nodes as leaves.
    specs: ``out_sharding`` per leaf, padded with None to the leaf's rank.
  """

  plan: plan_lib.LoRAPlan
  nodes: list[Any] | None = None
  treedef: Any = None
  specs: Sequence[tuple[Any, ...]] = ()

  @classmethod
  def of(cls, plan: plan_lib.LoRAPlan, params: Any) -> StateLabels:
    """The labels for state built from ``params`` (a no-op without
    ``Variable`` nodes)."""
    nodes, treedef = jax.tree.flatten(params, is_leaf=is_variable)
    if len(nodes) != plan.num_leaves or not any(map(is_variable, nodes)):
      return cls(plan)

    def names(node: Any) -> tuple[Any, ...]:
      found = node.get_metadata().get("out_sharding") if is_variable(node) else None
      found = found or ()
      return (*found, *(None,) * (node.ndim - len(found)))

    return cls(plan, nodes, treedef, [names(node) for node in nodes])

  def check_uniform(self) -> None:
    """Raises if a group stacks pairs with differently sharded factors."""
    if self.nodes is not None:
      self.plan.check_uniform_layouts(self.specs, "sharding metadata (out_sharding)")

  def mirrored(self, tree: Any, slots: Sequence[slots_lib.Slot]) -> Any:
    """``tree`` (mirroring the params) with its entries sharded by their axes.

    Entries shaped like their factor keep the factor's ``Variable``; the
    others get the names of :func:`slot_sharding`.
    """
    if self.nodes is None:
      return tree
    nodes = self.treedef.flatten_up_to(tree)
    for pair in self.plan.pairs:
      a_names, b_names = self.specs[pair.a_index], self.specs[pair.b_index]
      if not any(a_names + b_names):
        continue
      for slot in slots:
        index = pair.a_index if slot.role == "a" else pair.b_index
        if is_variable(nodes[index]) and not slot.factor_layout:
          nodes[index] = _labeled(
            nodes[index], nodes[index].get_value(), slot_sharding(pair, slot, a_names, b_names)
          )
    # Masked positions as bare MaskedNodes, so that Orbax restores against
    # nnx.get_named_sharding work (unwrap_masked_nodes).
    return unwrap_masked_nodes(self.treedef.unflatten(nodes))

  def stacked(self, arrays: tuple[jax.Array, ...], slot: slots_lib.GroupSlot) -> tuple[Any, ...]:
    """Each group's array in a ``Variable`` laid out like its first member's
    factor axes (the member axis replicated)."""
    if self.nodes is None:
      return arrays
    labeled = []
    for group, array in zip(self.plan.groups, arrays, strict=True):
      pair = group.members[0]
      node = self.nodes[pair.a_index if slot.role == "a" else pair.b_index]
      names = slot_sharding(pair, slot, self.specs[pair.a_index], self.specs[pair.b_index])
      if is_variable(node) and any(names):
        array = _labeled(node, array, (None, *names))
      labeled.append(array)
    return tuple(labeled)
