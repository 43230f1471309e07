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
"""One validated LoRA pair: its shapes, its layout, and the checks that build it.

Layouts (docs/design.md §9): every pair is one matrix map
``ΔW = A @ B`` with ``A = a.reshape(d_in, r)`` and ``B = b.reshape(r, d_out)``,
stacked over batch (layer) axes. Which axes of ``a`` and ``b`` are batch, rank,
``d_in`` and ``d_out`` is given by the pair's :class:`LoRADimensionNumbers`,
inferred from the shapes (:func:`infer_dimension_numbers`) or declared by the
pairing. The canonical layout the kernels see is flax's,
``A: (*batch, d_in, r)``, ``B: (*batch, r, d_out)``:
:meth:`PairInfo.to_canonical` transposes and reshapes a leaf into it and
:meth:`PairInfo.to_leaf` brings results back into the leaf's own layout.
:func:`validate_pair` builds a :class:`PairInfo` from the leaves a pairing
named, and every error it raises names the parameter path.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Hashable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp

from adaprelora_jax._src import validation
from adaprelora_jax._src.discovery import dimension_numbers
from adaprelora_jax._src.discovery.dimension_numbers import LoRADimensionNumbers
from adaprelora_jax._src.discovery.pairing import ROLES
from adaprelora_jax._src.discovery.pairing import LoRARole
from adaprelora_jax._src.discovery.pairing import Role


@dataclasses.dataclass(frozen=True)
class PairInfo:
  """One validated LoRA pair (positions refer to the flattened params).

  ``lead_shape`` (the batch axes), ``d_in``, ``rank`` and ``d_out`` describe
  the canonical matrices ``(*lead, d_in, r)`` / ``(*lead, r, d_out)``;
  ``a_shape`` / ``b_shape`` are the leaves' own shapes and
  ``dimension_numbers`` (normalized: every field set, non-negative) relates
  the two.
  """

  name: str
  a_index: int
  b_index: int
  a_path: str
  b_path: str
  transposed: bool
  lead_shape: tuple[int, ...]
  d_in: int
  rank: int
  d_out: int
  dtype: Any
  row_stats_index: int | None = None
  col_stats_index: int | None = None
  layout: tuple[Hashable, ...] = ()
  a_shape: tuple[int, ...] = ()
  b_shape: tuple[int, ...] = ()
  dimension_numbers: LoRADimensionNumbers | None = None
  scale: float = 1.0

  @property
  def has_statistics(self) -> bool:
    return self.row_stats_index is not None

  def to_canonical(self, array: jax.Array, role: Literal["a", "b"]) -> jax.Array:
    """A factor-shaped leaf as the canonical ``(*lead, d_in, r)`` (``a``) or
    ``(*lead, r, d_out)`` (``b``) array.

    A transpose is a copy of the factor, made only when the batch or rank
    axes are not where the canonical layout has them (docs/design.md §9);
    the reshape of contiguous axes is free.
    """
    permutation = _permutation(self, role)
    if permutation != tuple(range(len(permutation))):
      array = jnp.transpose(array, permutation)
    shape = canonical_shape(self, role)
    return array if tuple(array.shape) == shape else array.reshape(shape)

  def statistics_to_canonical(
    self, array: jax.Array, role: Literal["row_stats", "col_stats"]
  ) -> jax.Array:
    """A statistics leaf as the canonical ``(*lead, d_in)`` (rows) or
    ``(*lead, d_out)`` (columns) array.

    Statistics leaves come flat (:class:`adaprelora_jax.nn.LoRA`) or shaped
    like their factor with a rank axis of size 1
    (:class:`adaprelora_jax.qwix.LoraProvider`), which keeps them stacked,
    scanned and sharded like the factor; the latter are read through the
    factor's own layout (:meth:`to_canonical`).
    """
    flat = statistics_shape(self, role)
    if tuple(array.shape) == flat:
      return array
    permutation = _permutation(self, "a" if role == "row_stats" else "b")
    if permutation != tuple(range(len(permutation))):
      array = jnp.transpose(array, permutation)
    return array.reshape(flat)

  def to_leaf(self, array: jax.Array, role: Literal["a", "b"]) -> jax.Array:
    """The inverse of :meth:`to_canonical`: back into the leaf's layout."""
    permutation = _permutation(self, role)
    leaf = leaf_shape(self, role)
    permuted = tuple(leaf[axis] for axis in permutation)
    if tuple(array.shape) != permuted:
      array = array.reshape(permuted)
    if permutation != tuple(range(len(permutation))):
      array = jnp.transpose(array, _inverse(permutation))
    return array


