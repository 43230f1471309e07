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
"""Turning a rule for one LoRA pair into an optax transform.

Every LoRA optimizer in this package is a rule for a single pair ``(a, b)``
(canonical flax layout ``a: (d_in, r)``, ``b: (r, d_out)``) plus the same
plumbing around it: find and validate the pairs (:mod:`adaprelora_jax.pairing`),
check the gradients against them, keep per-pair state in trees that mirror the
params, hand the leaves that are not LoRA factors to a fallback transform,
give the exact-statistics probe leaves of :class:`adaprelora_jax.nn.LoRA` zero
updates, and cast the result back to the parameter dtype. Two entry points
share that plumbing:

* :func:`pairwise_transform` runs a per-pair kernel. Same-shaped pairs are
  stacked and processed by one ``jax.vmap`` (the traced program does not grow
  with the number of layers). Kernels that need a reduction over *all* pairs
  before updating any (LoRA-RITE's global gradient clipping) supply a
  ``prepare_pair`` first pass.
* :func:`factorwise_transform` applies an ordinary optax transform (e.g.
  ``optax.scale_by_adam``) to the LoRA factors only, leaf by leaf, with float32
  state whatever the parameter dtype. For element-wise rules this avoids the
  copies that stacking would cost.

Per-pair state is declared as slots (:class:`Slot`). A slot's entries sit in
a tree shaped like the params at the position of one factor (so they can be
sharded like it), with ``optax.MaskedNode()`` everywhere else. State that only
the update touches can instead be stacked per group (:class:`GroupSlot`,
cheaper to compile) or kept as one vector over all pairs
(:class:`PairScalar`). Every state entry keeps the dtype it was initialized
with (float32, or the parameter dtype if wider): kernels may compute in a
wider one (float64 hyperparameters under x64), and their results are cast
back, so the state can be the carry of ``jax.lax.scan`` and ``jit`` does not
retrace.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from adaprelora_jax import linalg
from adaprelora_jax import pairing as pairing_lib

Dim = Literal["d_in", "rank", "d_out"]


class Slot(NamedTuple):
  """One per-pair state array, stored at the position of one factor.

  Attributes:
    role: ``"a"`` or ``"b"``: the factor whose position holds the entry.
    dims: the per-pair shape as names of the pair's sizes, e.g.
      ``("d_in", "rank")``, ``("rank", "rank")`` or ``()`` for a scalar.
      Arrays shaped like their own factor (``("d_in", "rank")`` at ``"a"``,
      ``("rank", "d_out")`` at ``"b"``) are stored in that leaf's layout
      (transposed for peft-style pairs); all others in the canonical one.
      Leading (stacked-layer) axes of the factor are prepended.
    dtype: the array dtype (float32 unless stated); a floating dtype is
      widened to the pair's parameter dtype where that is wider (float64
      state for float64 parameters).
  """

  role: Literal["a", "b"]
  dims: tuple[Dim, ...]
  dtype: Any = jnp.float32

  @property
  def factor_layout(self) -> bool:
    return self.dims == _FACTOR_DIMS[self.role]


_FACTOR_DIMS = {"a": ("d_in", "rank"), "b": ("rank", "d_out")}


class PairScalar(NamedTuple):
  """One scalar per LoRA pair, for all pairs of the tree in one vector.

  For per-pair scalars that run along no parameter axis (counters). A
  :class:`Slot` of shape ``()`` would give every per-layer pair a leaf of its
  own, cut out of its group's results by a slice per pair, and each such
  slice costs about 1.6 ms of compile time on CPU (0.36 s for the 224 pairs
  of ``experiments/bench_scale.py``); one vector costs one concatenation.
  Entries are ordered as :meth:`adaprelora_jax.pairing.LoRAPlan.pair_rows`
  gives them (groups, members, leading layer axes); the state entry is a
  vector of ``plan.num_rows`` entries, the kernel sees a scalar.

  Attributes:
    dtype: the vector's dtype, exactly (one vector for pairs of any dtype).
  """

  dtype: Any = jnp.int32


class GroupSlot(NamedTuple):
  """One per-pair state array, stored stacked for each group of same-shaped pairs.

  For state that only the update reads and writes (statistics). A
  :class:`Slot` gives every per-layer pair a leaf of its own, cut out of its
  group's results by a dynamic slice per pair, and each such output costs
  about 1 ms of compile time on CPU (the row and column statistics of the 224 pairs
  of ``experiments/bench_scale.py`` took 0.65 s); a stacked entry costs
  none. The state entry is a tuple with one array per group of
  :attr:`adaprelora_jax.pairing.LoRAPlan.groups`, shaped
  ``(len(group.members), *group.lead_shape, *dims)``, laid out like the
  ``role`` factor's axes (the member axis replicated);
  :func:`unstack_group_field` gives it as a tree that mirrors the params.

  Attributes:
    role: ``"a"`` or ``"b"``: the factor whose layout the entry follows.
    dims: the per-pair shape as names of the pair's sizes (as in
      :class:`Slot`).
    dtype: the array dtype; floating dtypes are widened as for
      :class:`Slot`.
  """

  role: Literal["a", "b"]
  dims: tuple[Dim, ...]
  dtype: Any = jnp.float32


# A state field: one tree holding one slot, several slots at distinct
# factors (e.g. a momentum with an entry at ``lora_a`` and one at ``lora_b``,
# which the kernel sees as a tuple in the order given), a vector over all
# pairs, or arrays stacked per group.
Field = Union[Slot, tuple[Slot, ...], PairScalar, GroupSlot]


class PairInputs(NamedTuple):
  """One LoRA pair as a kernel sees it (canonical layout, parameter dtype).

  Attributes:
    lora_a: ``a`` (d_in, r).
    lora_b: ``b`` (r, d_out).
    grad_a: ``∂L/∂a`` (d_in, r).
    grad_b: ``∂L/∂b`` (r, d_out).
    row_stats: exact row means of ``G²`` (d_in,) when the pair carries
      statistics probes and the transform asked for them, else None.
    col_stats: likewise, column means (d_out,).
    lora_scale: the pair's LoRA scale ``s`` from the pairing
      (:attr:`adaprelora_jax.pairing.LoRARole.scale`, the model computes
      ``x·(s·a·b)``), a float32 scalar; None when every pair of the group
      has ``s = 1``.
  """

  lora_a: jax.Array
  lora_b: jax.Array
  grad_a: jax.Array
  grad_b: jax.Array
  row_stats: Optional[jax.Array] = None
  col_stats: Optional[jax.Array] = None
  lora_scale: Optional[jax.Array] = None

  def promoted(self) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """``(a, b, g_a, g_b)`` in :func:`adaprelora_jax.linalg.compute_dtype`."""
    factors = (self.lora_a, self.lora_b, self.grad_a, self.grad_b)
    dtype = linalg.compute_dtype(*factors)
    return tuple(x.astype(dtype) for x in factors)


# update_pair(inputs, state, count, total) -> (delta_a, delta_b, new_state):
# ``inputs`` is a PairInputs (or what ``prepare_pair`` returned), ``state`` a
# dict of the pair's fields, ``count`` the number of previous updates and
# ``total`` the sum over all pairs of prepare_pair's scalar (None without it).
PairKernel = Callable[
    [Any, dict[str, Any], jax.Array, Optional[jax.Array]],
    tuple[jax.Array, jax.Array, dict[str, Any]],
]
PreparePair = Callable[[PairInputs], tuple[Any, jax.Array]]


def default_non_lora(
    non_lora: Optional[optax.GradientTransformation],
) -> optax.GradientTransformation:
  """The fallback for leaves that are not LoRA factors: Adam unless given."""
  return optax.scale_by_adam() if non_lora is None else non_lora


class _Router(NamedTuple):
  """What both entry points share: finding pairs and finishing updates."""

  owner: str
  pairing: pairing_lib.Pairing
  non_lora: optax.GradientTransformation
  strict: bool
  statistics: Literal["auto", "exact", "tangent"]
  check_pair: Optional[Callable[[pairing_lib.PairInfo], None]] = None

  def plan(self, params: Any) -> pairing_lib.LoRAPlan:
    if params is None:
      raise ValueError(
          f"{self.owner} needs the params to find the LoRA pairs: call "
          "update(grads, state, params)."
      )
    plan = pairing_lib.plan_pairs(
        params, self.pairing, strict=self.strict, statistics=self.statistics
    )
    if self.check_pair is not None:
      for pair in plan.pairs:
        self.check_pair(pair)
    return plan

  def non_lora_transform(self, plan: pairing_lib.LoRAPlan):
    return optax.masked(self.non_lora, plan.other_mask())

  def finish(
      self,
      plan: pairing_lib.LoRAPlan,
      out: list[Any],
      updates: Any,
      non_lora_state: optax.OptState,
      params: Any,
  ) -> tuple[Any, optax.OptState]:
    """Zero updates for statistics probes and the fallback for other leaves.

    ``out`` holds the flattened updates with the LoRA factors already set.
    """
    for index in plan.statistics_indices:
      # Statistics probes are not parameters to move.
      out[index] = jnp.zeros_like(out[index])
    if plan.other_indices:
      other_updates, non_lora_state = self.non_lora_transform(plan).update(
          updates, non_lora_state, params
      )
      other_leaves = plan.leaves(other_updates)
      for index in plan.other_indices:
        out[index] = other_leaves[index]
    return plan.unflatten(out), non_lora_state


def _field_slots(field: Field) -> tuple[Union[Slot, GroupSlot], ...]:
  # Slots are themselves tuples: test for them first.
  return (field,) if isinstance(field, (Slot, GroupSlot)) else field


def _check_fields(fields: Mapping[str, Optional[Field]]) -> None:
  for name, field in fields.items():
    if field is None or isinstance(field, PairScalar):
      continue
    roles = [slot.role for slot in _field_slots(field)]
    if len(set(roles)) != len(roles) or not set(roles) <= {"a", "b"}:
      raise ValueError(
          f"State field {name!r} needs at most one slot per factor role, got "
          f"roles {roles}."
      )


def _pair_shape(pair: pairing_lib.PairInfo, dims: Sequence[Dim]) -> tuple[int, ...]:
  sizes = {"d_in": pair.d_in, "rank": pair.rank, "d_out": pair.d_out}
  return (*pair.lead_shape, *(sizes[dim] for dim in dims))


def _group_shape(group: pairing_lib.PairGroup, dims: Sequence[Dim]) -> tuple[int, ...]:
  """Shape of a :class:`GroupSlot` entry's array for ``group``."""
  return (len(group.members), *_pair_shape(group.members[0], dims))


