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
"""Finding LoRA factor pairs in a parameter pytree.

A pairing function looks at one leaf (its path as a tuple of strings and the
array) and says whether it is a LoRA factor, which pair it belongs to and
whether it is ``a`` or ``b``; :func:`plan_pairs` applies it to a whole tree,
validates the pairs (every error names the parameter path) and groups pairs of
equal shape so that optimizers can stack them and process each group with one
``jax.vmap`` (the traced program then does not grow with the number of layers).
Pairs that are sharded differently must not be stacked together; a pairing
function says so through :attr:`LoRARole.layout`
(:func:`adaprelora_jax.sharding.sharded_pairing` fills it in).

Layouts (docs/design.md §9): every pair is one matrix map
``ΔW = A @ B`` with ``A = a.reshape(d_in, r)`` and ``B = b.reshape(r, d_out)``,
stacked over batch (layer) axes. Which axes of ``a`` and ``b`` are batch, rank,
``d_in`` and ``d_out`` is given by the pair's :class:`LoRADimensionNumbers`,
inferred from the shapes (:func:`infer_dimension_numbers`) or declared by the
pairing. The canonical layout the kernels see is flax's,
``A: (*batch, d_in, r)``, ``B: (*batch, r, d_out)``: :meth:`LoRAPlan.gather`
transposes and reshapes each leaf into it and :meth:`LoRAPlan.scatter`
writes results back into the leaf's own layout. Recognized leaves: flax nnx
``lora_a``/``lora_b`` siblings and qwix ``<weight>_lora_a``/``<weight>_lora_b``
siblings (``"nnx"``, N-D factors included), or peft ``lora_A: (r, d_in)``,
``lora_B: (d_out, r)`` (``"peft"``, marked ``transposed``).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp
import optax

from adaprelora_jax import dimension_numbers
from adaprelora_jax import validation
from adaprelora_jax.dimension_numbers import LoRADimensionNumbers

Role = Literal["a", "b", "row_stats", "col_stats"]
# Where a pair's gradient statistics come from (docs/design.md §5).
Statistics = Literal["auto", "exact", "tangent"]
ROLES: tuple[str, ...] = ("a", "b", "row_stats", "col_stats")

# Names of the exact-statistics probe leaves written by
# :class:`adaprelora_jax.nn.LoRA` next to ``lora_a``/``lora_b``.
ROW_STATS_NAME = "grad_sq_rows"
COL_STATS_NAME = "grad_sq_cols"


class LoRARole(NamedTuple):
  """What a pairing function says about one leaf.

  Attributes:
    pair: identifier shared by all leaves of one LoRA pair.
    role: ``"a"`` (``lora_a``), ``"b"`` (``lora_b``), or ``"row_stats"`` /
      ``"col_stats"`` for exact gradient-statistics leaves.
    transposed: the factor is stored in PyTorch layout (``lora_A: (r, d_in)``,
      ``lora_B: (d_out, r)``, with optional shared leading layer axes).
    layout: any hashable describing how the leaf is laid out across devices
      (e.g. its sharding, see
      :func:`adaprelora_jax.sharding.sharded_pairing`). Same-shaped pairs are
      stacked and updated together only if their leaves' layouts agree:
      stacking differently sharded factors would make XLA reshard them.
    dimension_numbers: the pair's axes (:class:`LoRADimensionNumbers`);
      None: inferred from the factor shapes
      (:func:`infer_dimension_numbers`). May be given on either factor's
      role; if given on both they must agree.
    scale: the pair's LoRA scale ``s`` (the model computes
      ``x·(s·a·b)``, e.g. qwix's ``alpha / rank``); None: 1. Optimizers that
      take a ``lora_scale`` multiply it by this (docs/design.md §9).
    sharded_axes: axes of this factor that are sharded across devices
      (:func:`adaprelora_jax.sharding.sharded_pairing` fills them in). When
      several axes form ``d_in`` (``d_out``) and the dimension numbers do not
      order them, sharded ones are flattened first: only a major axis keeps
      its sharding through the reshape (docs/design.md §9).
  """

  pair: str
  role: Role
  transposed: bool = False
  layout: Hashable = None
  dimension_numbers: LoRADimensionNumbers | None = None
  scale: float | None = None
  sharded_axes: tuple[int, ...] = ()


PairingFn = Callable[[tuple[str, ...], Any], LoRARole | None]
Pairing = Literal["nnx", "peft"] | PairingFn


def _key_name(key: Any) -> str:
  for attribute in ("key", "name", "idx"):
    if hasattr(key, attribute):
      return str(getattr(key, attribute))
  return str(key)


def path_names(path: Sequence[Any]) -> tuple[str, ...]:
  """A jax key path as a tuple of strings.

  The trailing ``value`` attribute that flax nnx ``Variable`` nodes add is
  dropped, so ``nnx.State`` and plain dicts give the same names.
  """
  names = tuple(_key_name(key) for key in path)
  if path and type(path[-1]).__name__ == "GetAttrKey" and names[-1] == "value":
    names = names[:-1]
  return names


def format_path(names: Sequence[str]) -> str:
  return "/".join(names) if names else "<root>"


_NNX_ROLES: dict[str, Role] = {
  "lora_a": "a",
  "lora_b": "b",
  ROW_STATS_NAME: "row_stats",
  COL_STATS_NAME: "col_stats",
}
# qwix (``qwix.LoraProvider``) names the factors of a weight ``w`` (``kernel``
# for ``nnx.Linear``) ``w_lora_a`` / ``w_lora_b``, next to ``w``.
_QWIX_SUFFIXES: tuple[tuple[str, Role], ...] = (("_lora_a", "a"), ("_lora_b", "b"))


def nnx_pairing(path: tuple[str, ...], leaf: Any) -> LoRARole | None:
  """Pairs flax ``nnx.LoRA`` and qwix LoRA leaves.

  flax: siblings named ``lora_a`` and ``lora_b`` (pair: their parent's path),
  and the exact-statistics leaves ``grad_sq_rows`` and ``grad_sq_cols`` of
  :class:`adaprelora_jax.nn.LoRA`. qwix (``qwix.apply_lora_to_model``):
  siblings ``<weight>_lora_a`` and ``<weight>_lora_b`` (pair: the weight's
  path, e.g. ``blocks/0/attn/q_einsum/w``), whose factors may be N-D
  (:func:`infer_dimension_numbers`).
  """
  del leaf
  if not path:
    return None
  name = path[-1]
  role = _NNX_ROLES.get(name)
  if role is not None:
    return LoRARole(format_path(path[:-1]), role)
  for suffix, role in _QWIX_SUFFIXES:
    if name.endswith(suffix) and len(name) > len(suffix):
      return LoRARole(format_path((*path[:-1], name[: -len(suffix)])), role)
  return None


def peft_pairing(path: tuple[str, ...], leaf: Any) -> LoRARole | None:
  """Pairs peft-style ``lora_A``/``lora_B`` leaves stored in PyTorch layout.

  Works on nested trees and on flat state dicts with dotted keys, e.g.
  ``"model.layers.0.q_proj.lora_A.default.weight"`` pairs with the same key
  with ``lora_B``. ``lora_A`` is (r, d_in) and ``lora_B`` is (d_out, r).
  """
  del leaf
  tokens = [token for name in path for token in name.split(".")]
  markers: tuple[tuple[str, Role], ...] = (("lora_A", "a"), ("lora_B", "b"))
  for marker, role in markers:
    if marker in tokens:
      index = tokens.index(marker)
      pair = ".".join(tokens[:index] + ["lora_*"] + tokens[index + 1 :])
      return LoRARole(pair, role, transposed=True)
  return None


_PRESETS: dict[str, PairingFn] = {"nnx": nnx_pairing, "peft": peft_pairing}


def resolve_pairing(pairing: Pairing) -> PairingFn:
  """Turns a preset name or a callable into a pairing function."""
  if isinstance(pairing, str):
    if pairing not in _PRESETS:
      raise ValueError(
        f"Unknown pairing preset {pairing!r}; use one of {sorted(_PRESETS)} "
        "or a callable (path, leaf) -> LoRARole | None."
      )
    return _PRESETS[pairing]
  if not callable(pairing):
    raise TypeError(f"pairing must be a preset name or a callable, got {pairing!r}.")
  return pairing


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


def _one_level(tree: Any) -> tuple[list[Any], Any]:
  """``tree``'s children and the structure of its root node alone."""
  return jax.tree_util.tree_flatten(tree, is_leaf=lambda node: node is not tree)


def _leaves_up_to(treedef: Any, tree: Any) -> list[Any]:
  """``treedef.flatten_up_to(tree)``, where a bare ``MaskedNode`` may stand in
  for a whole subtree of ``treedef``."""
  try:
    return treedef.flatten_up_to(tree)
  except (TypeError, ValueError):
    if isinstance(tree, optax.MaskedNode):
      return [tree] * treedef.num_leaves
    # One level down: ``tree``'s own children, each kept whole, if its node
    # is the one ``treedef`` expects.
    children, level = _one_level(tree)
    subtrees = treedef.children()
    if not subtrees or level != _one_level(treedef.unflatten([0] * treedef.num_leaves))[1]:
      raise
  return [
    leaf
    for subtree, child in zip(subtrees, children, strict=True)
    for leaf in _leaves_up_to(subtree, child)
  ]


def canonical_shape(pair: PairInfo, role: Literal["a", "b"]) -> tuple[int, ...]:
  """``(*lead, d_in, r)`` for ``a``, ``(*lead, r, d_out)`` for ``b``."""
  tail = (pair.d_in, pair.rank) if role == "a" else (pair.rank, pair.d_out)
  return (*pair.lead_shape, *tail)


@dataclasses.dataclass(frozen=True)
class PairGroup:
  """Pairs with identical canonical shapes, dtype, statistics source and
  layout (:attr:`LoRARole.layout`)."""

  members: tuple[PairInfo, ...]
  exact_statistics: bool

  @property
  def lead_shape(self) -> tuple[int, ...]:
    return self.members[0].lead_shape

  @property
  def size(self) -> int:
    """Number of single pairs in the stacked group (members × lead axes)."""
    return len(self.members) * math.prod(self.lead_shape)


@dataclasses.dataclass(frozen=True)
class LoRAPlan:
  """The LoRA structure of a parameter tree, with gather/scatter helpers.

  ``gather`` stacks the leaves of a group into one array whose leading axis
  enumerates single pairs (members × leading layer axes); ``scatter`` writes
  such stacked results back to leaf positions.
  """

  treedef: Any
  paths: tuple[str, ...]
  pairs: tuple[PairInfo, ...]
  groups: tuple[PairGroup, ...]
  other_indices: tuple[int, ...]
  statistics_indices: tuple[int, ...]

  @property
  def num_leaves(self) -> int:
    return len(self.paths)

  def leaves(self, tree: Any) -> list[Any]:
    """Leaves of ``tree`` at the positions of the params' leaves.

    ``tree`` may hold any subtree where params hold a leaf, and a bare
    ``optax.MaskedNode`` where params hold a whole subtree (a masked
    ``nnx.Variable`` of a state built from an ``nnx.State``, see
    :func:`adaprelora_jax.nnx_metadata.unwrap_masked_nodes`); each leaf
    position under it reads as that ``MaskedNode``.
    """
    return _leaves_up_to(self.treedef, tree)

  def unflatten(self, leaves: Sequence[Any]) -> Any:
    return jax.tree.unflatten(self.treedef, leaves)

  @property
  def num_rows(self) -> int:
    """Number of single pairs in the tree (pairs × leading layer axes)."""
    return sum(group.size for group in self.groups)

  def pair_rows(self) -> dict[int, slice]:
    """Where each pair's rows sit in a vector over all single pairs.

    Such vectors (see :class:`adaprelora_jax.slots.PairScalar`) list the
    groups in order, each as stacked by :meth:`gather`: members, then their
    leading layer axes.

    Returns:
      ``{pair.a_index: slice}``, covering ``range(num_rows)``.
    """
    rows = {}
    for group, group_rows in zip(self.groups, self.group_rows(), strict=True):
      per_member = math.prod(group.lead_shape)
      for position, pair in enumerate(group.members):
        start = group_rows.start + position * per_member
        rows[pair.a_index] = slice(start, start + per_member)
    return rows

  def group_rows(self) -> list[slice]:
    """Where each group's rows sit in a vector over all single pairs."""
    ends = itertools.accumulate(group.size for group in self.groups)
    return [slice(end - group.size, end) for group, end in zip(self.groups, ends, strict=True)]

  def check_uniform_layouts(self, leaf_layouts: Sequence[Hashable], source: str) -> None:
    """Raises if a group stacks pairs whose factors are laid out differently.

    Args:
      leaf_layouts: one entry per leaf of the params (e.g. its partition
        spec, padded to the leaf's rank).
      source: where the layouts came from, for the message.

    Raises:
      ValueError: naming two pairs of one group whose factors' layouts differ.
    """
    for group in self.groups:
      layouts = [(leaf_layouts[pair.a_index], leaf_layouts[pair.b_index]) for pair in group.members]
      for pair, layout in zip(group.members, layouts, strict=True):
        if layout != layouts[0]:
          raise ValueError(
            f"LoRA pairs '{group.members[0].a_path}' and '{pair.a_path}' have "
            f"the same shape but different {source} ({layouts[0]} vs "
            f"{layout}). Same-shaped pairs are stacked and updated together, "
            "so XLA would gather their factors into one layout on every "
            "step. Build the optimizer (and call state_shardings, "
            "second_moments and nonfinite_report) with "
            "pairing=adaprelora_jax.sharding.sharded_pairing(param_shardings)."
          )

  def gather(
    self,
    leaves: Sequence[Any],
    group: PairGroup,
    role: Role,
    *,
    factor_layout: bool = True,
  ) -> jax.Array:
    """Stacks one role's leaves of a group into (group.size, ...).

    Args:
      leaves: flattened tree (see :meth:`leaves`).
      group: the group.
      role: which leaf of each pair.
      factor_layout: the leaves are shaped like the factor itself (so they
        are brought into the canonical layout, :meth:`PairInfo.to_canonical`);
        False for arrays already in it, such as row/column statistics.
    """
    arrays = []
    for pair in group.members:
      array = leaves[_role_index(pair, role)]
      if factor_layout:
        array = pair.to_canonical(array, _factor_role(role))
      arrays.append(array)
    stacked = arrays[0][None] if len(arrays) == 1 else jnp.stack(arrays)
    tail = stacked.shape[1 + len(group.lead_shape) :]
    return stacked.reshape((group.size, *tail))

  def scatter(
    self,
    leaves: list[Any],
    group: PairGroup,
    role: Role,
    stacked: jax.Array,
    *,
    factor_layout: bool = True,
    positions: Sequence[jax.Array] | None = None,
  ) -> None:
    """Writes ``stacked`` (group.size, ...) back into ``leaves`` in place.

    Args:
      leaves: flattened tree, updated in place.
      group: the group.
      role: which leaf of each pair.
      stacked: the group's results, leading axis as in :meth:`gather`.
      factor_layout: as in :meth:`gather`.
      positions: the member positions ``0, 1, ...`` (at least one per member)
        as int32 scalars; members are cut out with dynamic slices at these
        positions. When the compiler cannot see their values (see
        :func:`adaprelora_jax.pairwise.pairwise_transform`), every member's
        slice compiles to the same kernel.
    """
    tail = stacked.shape[1:]
    per_member = stacked.reshape((len(group.members), *group.lead_shape, *tail))
    for position, pair in enumerate(group.members):
      if positions is None or len(group.members) == 1:
        array = per_member[position]
      else:
        array = jax.lax.dynamic_index_in_dim(per_member, positions[position], keepdims=False)
      if factor_layout:
        array = pair.to_leaf(array, _factor_role(role))
      leaves[_role_index(pair, role)] = array

  def mirror(
    self,
    by_role: Callable[[PairInfo, Role], Any],
    roles: Sequence[Role] = ("a", "b"),
    fill: Any = None,
  ) -> Any:
    """A tree shaped like the params with ``by_role(pair, role)`` at each
    factor position of ``roles`` and ``fill`` (default ``MaskedNode``)
    everywhere else."""
    fill = optax.MaskedNode() if fill is None else fill
    leaves: list[Any] = [fill] * self.num_leaves
    for pair in self.pairs:
      for role in roles:
        leaves[_role_index(pair, role)] = by_role(pair, role)
    return self.unflatten(leaves)

  def other_mask(self) -> Any:
    """Boolean tree: True at leaves that are not part of any LoRA pair."""
    other = set(self.other_indices)
    return self.unflatten([index in other for index in range(self.num_leaves)])


def _factor_role(role: Role) -> Literal["a", "b"]:
  """``role`` if it is a factor's: only factor-shaped leaves have a layout."""
  if role in ("a", "b"):
    return role
  raise ValueError(f"Role {role!r} is not a factor's: its leaves need factor_layout=False.")


def _role_index(pair: PairInfo, role: Role) -> int:
  index = {
    "a": pair.a_index,
    "b": pair.b_index,
    "row_stats": pair.row_stats_index,
    "col_stats": pair.col_stats_index,
  }[role]
  if index is None:
    raise ValueError(f"LoRA pair {pair.name!r} has no {role!r} leaf.")
  return index


def plan_pairs(
  params: Any,
  pairing: Pairing = "nnx",
  *,
  strict: bool = False,
  statistics: Statistics = "auto",
) -> LoRAPlan:
  """Finds and validates the LoRA pairs of a parameter tree.

  Args:
    params: parameter pytree (dicts, ``nnx.State``, nested modules; leaves
      may carry leading stacked/scanned-layer axes).
    pairing: ``"nnx"`` (``lora_a``/``lora_b`` siblings, flax layout),
      ``"peft"`` (``lora_A``/``lora_B``, PyTorch layout) or a callable
      ``(path: tuple[str, ...], leaf) -> LoRARole | None``.
    strict: raise if a leaf is not part of a LoRA pair.
    statistics: ``"exact"`` requires exact-statistics leaves for every pair,
      ``"tangent"`` ignores them, ``"auto"`` uses them where present.

  Returns:
    The :class:`LoRAPlan`.

  Raises:
    ValueError: naming the parameter path, for unpaired, duplicated,
      mis-shaped or rank-mismatched factors, non-floating factors, malformed
      statistics leaves, non-LoRA leaves under ``strict=True``, or no pairs.
  """
  validation.check_choice("statistics", statistics, get_args(Statistics))
  pairing_fn = resolve_pairing(pairing)
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  names = [path_names(path) for path, _ in flat]
  paths = tuple(format_path(name) for name in names)
  members: dict[str, dict[str, tuple[int, LoRARole]]] = {}
  others: list[int] = []
  for index, ((_, leaf), name) in enumerate(zip(flat, names, strict=True)):
    found = pairing_fn(name, leaf)
    if found is None:
      others.append(index)
      continue
    found = LoRARole(*found)
    if found.role not in ROLES:
      raise ValueError(
        f"Pairing returned role {found.role!r} for '{paths[index]}'; expected one of {ROLES}."
      )
    slots = members.setdefault(found.pair, {})
    if found.role in slots:
      raise ValueError(
        f"LoRA pair {found.pair!r} has two {found.role!r} leaves: "
        f"'{paths[slots[found.role][0]]}' and '{paths[index]}'."
      )
    slots[found.role] = (index, found)

  if strict and others:
    listed = ", ".join(f"'{paths[i]}'" for i in others[:10])
    raise ValueError(
      f"strict=True but {len(others)} leaves are not LoRA factors: {listed}"
      + (" ..." if len(others) > 10 else "")
      + ". Train them with another optimizer (e.g. optax.partition) or pass "
      "strict=False to use the fallback transform."
    )

  pairs: list[PairInfo] = []
  statistics_indices: list[int] = []
  carries_statistics: dict[int, bool] = {}
  for pair_name, slots in members.items():
    pair = _validate_pair(pair_name, slots, flat, paths)
    carries_statistics[pair.a_index] = pair.has_statistics
    if pair.row_stats_index is not None and pair.col_stats_index is not None:
      statistics_indices += [pair.row_stats_index, pair.col_stats_index]
      if statistics == "tangent":
        pair = dataclasses.replace(pair, row_stats_index=None, col_stats_index=None)
    elif statistics == "exact":
      raise ValueError(
        f"statistics='exact' but LoRA pair {pair_name!r} ('{pair.a_path}', "
        f"'{pair.b_path}') carries no exact gradient statistics "
        f"('{ROW_STATS_NAME}'/'{COL_STATS_NAME}' leaves, written by "
        "adaprelora_jax.nn.LoRA). Use statistics='auto' or 'tangent'."
      )
    pairs.append(pair)
  if not pairs:
    raise ValueError(
      "No LoRA pairs found in the parameters "
      f"(pairing={pairing!r}; {len(paths)} leaves, e.g. "
      f"{', '.join(repr(p) for p in paths[:5])})."
    )

  # Whether a pair carries statistics leaves splits groups even when they are
  # ignored ("tangent"), so the groups, and with them the order of stacked
  # state, do not depend on ``statistics``: host-side readers of the state
  # (second_moments, nonfinite_report) plan the pairs with the default.
  grouped: dict[tuple[Any, ...], list[PairInfo]] = {}
  for pair in pairs:
    # Leaf shapes and dimension numbers too: members of a group share one
    # leaf layout, so their state (and its stand-in, adaprelora_jax.sharding)
    # is laid out alike.
    key = (
      pair.lead_shape,
      pair.d_in,
      pair.rank,
      pair.d_out,
      jnp.dtype(pair.dtype).name,
      carries_statistics[pair.a_index],
      pair.layout,
      pair.a_shape,
      pair.b_shape,
      pair.dimension_numbers,
    )
    grouped.setdefault(key, []).append(pair)
  groups = tuple(
    PairGroup(tuple(group), exact_statistics=group[0].has_statistics) for group in grouped.values()
  )
  return LoRAPlan(
    treedef=treedef,
    paths=paths,
    pairs=tuple(pairs),
    groups=groups,
    other_indices=tuple(others),
    statistics_indices=tuple(statistics_indices),
  )


def _validate_pair(
  pair_name: str,
  slots: dict[str, tuple[int, LoRARole]],
  flat: Sequence[tuple[Any, Any]],
  paths: Sequence[str],
) -> PairInfo:
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
    for role, size in (("row_stats", d_in), ("col_stats", d_out)):
      index = slots[role][0]
      _check_floating_array(
        flat[index][1],
        (*lead, size),
        f"LoRA statistics leaf '{paths[index]}' of pair {pair_name!r}",
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


def annotate_pairing(
  pairing: Pairing = "nnx",
  *,
  dimension_numbers: (
    LoRADimensionNumbers
    | dict[str, LoRADimensionNumbers]
    | Callable[[str], LoRADimensionNumbers | None]
    | None
  ) = None,
  scale: float | dict[str, float] | Callable[[str], float | None] | None = None,
) -> PairingFn:
  """A pairing that declares dimension numbers and/or LoRA scales per pair.

  Example (a MaxText-style scanned model, layers at axis 1, qwix
  ``alpha=16, rank=8``)::

    pairing = adaprelora_jax.pairing.annotate_pairing(
        dimension_numbers=LoRADimensionNumbers(a_batch_axes=(1,), b_batch_axes=(1,)),
        scale=16 / 8)
    tx = adaprelora_jax.adaprelora(1e-3, pairing=pairing)

  Args:
    pairing: how the pairs are found (preset name or callable).
    dimension_numbers: for every pair (a :class:`LoRADimensionNumbers`), by
      pair name (a dict; pairs not in it are inferred) or a callable
      ``pair name -> LoRADimensionNumbers | None``.
    scale: the pairs' LoRA scale (:attr:`LoRARole.scale`), given the same
      ways.

  Returns:
    A pairing function (list it in ``static_args`` of
    ``optax.inject_hyperparams``).
  """
  pairing_fn = resolve_pairing(pairing)

  def lookup(spec, name):
    if spec is None or isinstance(spec, (LoRADimensionNumbers, int, float)):
      return spec
    if isinstance(spec, dict):
      return spec.get(name)
    return spec(name)

  def annotated(path: tuple[str, ...], leaf: Any) -> LoRARole | None:
    found = pairing_fn(path, leaf)
    if found is None:
      return None
    found = LoRARole(*found)
    if found.role not in ("a", "b"):
      return found
    updates = {}
    declared = lookup(dimension_numbers, found.pair)
    if declared is not None:
      updates["dimension_numbers"] = declared
    pair_scale = lookup(scale, found.pair)
    if pair_scale is not None:
      updates["scale"] = pair_scale
    return found._replace(**updates)

  return annotated


def check_matching_tree(plan: LoRAPlan, tree: Any, what: str) -> list[Any]:
  """Flattens ``tree`` against the plan and checks factor shapes and dtypes.

  Used to validate gradients against the params the plan was built from.
  """
  try:
    leaves = plan.leaves(tree)
  except (ValueError, TypeError) as error:
    raise ValueError(
      f"The {what} tree does not match the parameter tree structure: {error}"
    ) from error
  for pair in plan.pairs:
    for role in ("a", "b"):
      index = _role_index(pair, role)
      _check_floating_array(
        leaves[index], leaf_shape(pair, role), f"{what} for '{plan.paths[index]}'"
      )
  return leaves


def _check_floating_array(leaf: Any, expected_shape: tuple[int, ...], description: str) -> None:
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