def _permutation(pair: PairInfo, role: Literal["a", "b"]) -> tuple[int, ...]:
  axes = dimension_numbers.normalized(pair.dimension_numbers)
  return axes.a_permutation if role == "a" else axes.b_permutation


def _inverse(permutation: Sequence[int]) -> tuple[int, ...]:
  inverse = [0] * len(permutation)
  for position, axis in enumerate(permutation):
    inverse[axis] = position
  return tuple(inverse)


def canonical_shape(pair: PairInfo, role: Literal["a", "b"]) -> tuple[int, ...]:
  """``(*lead, d_in, r)`` for ``a``, ``(*lead, r, d_out)`` for ``b``."""
  tail = (pair.d_in, pair.rank) if role == "a" else (pair.rank, pair.d_out)
  return (*pair.lead_shape, *tail)


def statistics_shape(pair: PairInfo, role: Literal["row_stats", "col_stats"]) -> tuple[int, ...]:
  """``(*lead, d_in)`` for row statistics, ``(*lead, d_out)`` for columns."""
  return (*pair.lead_shape, pair.d_in if role == "row_stats" else pair.d_out)


def probe_shape(pair: PairInfo, role: Literal["row_stats", "col_stats"]) -> tuple[int, ...]:
  """The factor-shaped layout of a statistics leaf: its factor's shape with
  the rank axis of size 1."""
  axes = dimension_numbers.normalized(pair.dimension_numbers)
  if role == "row_stats":
    shape, rank_axis = list(pair.a_shape), axes.a_rank_axis
  else:
    shape, rank_axis = list(pair.b_shape), axes.b_rank_axis
  shape[rank_axis] = 1
  return tuple(shape)