def _state_dtype(declared: Any, param_dtype: Any) -> jnp.dtype:
  """The dtype of a slot's state entry for a pair of ``param_dtype``.

  A floating ``declared`` dtype is a minimum: float32 state for bfloat16 or
  float32 parameters, float64 for float64 ones (which would otherwise be
  computed in float64 and then rounded to float32 at every step). Other
  dtypes (int32 counters) are exact. Both ``init`` and ``update`` use it, so
  a state entry never changes dtype.

  Args:
    declared: the slot's ``dtype``.
    param_dtype: the dtype of the pair's factors.

  Returns:
    The dtype of the state entry.
  """
  declared = jnp.dtype(declared)
  if jnp.issubdtype(declared, jnp.floating):
    return jnp.promote_types(declared, param_dtype)
  return declared


def _slot_zeros(pair: pairing_lib.PairInfo, slot: Slot) -> jax.Array:
  if slot.factor_layout:
    shape = pairing_lib.leaf_shape(pair, slot.role)
  else:
    shape = _pair_shape(pair, slot.dims)
  return jnp.zeros(shape, _state_dtype(slot.dtype, pair.dtype))


def _init_field(plan: pairing_lib.LoRAPlan, field: Field) -> Any:
  by_role = {slot.role: slot for slot in _field_slots(field)}
  return plan.mirror(lambda pair, role: _slot_zeros(pair, by_role[role]),
                     roles=tuple(by_role))


