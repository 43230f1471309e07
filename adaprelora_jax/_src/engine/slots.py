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
"""Per-pair optimizer state: the kinds of state field and where they live.

A per-pair optimizer declares its state as named fields, each of one kind:

* :class:`Slot` -- one array per pair, stored in a tree that mirrors the
  params at the position of one factor (so it can be sharded like it);
  :class:`Slots` holds several at distinct factors (a momentum with an entry
  at ``lora_a`` and one at ``lora_b``).
* :class:`GroupSlot` -- one array per pair, stored stacked per group of
  same-shaped pairs: cheaper to compile, for state only the update touches.
* :class:`PairScalar` -- one scalar per pair, all pairs in one vector.

Every kind knows how to build its state entry (``init``), hand the kernel
one stacked value per group (``read``) and store the kernel's results
(``write``), so the engine (:mod:`adaprelora_jax._src.engine.pairwise`) is one loop over
fields. Entries keep the dtype they were initialized with (see
:func:`state_dtype`), so the state can be the carry of ``jax.lax.scan`` and
``jit`` does not retrace. Compile-time reasons for the three layouts are in
``docs/design.md`` §10.

Flax-specific work (wrapping entries in ``nnx.Variable`` nodes with their own
sharding names) is done by the ``labels`` object the engine passes in (see
:mod:`adaprelora_jax._src.engine.nnx_labels`); this module does not import flax.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, Protocol

import jax
import jax.numpy as jnp

from adaprelora_jax._src.discovery import pairing as pairing_lib
from adaprelora_jax._src.discovery import pairs as pairs_lib

if TYPE_CHECKING:
  from adaprelora_jax._src.discovery import plan as plan_lib

Dim = Literal["d_in", "rank", "d_out"]
Role = Literal["a", "b"]

_FACTOR_DIMS = {"a": ("d_in", "rank"), "b": ("rank", "d_out")}


class Labels(Protocol):
  """How a state entry's arrays are labelled for the parameters' framework."""

  def mirrored(self, tree: Any, slots: Sequence[Slot]) -> Any: ...

  def stacked(self, arrays: tuple[jax.Array, ...], slot: GroupSlot) -> tuple[Any, ...]: ...


def state_dtype(declared: Any, param_dtype: Any) -> jnp.dtype:
  """The dtype of a state entry for a pair of ``param_dtype``.

  A floating ``declared`` dtype is a minimum: float32 state for bfloat16 or
  float32 parameters, float64 for float64 ones (which would otherwise be
  computed in float64 and then rounded to float32 at every step). Other
  dtypes (int32 counters) are exact. Both ``init`` and ``write`` use it, so
  a state entry never changes dtype.

  Args:
    declared: the field's ``dtype``.
    param_dtype: the dtype of the pair's factors.

  Returns:
    The dtype of the state entry.
  """
  declared = jnp.dtype(declared)
  if jnp.issubdtype(declared, jnp.floating):
    return jnp.promote_types(declared, param_dtype)
  return declared


def pair_shape(pair: pairs_lib.PairInfo, dims: Sequence[Dim]) -> tuple[int, ...]:
  """Shape of a per-pair array with named ``dims`` (leading layer axes first)."""
  sizes = {"d_in": pair.d_in, "rank": pair.rank, "d_out": pair.d_out}
  return (*pair.lead_shape, *(sizes[dim] for dim in dims))


def _group_dtype(group: plan_lib.PairGroup) -> Any:
  return group.members[0].dtype


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
    dtype: the array dtype, widened as :func:`state_dtype` says.
  """

  role: Role
  dims: tuple[Dim, ...]
  dtype: Any = jnp.float32

  @property
  def factor_layout(self) -> bool:
    return self.dims == _FACTOR_DIMS[self.role]

  def as_slots(self) -> Slots:
    return Slots((self,), single=True)

  def init(self, plan: plan_lib.LoRAPlan, labels: Labels) -> Any:
    return self.as_slots().init(plan, labels)

  def read(self, plan: plan_lib.LoRAPlan, entry: Any, name: str) -> list[Any]:
    return self.as_slots().read(plan, entry, name)

  def write(
    self,
    plan: plan_lib.LoRAPlan,
    entry: Any,
    values: Sequence[Any],
    positions: Sequence[Sequence[jax.Array]],
    labels: Labels,
  ) -> Any:
    return self.as_slots().write(plan, entry, values, positions, labels)

  def zeros(self, pair: pairs_lib.PairInfo) -> jax.Array:
    if self.factor_layout:
      shape = pairs_lib.leaf_shape(pair, self.role)
    else:
      shape = pair_shape(pair, self.dims)
    return jnp.zeros(shape, state_dtype(self.dtype, pair.dtype))