def validate_pair(
  pair_name: str,
  slots: dict[str, tuple[int, LoRARole]],
  flat: Sequence[tuple[Any, Any]],
  paths: Sequence[str],
) -> PairInfo:
  """Checks the leaves a pairing named for one pair and describes the pair.

  Args:
    pair_name: the pair's identifier (:attr:`LoRARole.pair`).
    slots: ``{role: (leaf index, LoRARole)}`` of the pair's leaves.
    flat: the params flattened with paths (``tree_flatten_with_path``).
    paths: every leaf's formatted path, for the messages.

  Returns:
    The pair's :class:`PairInfo` (with statistics indices if it has them).

  Raises:
    ValueError: naming the path, for a missing factor, a non-array or
      non-floating factor, factors of different dtypes or layouts, shapes that
      fit no (or more than one) reading of the dimension numbers, mismatched
      batch or rank axes, a non-positive scale, or malformed statistics.
  """
  for needed, other in (("a", "b"), ("b", "a")):
    if needed not in slots:
      present = slots.get(other) or next(iter(slots.values()))
      raise ValueError(
        f"Unpaired LoRA factor '{paths[present[0]]}': pair {pair_name!r} has "
        f"no '{needed}' factor (lora_{needed}). Masked out, misnamed, or "
        "missing from the tree?"
      )
  (a_index, a_role), (b_index, b_role) = slots["a"], slots["b"]
  a_leaf, b_leaf = flat[a_index][1], flat[b_index][1]
  a_path, b_path = paths[a_index], paths[b_index]
  for path, leaf in ((a_path, a_leaf), (b_path, b_leaf)):
    shape = getattr(leaf, "shape", None)
    dtype = getattr(leaf, "dtype", None)
    if shape is None or dtype is None:
      raise ValueError(f"LoRA factor '{path}' is not an array: {type(leaf).__name__}.")
    if len(shape) < 2:
      raise ValueError(
        f"LoRA factor '{path}' has shape {tuple(shape)}; factors need at least 2 dimensions."
      )
    if not jnp.issubdtype(dtype, jnp.floating):
      raise ValueError(
        f"LoRA factor '{path}' has dtype {jnp.dtype(dtype).name}; LoRA "
        "factors must be floating point."
      )
  if jnp.dtype(a_leaf.dtype) != jnp.dtype(b_leaf.dtype):
    raise ValueError(
      f"LoRA pair {pair_name!r}: '{a_path}' is {jnp.dtype(a_leaf.dtype).name} "
      f"but '{b_path}' is {jnp.dtype(b_leaf.dtype).name}; both factors of a "
      "pair must have the same dtype."
    )
  if a_role.transposed != b_role.transposed:
    raise ValueError(
      f"LoRA pair {pair_name!r}: '{a_path}' and '{b_path}' use different "
      "layouts (one transposed, one not)."
    )
  a_shape, b_shape = tuple(a_leaf.shape), tuple(b_leaf.shape)
  where = f"LoRA pair {pair_name!r} ('{a_path}' {a_shape}, '{b_path}' {b_shape})"
  declared = _agreed(pair_name, a_role, b_role, "dimension_numbers")
  if declared is None:
    dims = dimension_numbers.infer_for_pair(
      a_shape, b_shape, a_role.transposed, pair_name, a_path, b_path
    )
  else:
    dims = dimension_numbers.normalize_dimension_numbers(declared, a_shape, b_shape, where=where)
    axes = dimension_numbers.normalized(dims)
    for a_axis, b_axis in zip(axes.a_batch_axes, axes.b_batch_axes, strict=True):
      if a_shape[a_axis] != b_shape[b_axis]:
        raise ValueError(
          f"{where}: batch axis {a_axis} of lora_a has size {a_shape[a_axis]} "
          f"but batch axis {b_axis} of lora_b has size {b_shape[b_axis]}."
        )
    if a_shape[axes.a_rank_axis] != b_shape[axes.b_rank_axis]:
      raise ValueError(
        f"{where}: rank mismatch between lora_a axis {axes.a_rank_axis} "
        f"({a_shape[axes.a_rank_axis]}) and lora_b axis {axes.b_rank_axis} "
        f"({b_shape[axes.b_rank_axis]})."
      )
  dims = _sharded_axes_first(dims, declared, a_role, b_role, len(a_shape), len(b_shape))
  axes = dimension_numbers.normalized(dims)
  scale = _agreed(pair_name, a_role, b_role, "scale")
  scale = 1.0 if scale is None else scale
  validation.check_positive(f"scale of LoRA pair {pair_name!r}", scale)
  lead = tuple(a_shape[axis] for axis in axes.a_batch_axes)
  d_in = math.prod(a_shape[axis] for axis in axes.a_in_axes)
  d_out = math.prod(b_shape[axis] for axis in axes.b_out_axes)
  info = PairInfo(
    name=pair_name,
    a_index=a_index,
    b_index=b_index,
    a_path=a_path,
    b_path=b_path,
    transposed=a_role.transposed,
    lead_shape=lead,
    d_in=d_in,
    rank=a_shape[axes.a_rank_axis],
    d_out=d_out,
    dtype=jnp.dtype(a_leaf.dtype),
    layout=tuple(slots[role][1].layout if role in slots else None for role in ROLES),
    a_shape=a_shape,
    b_shape=b_shape,
    dimension_numbers=dims,
    scale=float(scale),
  )
  has_rows, has_cols = "row_stats" in slots, "col_stats" in slots
  if has_rows != has_cols:
    present = slots["row_stats" if has_rows else "col_stats"]
    raise ValueError(
      f"LoRA pair {pair_name!r}: statistics leaf '{paths[present[0]]}' has no "
      "partner (both row and column statistics are required)."
    )
  if has_rows:
    stats_roles: tuple[Literal["row_stats", "col_stats"], ...] = ("row_stats", "col_stats")
    for role in stats_roles:
      index = slots[role][0]
      leaf = flat[index][1]
      # Flat, or shaped like the factor with a rank axis of 1.
      shapes = (statistics_shape(info, role), probe_shape(info, role))
      expected = shapes[1] if tuple(getattr(leaf, "shape", ())) == shapes[1] else shapes[0]
      check_floating_array(
        leaf, expected, f"LoRA statistics leaf '{paths[index]}' of pair {pair_name!r}"
      )
    info = dataclasses.replace(
      info,
      row_stats_index=slots["row_stats"][0],
      col_stats_index=slots["col_stats"][0],
    )
  return info