def _is_variable(x: Any) -> bool:
  return isinstance(x, nnx.Variable)


def _slot_sharding(
    pair: pairing_lib.PairInfo, slot: Union[Slot, GroupSlot], a_names: Sequence[Any],
    b_names: Sequence[Any],
) -> tuple[Any, ...]:
  """Per-axis sharding names of a slot from those of the pair's factors.

  A ``d_in`` axis is laid out like ``lora_a``'s input axis, a ``d_out`` axis
  like ``lora_b``'s output axis, rank axes are replicated.
  """
  lead, d_in, d_out = pairing_lib.pair_axes(pair, a_names, b_names)
  by_dim = {"d_in": d_in, "rank": None, "d_out": d_out}
  return (*lead, *(by_dim[dim] for dim in slot.dims))


class _ParamVariables(NamedTuple):
  """The flax ``Variable`` nodes of the params and their sharding names."""

  nodes: list[Any]  # one per param leaf: a Variable or a plain array
  treedef: Any  # of the params with Variables as leaves
  specs: list[tuple[Any, ...]]  # ``out_sharding`` per leaf, padded with None


def _param_variables(plan: pairing_lib.LoRAPlan, params: Any) -> Optional[_ParamVariables]:
  """The params' ``Variable`` nodes, or None for params without any."""
  nodes, treedef = jax.tree.flatten(params, is_leaf=_is_variable)
  if len(nodes) != plan.num_leaves or not any(map(_is_variable, nodes)):
    return None

  def names(node: Any) -> tuple[Any, ...]:
    found = node.get_metadata().get("out_sharding") if _is_variable(node) else None
    found = found or ()
    return (*found, *(None,) * (node.ndim - len(found)))

  return _ParamVariables(nodes, treedef, [names(node) for node in nodes])