class Slots(NamedTuple):
  """Several :class:`Slot` s of one field, at distinct factors.

  The kernel sees a tuple with one array per slot, in order. A field
  declared as a plain tuple of slots is read as this (:func:`as_field`).

  Attributes:
    members: the slots, at most one per factor role.
    single: the field is one :class:`Slot` (the kernel sees its array, not a
      1-tuple).
  """

  members: tuple[Slot, ...]
  single: bool = False

  def init(self, plan: plan_lib.LoRAPlan, labels: Labels) -> Any:
    by_role: dict[pairing_lib.Role, Slot] = {slot.role: slot for slot in self.members}
    tree = plan.mirror(lambda pair, role: by_role[role].zeros(pair), roles=tuple(by_role))
    return labels.mirrored(tree, self.members)

  def read(self, plan: plan_lib.LoRAPlan, entry: Any, name: str) -> list[Any]:
    del name  # A tree of the wrong structure fails in flatten_up_to.
    leaves = plan.leaves(entry)
    values = []
    for group in plan.groups:
      arrays = tuple(
        plan.gather(leaves, group, slot.role, factor_layout=slot.factor_layout)
        for slot in self.members
      )
      values.append(arrays[0] if self.single else arrays)
    return values

  def write(
    self,
    plan: plan_lib.LoRAPlan,
    entry: Any,
    values: Sequence[Any],
    positions: Sequence[Sequence[jax.Array]],
    labels: Labels,
  ) -> Any:
    leaves = list(plan.leaves(entry))
    for group, value, group_positions in zip(plan.groups, values, positions, strict=True):
      arrays = (value,) if self.single else value
      dtype = _group_dtype(group)
      for slot, array in zip(self.members, arrays, strict=True):
        # Kernels compute in float32 or wider (and with float64
        # hyperparameters under x64): cast back to the dtype of init.
        plan.scatter(
          leaves,
          group,
          slot.role,
          array.astype(state_dtype(slot.dtype, dtype)),
          factor_layout=slot.factor_layout,
          positions=group_positions,
        )
    return labels.mirrored(plan.unflatten(leaves), self.members)


