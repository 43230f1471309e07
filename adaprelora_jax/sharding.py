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
"""Optimizer-state shardings derived from the parameters' shardings.

The per-pair state of every transform in this package runs along the axes of
the LoRA factors but is not shaped like them: ``adaprelora`` keeps a row
vector (d_in) and a column vector (d_out) per pair, stacked per group of
same-shaped pairs, LoRA-RITE keeps r×r matrices, LoRA-Pro's full mode a
(d_in, d_out) moment. :func:`state_shardings` lays each such array out like
the parameter axis it runs along: a ``d_in`` axis like ``lora_a``'s input
axis, a ``d_out`` axis like ``lora_b``'s output axis, stacked-layer axes like
the factor's leading axes, and rank axes (r ≤ a few hundred) replicated.
Everything else in the state (Adam moments of non-LoRA leaves,
``inject_hyperparams`` scalars, step counts) follows the same rule, axis by
axis.

How the axes are identified: the optimizer's ``init`` is traced abstractly
(``jax.eval_shape``, nothing is allocated) on a stand-in parameter tree in
which every distinct dimension of the real one (each group of same-shaped
pairs' ``d_in``, rank and ``d_out``, each stacked-layer axis, each axis of
every other leaf) has a size of its own. Every axis of the resulting state
then names the parameter axis it came from. This works for any transform
built from the parameters' shapes, including ``optax.chain``,
``optax.masked`` and ``optax.inject_hyperparams`` around this package's
optimizers.

Example::

  mesh = jax.make_mesh((8,), ("model",))
  param_shardings = jax.tree.map(lambda x: x.sharding, params)
  tx = adaprelora_jax.adaprelora(1e-3)
  opt_shardings = adaprelora_jax.sharding.state_shardings(
      tx, params, param_shardings)
  opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from typing import Any

import jax
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from adaprelora_jax._src.discovery import dimension_numbers
from adaprelora_jax._src.discovery import pairing as pairing_lib
from adaprelora_jax._src.discovery import pairs as pairs_lib
from adaprelora_jax._src.discovery import plan as plan_lib
from adaprelora_jax._src.discovery.pairing import LoRARole

# The spec entry of one array axis: a mesh axis name, a tuple of them, or None.
AxisSpec = str | tuple[str, ...] | None
ShardingLike = NamedSharding | PartitionSpec

# Stand-in sizes: ranks from a low range, all other axes from a high one, so a
# stand-in rank never exceeds a stand-in d_in or d_out (rules may check r ≤ d).
# The axes that together form one d_in or d_out of an N-D factor take sizes
# from a middle range, so that their product (the flattened axis, also an
# axis of the state) stays well inside int64.
_FIRST_RANK = 2
_FIRST_OTHER = 1_000_003
_FIRST_SUB = 10_007


def _axis_specs(sharding: ShardingLike | None, ndim: int, path: str) -> tuple[AxisSpec, ...]:
  """The spec entry of each of ``ndim`` axes (None: replicated)."""
  if sharding is None:
    return (None,) * ndim
  spec = sharding.spec if isinstance(sharding, NamedSharding) else sharding
  if len(spec) > ndim:
    raise ValueError(
      f"The sharding of parameter '{path}' has {len(spec)} axes but the "
      f"parameter has {ndim}: {spec}."
    )
  return (*spec, *(None,) * (ndim - len(spec)))


def _common_mesh(shardings: list[ShardingLike | None]) -> Any:
  meshes = {s.mesh for s in shardings if isinstance(s, NamedSharding)}
  if len(meshes) > 1:
    raise ValueError(
      "The parameter shardings use more than one mesh; state_shardings needs "
      "them all on the same mesh."
    )
  return meshes.pop() if meshes else None


class _StandIn:
  """Builds a stand-in parameter tree and remembers which axis each size is.

  Sizes are drawn ``stride`` apart. A state axis whose length is a sum of
  parameter axes (e.g. one entry per pair for the whole tree) can happen to
  equal another axis's stand-in size; with two strides the same coincidence
  cannot happen in both, so only sizes that name the same axis in both
  stand-ins are taken as that axis.
  """

  def __init__(self, stride: int) -> None:
    self._ranks: Iterator[int] = itertools.count(_FIRST_RANK, stride)
    self._others: Iterator[int] = itertools.count(_FIRST_OTHER, stride)
    self._subs: Iterator[int] = itertools.count(_FIRST_SUB, stride)
    self.specs: list[AxisSpec] = []
    self.axis_of_size: dict[int, int] = {}

  def size(self, spec: AxisSpec, *, rank: bool = False, sub: bool = False) -> int:
    size = next(self._ranks if rank else self._subs if sub else self._others)
    return self.register(size, spec)

  def register(self, size: int, spec: AxisSpec) -> int:
    self.axis_of_size[size] = len(self.specs)
    self.specs.append(spec)
    return size

  def flattened(self, specs: list[AxisSpec], merged: AxisSpec) -> tuple[list[int], int]:
    """Stand-in sizes of the axes that form one d_in (d_out), and of it.

    One axis is the flattened axis itself (as for 2-D factors); several get
    a size each (N-D factor-shaped state is laid out axis by axis) and their
    product names the flattened axis (per-pair vectors along d_in).
    """
    if len(specs) == 1:
      size = self.size(merged)
      return [size], size
    sizes = [self.size(spec, sub=True) for spec in specs]
    return sizes, self.register(math.prod(sizes), merged)


def _stand_in_state(
  optimizer: optax.GradientTransformation,
  plan: plan_lib.LoRAPlan,
  leaves: list[Any],
  axis_specs: list[tuple[AxisSpec, ...]],
  stride: int,
) -> tuple[Any, _StandIn]:
  """``optimizer.init`` traced abstractly on a stand-in of the parameters."""
  stand_in = _StandIn(stride)
  new_shapes: list[tuple[int, ...] | None] = [None] * plan.num_leaves
  # The pairs of a group share their stand-in sizes, so that the stand-in
  # params group (and their stacked state is shaped) as the real ones; the
  # caller has checked that they are sharded alike, and members of a group
  # have one leaf layout (plan_lib.plan_pairs).
  for group in plan.groups:
    first = group.members[0]
    dims = dimension_numbers.normalized(first.dimension_numbers)
    a_specs, b_specs = axis_specs[first.a_index], axis_specs[first.b_index]
    lead_specs, d_in_spec, d_out_spec = pairs_lib.pair_axes(first, a_specs, b_specs)
    lead = [stand_in.size(spec) for spec in lead_specs]
    in_sizes, d_in = stand_in.flattened([a_specs[axis] for axis in dims.a_in_axes], d_in_spec)
    rank = stand_in.size(None, rank=True)
    out_sizes, d_out = stand_in.flattened([b_specs[axis] for axis in dims.b_out_axes], d_out_spec)
    a_shape, b_shape = [0] * len(first.a_shape), [0] * len(first.b_shape)
    for axis, size in zip(dims.a_permutation, (*lead, *in_sizes, rank), strict=True):
      a_shape[axis] = size
    for axis, size in zip(dims.b_permutation, (*lead, rank, *out_sizes), strict=True):
      b_shape[axis] = size
    for pair in group.members:
      new_shapes[pair.a_index] = tuple(a_shape)
      new_shapes[pair.b_index] = tuple(b_shape)
      if pair.row_stats_index is not None and pair.col_stats_index is not None:
        new_shapes[pair.row_stats_index] = (*lead, d_in)
        new_shapes[pair.col_stats_index] = (*lead, d_out)
  for index, specs in enumerate(axis_specs):
    if new_shapes[index] is None:
      new_shapes[index] = tuple(stand_in.size(spec) for spec in specs)
  stand_in_params = plan.unflatten(
    [
      jax.ShapeDtypeStruct(shape, leaf.dtype)
      for shape, leaf in zip(new_shapes, leaves, strict=True)
    ]
  )
  return jax.eval_shape(optimizer.init, stand_in_params), stand_in


def _is_sharding_leaf(node: Any) -> bool:
  return node is None or isinstance(node, (NamedSharding, PartitionSpec))


def sharded_pairing(
  param_shardings: Any, pairing: pairing_lib.Pairing = "nnx"
) -> pairing_lib.PairingFn:
  """A pairing that stacks same-shaped LoRA pairs only if they are sharded alike.

  The optimizers stack same-shaped pairs and update each stack at once. In
  Megatron-style tensor parallelism pairs of one shape are sharded
  differently (e.g. ``q_proj``'s ``lora_b`` column-parallel, ``o_proj``'s
  ``lora_a`` row-parallel); one stack of both would make XLA gather the
  factors on every step. With this pairing each pair reports its factors'
  partition specs as :attr:`adaprelora_jax.pairing.LoRARole.layout`, so
  only pairs with equal specs share a stack. :func:`state_shardings`
  raises if the optimizer's pairing would stack differently sharded pairs.
  It also reports each factor's sharded axes
  (:attr:`adaprelora_jax.pairing.LoRARole.sharded_axes`): when several axes
  of an N-D factor form its ``d_in`` or ``d_out`` (qwix's
  ``'BTD,CNDH->CBTNH'`` gives ``lora_b (r, C, N, H)`` with ``N`` sharded),
  the sharded one is flattened first, so the flattened factor keeps its
  sharding and the update gathers no factor (docs/design.md §9).

  Example::

    pairing = adaprelora_jax.sharding.sharded_pairing(param_shardings)
    tx = adaprelora_jax.adaprelora(1e-3, pairing=pairing)
    opt_shardings = adaprelora_jax.sharding.state_shardings(
        tx, params, param_shardings, pairing=pairing)

  Args:
    param_shardings: a tree like the params of ``NamedSharding`` or
      ``PartitionSpec`` (None: replicated), e.g. flax's
      ``nnx.get_partition_spec(nnx.state(model, nnx.LoRAParam))``.
    pairing: how LoRA pairs are found (preset name or callable).

  Returns:
    A pairing function for the ``pairing`` argument of every optimizer and
    helper of this package. It raises ``ValueError`` for a LoRA factor
    without an entry in ``param_shardings``.
  """
  pairing_fn = pairing_lib.resolve_pairing(pairing)
  flat, _ = jax.tree_util.tree_flatten_with_path(param_shardings, is_leaf=_is_sharding_leaf)
  by_path = {pairing_lib.path_names(path): sharding for path, sharding in flat}

  def pairing_with_layout(path: tuple[str, ...], leaf: Any) -> pairing_lib.LoRARole | None:
    found = pairing_fn(path, leaf)
    if found is None:
      return None
    name = pairing_lib.format_path(path)
    if path not in by_path:
      raise ValueError(
        f"sharded_pairing: no sharding given for LoRA factor '{name}' "
        "(param_shardings must be a tree like the params)."
      )
    specs = _axis_specs(by_path[path], len(leaf.shape), name)
    # The sharded axes also order the flattening of N-D factors, so that a
    # sharded axis stays major (pairing.LoRARole.sharded_axes).
    sharded = tuple(axis for axis, spec in enumerate(specs) if spec is not None)
    return LoRARole(*found)._replace(layout=specs, sharded_axes=sharded)

  return pairing_with_layout


def state_shardings(
  optimizer: optax.GradientTransformation,
  params: Any,
  param_shardings: Any,
  *,
  pairing: pairing_lib.Pairing = "nnx",
) -> Any:
  """Shardings for ``optimizer``'s state, laid out like the parameters.

  Each state axis is sharded like the parameter axis it runs along: per-pair
  row statistics like ``lora_a``'s ``d_in`` axis, column statistics like
  ``lora_b``'s ``d_out`` axis, factor-shaped state (momentum) like the
  factor, stacked-layer axes like the factors' leading axes; rank axes and
  r×r quantities are replicated. With this layout the update keeps the
  parameters' shardings and only r×r (or smaller) reductions cross devices.

  Args:
    optimizer: the transform whose state is laid out (any transform whose
      ``init`` depends on the parameters' shapes only, e.g.
      :func:`adaprelora_jax.adaprelora` inside ``optax.chain`` or
      ``optax.inject_hyperparams``).
    params: the parameter tree (arrays or ``jax.ShapeDtypeStruct``).
    param_shardings: a tree like ``params`` of ``jax.sharding.NamedSharding``
      or ``jax.sharding.PartitionSpec`` (None: replicated), e.g.
      ``jax.tree.map(lambda x: x.sharding, params)`` or flax's
      ``nnx.get_partition_spec``. Rank axes of LoRA factors should be
      unsharded (they are replicated in the state regardless).
    pairing: how LoRA pairs are found, as given to the optimizer.

  Returns:
    A tree shaped like ``optimizer.init(params)`` with a ``NamedSharding``
    (when ``param_shardings`` holds them) or a ``PartitionSpec`` per leaf,
    ready for ``jax.jit(..., in_shardings=..., out_shardings=...)``.

  Raises:
    ValueError: if a parameter's sharding has more axes than the parameter,
      the shardings use different meshes, or ``pairing`` would stack pairs
      that are sharded differently (use :func:`sharded_pairing`); pairing
      errors name the path.
  """
  plan = plan_lib.plan_pairs(params, pairing)
  leaves = plan.leaves(params)
  shapes = [tuple(leaf.shape) for leaf in leaves]
  shardings = plan.leaves(param_shardings)
  axis_specs = [
    _axis_specs(sharding, len(shape), path)
    for sharding, shape, path in zip(shardings, shapes, plan.paths, strict=True)
  ]
  mesh = _common_mesh(shardings)
  plan.check_uniform_layouts(axis_specs, "shardings")

  (state, stand_in), (check_state, check_stand_in) = (
    _stand_in_state(optimizer, plan, leaves, axis_specs, stride) for stride in (1, 2)
  )

  def axis_spec(size: int, check_size: int) -> AxisSpec:
    axis = stand_in.axis_of_size.get(size)
    if axis is None or axis != check_stand_in.axis_of_size.get(check_size):
      return None
    return stand_in.specs[axis]

  def layout(leaf: jax.ShapeDtypeStruct, check_leaf: jax.ShapeDtypeStruct) -> ShardingLike:
    spec = PartitionSpec(*map(axis_spec, leaf.shape, check_leaf.shape))
    return spec if mesh is None else NamedSharding(mesh, spec)

  return jax.tree.map(layout, state, check_state)