def _label_field(
    plan: pairing_lib.LoRAPlan, variables: Optional[_ParamVariables], tree: Any, field: Field,
) -> Any:
  """Gives the flax ``Variable`` nodes of a state tree their own sharding.

  With an ``nnx.State`` as params, every state entry is wrapped in a copy of
  its factor's ``Variable``, metadata included; ``nnx.Optimizer`` then shards
  the entry by the factor's ``out_sharding``, which does not fit a row vector
  or an r×r matrix. Entries not shaped like their factor get the names of
  :func:`_slot_sharding` instead, so ``nnx.get_partition_spec`` of the
  optimizer state lays them out like the parameter axes they run along.
  """
  if variables is None:
    return tree
  nodes = variables.treedef.flatten_up_to(tree)
  for pair in plan.pairs:
    a_names, b_names = variables.specs[pair.a_index], variables.specs[pair.b_index]
    if not any(a_names + b_names):
      continue
    for slot in _field_slots(field):
      index = pair.a_index if slot.role == "a" else pair.b_index
      if _is_variable(nodes[index]) and not slot.factor_layout:
        nodes[index] = _labeled(nodes[index], nodes[index].get_value(),
                                _slot_sharding(pair, slot, a_names, b_names))
  # Masked positions as bare MaskedNodes, so that Orbax restores against
  # nnx.get_named_sharding work (pairing.unwrap_masked_nodes).
  return pairing_lib.unwrap_masked_nodes(variables.treedef.unflatten(nodes))


def _labeled(node: Any, value: jax.Array, names: tuple[Any, ...]) -> Any:
  """``value`` in a copy of the ``Variable`` ``node`` sharded by ``names``."""
  metadata = {**node.get_metadata(), "out_sharding": names}
  metadata.pop("optimizer_sharding", None)
  return type(node)(value, **metadata)


def _label_group_field(
    plan: pairing_lib.LoRAPlan, variables: Optional[_ParamVariables],
    arrays: tuple[jax.Array, ...], field: GroupSlot,
) -> tuple[Any, ...]:
  """Like :func:`_label_field`, for a group-stacked entry: each group's
  array in a ``Variable`` laid out like its first member's factor axes."""
  if variables is None:
    return arrays
  specs = variables.specs
  labeled = []
  for group, array in zip(plan.groups, arrays):
    pair = group.members[0]
    node = variables.nodes[pair.a_index if field.role == "a" else pair.b_index]
    names = _slot_sharding(pair, field, specs[pair.a_index], specs[pair.b_index])
    if _is_variable(node) and any(names):
      array = _labeled(node, array, (None, *names))
    labeled.append(array)
  return tuple(labeled)