class GroupSlot(NamedTuple):
  """One per-pair state array, stored stacked for each group of same-shaped pairs.

  For state that only the update reads and writes (statistics). The state
  entry is a tuple with one array per group of
  :attr:`adaprelora_jax._src.discovery.plan.LoRAPlan.groups`, shaped
  ``(len(group.members), *group.lead_shape, *dims)``, laid out like the
  ``role`` factor's axes (the member axis replicated); :meth:`unstack` gives
  it as a tree that mirrors the params.

  Attributes:
    role: ``"a"`` or ``"b"``: the factor whose layout the entry follows.
    dims: the per-pair shape as names of the pair's sizes (as in
      :class:`Slot`).
    dtype: the array dtype, widened as :func:`state_dtype` says.
  """

  role: Role
  dims: tuple[Dim, ...]
  dtype: Any = jnp.float32

  def group_shape(self, group: plan_lib.PairGroup) -> tuple[int, ...]:
    """Shape of this entry's array for ``group``."""
    return (len(group.members), *pair_shape(group.members[0], self.dims))

  def init(self, plan: plan_lib.LoRAPlan, labels: Labels) -> tuple[Any, ...]:
    return labels.stacked(
      tuple(
        jnp.zeros(self.group_shape(group), state_dtype(self.dtype, _group_dtype(group)))
        for group in plan.groups
      ),
      self,
    )

  def read(self, plan: plan_lib.LoRAPlan, entry: Any, name: str) -> list[jax.Array]:
    if not isinstance(entry, tuple) or len(entry) != len(plan.groups):
      raise ValueError(
        f"State field {name!r} should hold one array per group of same-shaped "
        f"LoRA pairs ({len(plan.groups)}), got {type(entry).__name__} of "
        f"{len(entry) if isinstance(entry, (tuple, list)) else 1}: the state was "
        "built for other params or another pairing."
      )
    return [
      array.reshape((group.size, *array.shape[1 + len(group.lead_shape) :]))
      for group, array in zip(plan.groups, entry, strict=True)
    ]

  def write(
    self,
    plan: plan_lib.LoRAPlan,
    entry: Any,
    values: Sequence[jax.Array],
    positions: Sequence[Sequence[jax.Array]],
    labels: Labels,
  ) -> tuple[Any, ...]:
    del positions  # Stacked like the kernel's results: nothing to cut out.
    return labels.stacked(
      tuple(
        value.reshape(self.group_shape(group)).astype(state_dtype(self.dtype, _group_dtype(group)))
        for group, value in zip(plan.groups, values, strict=True)
      ),
      self,
    )

  def unstack(self, plan: plan_lib.LoRAPlan, arrays: Sequence[jax.Array]) -> Any:
    """This field's entry (one plain array per group) as a tree like the params.

    Args:
      plan: the plan of the params the state was built for.
      arrays: the entry's arrays, one per group.

    Returns:
      A tree like the params with each pair's array (``(*lead, *dims)``) at
      its ``role`` factor and ``optax.MaskedNode()`` elsewhere.

    Raises:
      ValueError: if ``arrays`` do not fit the plan's groups.
    """
    expected = [self.group_shape(group) for group in plan.groups]
    if [tuple(jnp.shape(array)) for array in arrays] != expected:
      raise ValueError(
        f"The state entry has arrays of shapes {[jnp.shape(a) for a in arrays]} "
        f"but the params' groups of LoRA pairs need {expected}: pass the params "
        "(and pairing) the optimizer was initialized with."
      )
    by_pair = {
      pair.a_index: array[position]
      for group, array in zip(plan.groups, arrays, strict=True)
      for position, pair in enumerate(group.members)
    }
    return plan.mirror(lambda pair, role: by_pair[pair.a_index], roles=(self.role,))


class PairScalar(NamedTuple):
  """One scalar per LoRA pair, for all pairs of the tree in one vector.

  For per-pair scalars that run along no parameter axis (counters): one
  vector costs one concatenation where a :class:`Slot` of shape ``()`` would
  cost a slice per pair. Entries are ordered as
  :meth:`adaprelora_jax._src.discovery.plan.LoRAPlan.pair_rows` gives them (groups,
  members, leading layer axes); the state entry is a vector of
  ``plan.num_rows`` entries, the kernel sees a scalar.

  Attributes:
    dtype: the vector's dtype, exactly (one vector for pairs of any dtype).
  """

  dtype: Any = jnp.int32

  def init(self, plan: plan_lib.LoRAPlan, labels: Labels) -> jax.Array:
    del labels  # Runs along no parameter axis: nothing to shard.
    return jnp.zeros((plan.num_rows,), self.dtype)

  def read(self, plan: plan_lib.LoRAPlan, entry: Any, name: str) -> list[jax.Array]:
    del name
    return [entry[rows] for rows in plan.group_rows()]

  def write(
    self,
    plan: plan_lib.LoRAPlan,
    entry: Any,
    values: Sequence[jax.Array],
    positions: Sequence[Sequence[jax.Array]],
    labels: Labels,
  ) -> jax.Array:
    del plan, positions, labels
    if not values:
      return entry
    return jnp.concatenate([value.astype(self.dtype) for value in values])


# What a transform may declare per field: a plain tuple of slots stands for
# :class:`Slots`.
Field = Slot | Slots | tuple[Slot, ...] | GroupSlot | PairScalar
FieldKind = Slot | Slots | GroupSlot | PairScalar


def as_field(name: str, field: Field) -> FieldKind:
  """The field kind that ``field`` declares, validated.

  Raises:
    ValueError: for slots of one field at the same factor or an unknown role.
  """
  if isinstance(field, tuple) and not isinstance(field, (Slot, Slots, GroupSlot, PairScalar)):
    field = Slots(tuple(field))
  members = (
    field.members
    if isinstance(field, Slots)
    else ((field,) if isinstance(field, (Slot, GroupSlot)) else ())
  )
  roles = [slot.role for slot in members]
  if len(set(roles)) != len(roles) or not set(roles) <= {"a", "b"}:
    raise ValueError(
      f"State field {name!r} needs at most one slot per factor role, got roles {roles}."
    )
  return field
