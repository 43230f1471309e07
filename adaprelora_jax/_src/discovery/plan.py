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
"""The LoRA structure of a whole parameter tree: pairs, groups, gather/scatter.

:func:`plan_pairs` applies a pairing (:mod:`adaprelora_jax.pairing`) to a
tree, validates the pairs (:func:`adaprelora_jax._src.discovery.pairs.validate_pair`; every
error names the parameter path) and groups pairs of equal shape so that
optimizers can stack them and process each group with one ``jax.vmap`` (the
traced program then does not grow with the number of layers). Pairs that are
sharded differently must not be stacked together; a pairing function says so
through :attr:`LoRARole.layout`
(:func:`adaprelora_jax.sharding.sharded_pairing` fills it in).
:meth:`LoRAPlan.gather` stacks a group's leaves in the canonical layout
(docs/design.md §9) and :meth:`LoRAPlan.scatter` writes results back into
each leaf's own layout.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Literal, get_args

import jax
import jax.numpy as jnp
import optax

from adaprelora_jax._src import validation
from adaprelora_jax._src.discovery.pairing import COL_STATS_NAME
from adaprelora_jax._src.discovery.pairing import ROLES
from adaprelora_jax._src.discovery.pairing import ROW_STATS_NAME
from adaprelora_jax._src.discovery.pairing import LoRARole
from adaprelora_jax._src.discovery.pairing import Pairing
from adaprelora_jax._src.discovery.pairing import Role
from adaprelora_jax._src.discovery.pairing import Statistics
from adaprelora_jax._src.discovery.pairing import format_path
from adaprelora_jax._src.discovery.pairing import path_names
from adaprelora_jax._src.discovery.pairing import resolve_pairing
from adaprelora_jax._src.discovery.pairs import PairInfo
from adaprelora_jax._src.discovery.pairs import check_floating_array
from adaprelora_jax._src.discovery.pairs import leaf_shape
from adaprelora_jax._src.discovery.pairs import validate_pair


def _one_level(tree: Any) -> tuple[list[Any], Any]:
  """``tree``'s children and the structure of its root node alone."""
  return jax.tree_util.tree_flatten(tree, is_leaf=lambda node: node is not tree)


def _same_node(level: Any, expected: Any) -> bool:
  """Whether two one-level structures are the same node.

  An nnx ``Variable`` node carries its metadata (e.g. its sharding names),
  and a state leaf's Variable need not have the parameter's: the same
  Variable type is the same node.
  """
  if level == expected:
    return True
  kind, expected_kind = level.node_data(), expected.node_data()
  if kind is None or expected_kind is None:
    return False
  return kind[0] is expected_kind[0] and hasattr(kind[0], "get_metadata")


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
    expected = _one_level(treedef.unflatten([0] * treedef.num_leaves))[1]
    if not subtrees or not _same_node(level, expected):
      raise
  return [
    leaf
    for subtree, child in zip(subtrees, children, strict=True)
    for leaf in _leaves_up_to(subtree, child)
  ]


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
    :func:`adaprelora_jax._src.engine.nnx_labels.unwrap_masked_nodes`); each leaf
    position under it reads as that ``MaskedNode``.
    """
    return _leaves_up_to(self.treedef, tree)

  def unflatten(self, leaves: Sequence[Any]) -> Any:
    return jax.tree.unflatten(self.treedef, leaves)

  def update_tree(self, leaves: list[Any]) -> Any:
    """The update tree of per-leaf ``leaves``, with zeros at the statistics
    probes (they are inputs, not parameters)."""
    for index in self.statistics_indices:
      leaves[index] = jnp.zeros_like(leaves[index])
    return self.unflatten(leaves)

  @property
  def num_rows(self) -> int:
    """Number of single pairs in the tree (pairs × leading layer axes)."""
    return sum(group.size for group in self.groups)

  def pair_rows(self) -> dict[int, slice]:
    """Where each pair's rows sit in a vector over all single pairs.

    Such vectors (see :class:`adaprelora_jax._src.engine.slots.PairScalar`) list the
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
        False for arrays already in it. Statistics leaves are always brought
        into ``(*lead, d)`` (:meth:`PairInfo.statistics_to_canonical`).
    """
    arrays = []
    for pair in group.members:
      array = leaves[_role_index(pair, role)]
      if role == "row_stats" or role == "col_stats":
        array = pair.statistics_to_canonical(array, role)
      elif factor_layout:
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
        :class:`adaprelora_jax._src.engine.pairwise.Bookkeeping`), every member's
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


def quoted_paths(paths: Sequence[str], indices: Sequence[int], most: int = 10) -> str:
  """The paths at ``indices``, quoted and comma-separated, the first ``most`` of
  them (then `` ...``): how errors list leaves."""
  listed = ", ".join(f"'{paths[i]}'" for i in indices[:most])
  return listed + (" ..." if len(indices) > most else "")


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
      ``"tangent"`` and ``"surrogate"`` ignore them, ``"auto"`` uses them
      where present.

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
    raise ValueError(
      f"strict=True but {len(others)} leaves are not LoRA factors: {quoted_paths(paths, others)}"
      ". Train them with another optimizer (e.g. optax.partition) or pass "
      "strict=False to train them with the optimizer's non_lora transform."
    )

  pairs: list[PairInfo] = []
  statistics_indices: list[int] = []
  carries_statistics: dict[int, bool] = {}
  for pair_name, slots in members.items():
    pair = validate_pair(pair_name, slots, flat, paths)
    carries_statistics[pair.a_index] = pair.has_statistics
    if pair.row_stats_index is not None and pair.col_stats_index is not None:
      statistics_indices += [pair.row_stats_index, pair.col_stats_index]
      if statistics in ("tangent", "surrogate"):
        pair = dataclasses.replace(pair, row_stats_index=None, col_stats_index=None)
    elif statistics == "exact":
      raise ValueError(
        f"statistics='exact' but LoRA pair {pair_name!r} ('{pair.a_path}', "
        f"'{pair.b_path}') carries no exact gradient statistics "
        f"('{ROW_STATS_NAME}'/'{COL_STATS_NAME}' leaves, written by "
        "adaprelora_jax.nn.LoRA). Use statistics='auto', 'tangent' or 'surrogate'."
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
      check_floating_array(
        leaves[index], leaf_shape(pair, role), f"{what} for '{plan.paths[index]}'"
      )
  return leaves