def unstack_group_field(plan: pairing_lib.LoRAPlan, entry: Any, field: GroupSlot) -> Any:
  """A group-stacked state entry as a tree that mirrors the params.

  Args:
    plan: the plan of the params the state was built for.
    entry: the state entry of ``field`` (one array per group).
    field: its :class:`GroupSlot`.

  Returns:
    A tree like the params with each pair's array (``(*lead, *dims)``) at its
    ``field.role`` factor and ``optax.MaskedNode()`` elsewhere.

  Raises:
    ValueError: if ``entry`` does not fit the plan's groups.
  """
  arrays = [array.get_value() if _is_variable(array) else array for array in entry]
  expected = [_group_shape(group, field.dims) for group in plan.groups]
  if [tuple(jnp.shape(array)) for array in arrays] != expected:
    raise ValueError(
        f"The state entry has arrays of shapes {[jnp.shape(a) for a in arrays]} "
        f"but the params' groups of LoRA pairs need {expected}: pass the params "
        "(and pairing) the optimizer was initialized with."
    )
  by_pair = {pair.a_index: array[position] for group, array in zip(plan.groups, arrays)
             for position, pair in enumerate(group.members)}
  return plan.mirror(lambda pair, role: by_pair[pair.a_index], roles=(field.role,))


def _check_group_entry(plan: pairing_lib.LoRAPlan, entry: Any, name: str) -> Any:
  if not isinstance(entry, tuple) or len(entry) != len(plan.groups):
    raise ValueError(
        f"State field {name!r} should hold one array per group of same-shaped "
        f"LoRA pairs ({len(plan.groups)}), got {type(entry).__name__} of "
        f"{len(entry) if isinstance(entry, (tuple, list)) else 1}: the state was "
        "built for other params or another pairing."
    )
  return entry


def _gather_field(
    plan: pairing_lib.LoRAPlan, leaves: list[Any], group: pairing_lib.PairGroup,
    field: Field,
) -> Any:
  arrays = tuple(
      plan.gather(leaves, group, slot.role, factor_layout=slot.factor_layout)
      for slot in _field_slots(field)
  )
  return arrays[0] if isinstance(field, Slot) else arrays


def _scatter_field(
    plan: pairing_lib.LoRAPlan, leaves: list[Any], group: pairing_lib.PairGroup,
    field: Field, value: Any, positions: Sequence[jax.Array],
) -> None:
  values = (value,) if isinstance(field, Slot) else value
  dtype = group.members[0].dtype
  for slot, array in zip(_field_slots(field), values):
    # Kernels compute in float32 or wider (and with float64 hyperparameters
    # under x64): cast back to the dtype the entry was initialized with.
    plan.scatter(leaves, group, slot.role, array.astype(_state_dtype(slot.dtype, dtype)),
                 factor_layout=slot.factor_layout, positions=positions)


def _gather_inputs(
    plan: pairing_lib.LoRAPlan, group: pairing_lib.PairGroup,
    param_leaves: list[Any], grads: list[Any],
) -> PairInputs:
  gather = lambda leaves, role, **kw: plan.gather(leaves, group, role, **kw)
  row_stats = col_stats = None
  if group.exact_statistics:
    row_stats = gather(grads, "row_stats", factor_layout=False)
    col_stats = gather(grads, "col_stats", factor_layout=False)
  lora_scale = None
  scales = [pair.scale for pair in group.members]
  if any(scale != 1.0 for scale in scales):
    # One entry per single pair, in gather's order (members, then lead axes).
    lora_scale = jnp.repeat(jnp.asarray(scales, jnp.float32),
                            math.prod(group.lead_shape))
  return PairInputs(
      gather(param_leaves, "a"), gather(param_leaves, "b"),
      gather(grads, "a"), gather(grads, "b"), row_stats, col_stats, lora_scale,
  )