def _agreed(pair_name: str, a_role: LoRARole, b_role: LoRARole, field: str) -> Any:
  """A per-pair field given on either factor's role (both: must agree)."""
  a_value, b_value = getattr(a_role, field), getattr(b_role, field)
  if a_value is not None and b_value is not None and a_value != b_value:
    raise ValueError(
      f"LoRA pair {pair_name!r}: the pairing gives lora_a {field}={a_value!r} "
      f"but lora_b {field}={b_value!r}."
    )
  return a_value if a_value is not None else b_value


def _sharded_axes_first(
  dims: LoRADimensionNumbers,
  declared: LoRADimensionNumbers | None,
  a_role: LoRARole,
  b_role: LoRARole,
  a_ndim: int,
  b_ndim: int,
) -> LoRADimensionNumbers:
  """Flattens sharded axes first (stable), so a single sharded one is major.

  Only the major axis of a reshape keeps its sharding: ``(C, N)`` with ``N``
  sharded, flattened as is, is no block of ``C·N``, and XLA would gather the
  factor to reshape it (docs/design.md §9). An order given explicitly
  (``a_in_axes`` / ``b_out_axes``) is kept.
  """

  def order(axes, sharded, ndim):
    sharded = {axis % ndim for axis in sharded}
    return (
      *(axis for axis in axes if axis in sharded),
      *(axis for axis in axes if axis not in sharded),
    )

  if declared is None or declared.a_in_axes is None:
    dims = dims._replace(a_in_axes=order(dims.a_in_axes, a_role.sharded_axes, a_ndim))
  if declared is None or declared.b_out_axes is None:
    dims = dims._replace(b_out_axes=order(dims.b_out_axes, b_role.sharded_axes, b_ndim))
  return dims


def check_floating_array(leaf: Any, expected_shape: tuple[int, ...], description: str) -> None:
  shape = getattr(leaf, "shape", None)
  if shape is None or tuple(shape) != expected_shape:
    raise ValueError(f"{description} has shape {shape}, expected {expected_shape}.")
  if not jnp.issubdtype(leaf.dtype, jnp.floating):
    raise ValueError(
      f"{description} has dtype {jnp.dtype(leaf.dtype).name}; expected a floating dtype."
    )


def pair_axes(
  pair: PairInfo, a_axes: Sequence[Any], b_axes: Sequence[Any]
) -> tuple[tuple[Any, ...], Any, Any]:
  """``(lead, d_in, d_out)`` entries of a pair from its factors' per-axis entries.

  ``a_axes`` / ``b_axes`` hold one entry per axis of the ``lora_a`` /
  ``lora_b`` leaf (e.g. sharding names or partition-spec entries), in the
  leaf's own layout. The batch entries are ``lora_a``'s. A ``d_in`` formed
  by several axes gets their mesh axes, major first (a tuple if more than
  one): the layout of the flattened axis when only its major axis is
  sharded, which :attr:`LoRARole.sharded_axes` arranges (docs/design.md §9).
  """
  axes = dimension_numbers.normalized(pair.dimension_numbers)
  lead = tuple(a_axes[axis] for axis in axes.a_batch_axes)
  return (
    lead,
    _merged_entry([a_axes[axis] for axis in axes.a_in_axes]),
    _merged_entry([b_axes[axis] for axis in axes.b_out_axes]),
  )


def _merged_entry(entries: Sequence[Any]) -> Any:
  """The spec entry of a flattened axis from those of its axes, major first."""
  if len(entries) == 1:
    return entries[0]
  names: list[Any] = []
  for entry in entries:
    if entry is None:
      continue
    names.extend(entry if isinstance(entry, tuple) else (entry,))
  if not names:
    return None
  return names[0] if len(names) == 1 else tuple(names)


def leaf_shape(pair: PairInfo, role: Role) -> tuple[int, ...]:
  """The shape of the pair's ``role`` factor leaf (``"a"`` or ``"b"``)."""
  return pair.a_shape if role == "a" else pair.b_shape