# Where each pair sits among the members of its group: an int32 at each
# ``lora_a`` (shaped like the factor's leading axes), see _member_positions.
_POSITION_SLOT = Slot("a", (), jnp.int32)


def _member_positions(
    group: pairing_lib.PairGroup, position_leaves: Sequence[Any]
) -> tuple[list[jax.Array], jax.Array]:
  """The group members' positions from the state, and whether they are right.

  Why the positions are state rather than Python ints: a group's stacked
  results are cut into per-layer leaves, one slice per member, and XLA
  compiles every distinct fused kernel separately (about 15 ms each on CPU).
  A static slice offset is part of its kernel, so every member's slice was
  a distinct kernel and compile time grew linearly with the number of pairs
  (26 s for 224 per-layer pairs in ``experiments/bench_scale.py``, 7× that
  of ``optax.adamw``). Positions read from the state are only known at run
  time; the dynamic slices at them are one kernel for all members of a shape,
  compiled once.

  Returns:
    ``(positions, valid)``: one int32 scalar per member, and a scalar that is
    False if the positions are not ``0, 1, ...`` (a state that was edited).
  """
  positions = [jnp.ravel(position_leaves[pair.a_index])[0] for pair in group.members]
  expected = jnp.arange(len(positions), dtype=jnp.int32)
  return positions, jnp.all(jnp.stack(positions) == expected)


def pairwise_transform(
    update_pair: PairKernel,
    *,
    fields: Mapping[str, Optional[Field]],
    state_type: Callable[..., Any],
    owner: str,
    pairing: pairing_lib.Pairing,
    non_lora: optax.GradientTransformation,
    strict: bool,
    statistics: Literal["auto", "exact", "tangent"] = "tangent",
    prepare_pair: Optional[PreparePair] = None,
    check_pair: Optional[Callable[[pairing_lib.PairInfo], None]] = None,
) -> optax.GradientTransformationExtraArgs:
  """An optax transform from a rule for one LoRA pair.

  For each group of same-shaped pairs the kernel is ``jax.vmap``-ed over the
  stacked pairs::

    delta_a, delta_b, new_state = update_pair(inputs, state, count, total)

  ``delta_*`` are the factor updates (any floating dtype; cast to the
  parameter dtype), ``state`` / ``new_state`` map each name of ``fields`` to
  the pair's arrays (a tuple for multi-slot fields, None for a None field),
  ``count`` is the number of previous updates. If ``prepare_pair`` is given,
  a first pass computes ``(carry, contribution) = prepare_pair(inputs)`` for
  every pair, ``total`` is the sum of all contributions (over every pair of
  the tree) and the kernel receives ``carry`` instead of ``inputs``;
  otherwise ``total`` is None.

  Args:
    update_pair: the per-pair kernel (above).
    fields: per-pair state: field name -> :class:`Slot`, tuple of slots (at
      distinct factors), :class:`GroupSlot`, :class:`PairScalar` or None
      (field absent; its state entry is None).
    state_type: called as ``state_type(count=..., non_lora=...,
      pair_position=..., **trees)`` with one tree per field; normally the
      transform's state NamedTuple. ``pair_position`` holds, at each
      ``lora_a``, the pair's position in its group of same-shaped pairs
      (int32; read at run time so that per-layer leaves compile to one kernel
      per shape, see ``experiments/bench_scale.py``).
    owner: the public name used in error messages.
    pairing: see :func:`adaprelora_jax.pairing.plan_pairs`.
    non_lora: transform for leaves that are not LoRA factors.
    strict: raise if the params contain leaves that are not LoRA factors.
    statistics: which pairs receive exact statistics in ``PairInputs``
      (see :func:`adaprelora_jax.pairing.plan_pairs`); ``"tangent"`` (no pair
      does) for rules that do not use them.
    prepare_pair: optional first pass (above).
    check_pair: called with every pair's :class:`PairInfo` when the pairs are
      found; raises (naming ``pair.a_path``) for pairs the rule cannot handle.

  Returns:
    The :class:`optax.GradientTransformationExtraArgs`.
  """
  _check_fields(fields)
  router = _Router(owner, pairing, non_lora, strict, statistics, check_pair)
  active = {name: field for name, field in fields.items() if field is not None}
  absent = {name: None for name in fields if name not in active}
  mirrored = {name: field for name, field in active.items()
              if not isinstance(field, (PairScalar, GroupSlot))}
  vectors = {name: field for name, field in active.items() if isinstance(field, PairScalar)}
  stacked = {name: field for name, field in active.items() if isinstance(field, GroupSlot)}

  def init_fn(params):
    plan = router.plan(params)
    variables = _param_variables(plan, params)
    if variables is not None:
      plan.check_uniform_layouts(variables.specs, "sharding metadata (out_sharding)")
    trees = {name: _label_field(plan, variables, _init_field(plan, field), field)
             for name, field in mirrored.items()}
    trees |= {name: jnp.zeros((plan.num_rows,), field.dtype)
              for name, field in vectors.items()}
    trees |= {
        name: _label_group_field(plan, variables, tuple(
            jnp.zeros(_group_shape(group, field.dims),
                      _state_dtype(field.dtype, group.members[0].dtype))
            for group in plan.groups), field)
        for name, field in stacked.items()
    }
    member_position = {pair.a_index: position for group in plan.groups
                       for position, pair in enumerate(group.members)}
    pair_position = plan.mirror(
        lambda pair, role: jnp.full(pair.lead_shape, member_position[pair.a_index], jnp.int32),
        roles=("a",),
    )
    return state_type(
        count=jnp.zeros([], jnp.int32),
        non_lora=pairing_lib.unwrap_masked_nodes(router.non_lora_transform(plan).init(params)),
        **trees,
        **absent,
        pair_position=_label_field(plan, variables, pair_position, _POSITION_SLOT),
    )

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    plan = router.plan(params)
    grads = pairing_lib.check_matching_tree(plan, updates, "gradient")
    param_leaves = plan.leaves(params)
    old_leaves = {name: plan.leaves(getattr(state, name)) for name in mirrored}
    new_leaves = {name: list(leaves) for name, leaves in old_leaves.items()}
    inputs = [_gather_inputs(plan, group, param_leaves, grads) for group in plan.groups]
    stacked_entries = {name: _check_group_entry(plan, getattr(state, name), name)
                       for name in stacked}
    pair_states = [
        {**{name: _gather_field(plan, old_leaves[name], group, field)
            for name, field in mirrored.items()},
         **{name: getattr(state, name)[rows] for name in vectors},
         **{name: entry[index].reshape(
             (group.size, *entry[index].shape[1 + len(group.lead_shape):]))
            for name, entry in stacked_entries.items()}}
        for index, (group, rows) in enumerate(zip(plan.groups, plan.group_rows()))
    ]

    total = None
    if prepare_pair is not None:
      prepared = [jax.vmap(prepare_pair)(group_inputs) for group_inputs in inputs]
      inputs = [carry for carry, _ in prepared]
      total = sum(jnp.sum(contribution) for _, contribution in prepared)
    kernel = jax.vmap(update_pair, in_axes=(0, 0, None, None))
    results = [kernel(group_inputs, {**pair_state, **absent}, state.count, total)
               for group_inputs, pair_state in zip(inputs, pair_states)]

    position_leaves = plan.leaves(state.pair_position)
    out = list(grads)
    for group, (delta_a, delta_b, new_pair_state) in zip(plan.groups, results):
      positions, valid = _member_positions(group, position_leaves)
      # Wrong positions would silently swap the pairs' updates: make them NaN.
      delta_a, delta_b = (jnp.where(valid, delta, jnp.nan) for delta in (delta_a, delta_b))
      dtype = group.members[0].dtype
      plan.scatter(out, group, "a", delta_a.astype(dtype), positions=positions)
      plan.scatter(out, group, "b", delta_b.astype(dtype), positions=positions)
      for name, field in mirrored.items():
        _scatter_field(plan, new_leaves[name], group, field, new_pair_state[name],
                       positions)
    new_vectors = {
        name: jnp.concatenate([new_pair_state[name].astype(field.dtype)
                               for *_, new_pair_state in results])
        if results else getattr(state, name)
        for name, field in vectors.items()
    }
    variables = _param_variables(plan, params)
    new_stacked = {
        name: _label_group_field(plan, variables, tuple(
            new_pair_state[name].reshape(old.shape).astype(
                _state_dtype(field.dtype, group.members[0].dtype))
            for group, (*_, new_pair_state), old
            in zip(plan.groups, results, stacked_entries[name])), field)
        for name, field in stacked.items()
    }

    new_updates, non_lora_state = router.finish(plan, out, updates, state.non_lora, params)
    new_state = state_type(
        count=optax.safe_increment(state.count),
        non_lora=non_lora_state,
        **{name: _label_field(plan, variables, plan.unflatten(leaves), active[name])
           for name, leaves in new_leaves.items()},
        **new_vectors,
        **new_stacked,
        **absent,
        pair_position=state.pair_position,
    )
    return new_updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class FactorwiseState(NamedTuple):
  """State of :func:`factorwise_transform`.

  Attributes:
    factors: state of the inner transform, over a tree shaped like the params
      with float32 (or wider) arrays at the LoRA factors and
      ``optax.MaskedNode()`` elsewhere.
    non_lora: state of the transform applied to the other leaves.
  """

  factors: optax.OptState
  non_lora: optax.OptState


def factorwise_transform(
    inner: optax.GradientTransformation,
    *,
    owner: str,
    pairing: pairing_lib.Pairing,
    non_lora: optax.GradientTransformation,
    strict: bool,
) -> optax.GradientTransformationExtraArgs:
  """Applies ``inner`` to the LoRA factors and ``non_lora`` to other leaves.

  ``inner`` sees a tree shaped like the params that holds float32 (or wider,
  as the parameter) copies of the ``lora_a``/``lora_b`` leaves, in their own
  layout, and ``optax.MaskedNode()`` elsewhere, so its state is float32
  whatever the narrower parameter dtype, and keeps the dtypes of its
  ``init``; its updates are cast back to the parameter dtype.
  Pairs are validated as in :func:`pairwise_transform`; statistics probes
  get zero updates.

  Args:
    inner: transform for the factor leaves (element-wise or per leaf).
    owner: the public name used in error messages.
    pairing: see :func:`adaprelora_jax.pairing.plan_pairs`.
    non_lora: transform for leaves that are not LoRA factors.
    strict: raise if the params contain leaves that are not LoRA factors.

  Returns:
    The :class:`optax.GradientTransformationExtraArgs`.
  """
  router = _Router(owner, pairing, non_lora, strict, "tangent")
  inner = optax.with_extra_args_support(inner)

  def factor_tree(plan: pairing_lib.LoRAPlan, leaves: Sequence[Any]) -> Any:
    tree: list[Any] = [optax.MaskedNode()] * plan.num_leaves
    for pair in plan.pairs:
      for index in (pair.a_index, pair.b_index):
        # The pair's dtype, not the leaf's: gradients wider than their
        # parameters must not widen the inner state.
        tree[index] = leaves[index].astype(_state_dtype(jnp.float32, pair.dtype))
    return pairing_lib.unwrap_masked_nodes(plan.unflatten(tree))

  def init_fn(params):
    plan = router.plan(params)
    return FactorwiseState(
        factors=inner.init(factor_tree(plan, plan.leaves(params))),
        non_lora=pairing_lib.unwrap_masked_nodes(router.non_lora_transform(plan).init(params)),
    )

  def update_fn(updates, state, params=None, **extra_args):
    plan = router.plan(params)
    grads = pairing_lib.check_matching_tree(plan, updates, "gradient")
    param_leaves = plan.leaves(params)
    factor_updates, factors_state = inner.update(
        factor_tree(plan, grads), state.factors, factor_tree(plan, param_leaves),
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
    new_updates, non_lora_state = router.finish(plan, out, updates, state.non_lora, params)
    return new_updates, FactorwiseState(factors_state, non_lora_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
