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
"""The pairwise engine: helpers on the plan for transforms built per LoRA pair.

Every per-pair optimizer of this package is a kernel for a single pair
``(a, b)`` (canonical flax layout ``a: (d_in, r)``, ``b: (r, d_out)``), a
typed per-pair state (a NamedTuple) and where each of its fields is stored
(``storage``: the same NamedTuple holding kinds of
:mod:`adaprelora_jax._src.engine.slots`); the kernel's inputs and result are
:mod:`adaprelora_jax._src.maths.pair_io`'s. Its state is
``(count, pairs, bookkeeping)`` and its ``init_fn`` / ``update_fn`` read
(``finder`` a :class:`~adaprelora_jax._src.engine.routing.PairFinder`)::

  plan, labels = finder.find(params)
  State(count, init_pairs(plan, labels, storage), init_bookkeeping(plan, labels))

  plan, labels = finder.find(params)
  step = update_pairs(kernel, plan, labels, updates, params, state, storage=storage)

:func:`update_pairs` is one update of every pair: gather each group of
same-shaped pairs (:func:`gather_inputs`), map the kernel over it
(:func:`map_groups`: ``jax.vmap``, so the traced program does not grow with
the number of layers, ``docs/design.md`` §10), scatter the steps back
(:func:`scatter_updates`) and store the new per-pair state
(:func:`write_pairs`). :func:`transformation` makes the optax transform,
with the optional per-step metrics (:mod:`adaprelora_jax._src.maths.metrics`)
beside the state.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adaprelora_jax._src.discovery import plan as plan_lib
from adaprelora_jax._src.engine import slots as slots_lib
from adaprelora_jax._src.engine import state_layout
from adaprelora_jax._src.maths import metrics as metrics_lib
from adaprelora_jax._src.maths.pair_io import KernelResult
from adaprelora_jax._src.maths.pair_io import PairInputs
from adaprelora_jax._src.maths.pair_io import PairKernel
from adaprelora_jax._src.maths.pair_io import PreparePair

if TYPE_CHECKING:
  from adaprelora_jax._src.engine import nnx_labels


class Bookkeeping(NamedTuple):
  """The engine's own entries of every pairwise transform's state.

  Attributes:
    pair_position: where each pair sits among the members of its group, an
      int32 at each ``lora_a`` (shaped like the factor's leading axes),
      ``optax.MaskedNode()`` elsewhere; set by ``init``, never changed. An
      edited position makes its group's updates NaN rather than swapping
      pairs. Positions are state rather than Python ints because a static
      slice offset is part of its XLA kernel: every member's slice would
      compile separately, and compile time would grow linearly with the
      number of per-layer pairs. Offsets known only at run time make the
      slices of all members of a shape one kernel (docs/design.md §10).
    layout_version: the state layout (int32,
      :data:`adaprelora_jax.STATE_LAYOUT_VERSION`,
      :mod:`adaprelora_jax._src.engine.state_layout`).
  """

  pair_position: Any
  layout_version: jax.Array


_POSITION_SLOT = slots_lib.Slot("a", (), jnp.int32)


def init_bookkeeping(plan: plan_lib.LoRAPlan, labels: nnx_labels.StateLabels) -> Bookkeeping:
  """The :class:`Bookkeeping` of a new state."""
  member_position = {
    pair.a_index: position for group in plan.groups for position, pair in enumerate(group.members)
  }
  positions = plan.mirror(
    lambda pair, role: jnp.full(pair.lead_shape, member_position[pair.a_index], jnp.int32),
    roles=("a",),
  )
  return Bookkeeping(labels.mirrored(positions, (_POSITION_SLOT,)), state_layout.version_leaf())


def init_pairs(plan: plan_lib.LoRAPlan, labels: nnx_labels.StateLabels, storage: Any) -> Any:
  """Every pair's state at zero, as ``storage`` lays it out.

  Args:
    plan: the params' plan.
    labels: from :meth:`~adaprelora_jax._src.engine.routing.PairFinder.find`.
    storage: the transform's per-pair NamedTuple holding, for each field, a
      kind of :mod:`adaprelora_jax._src.engine.slots` (a plain tuple of slots is
      :class:`adaprelora_jax._src.engine.slots.Slots`), or None (the field is absent).

  Returns:
    A NamedTuple of ``storage``'s type holding each field's state entry.
  """
  return type(storage)(
    *(
      None if kind is None else slots_lib.as_field(name, kind).init(plan, labels)
      for name, kind in zip(storage._fields, storage, strict=True)
    )
  )


def read_pairs(plan: plan_lib.LoRAPlan, storage: Any, entries: Any) -> list[Any]:
  """Per group, its pairs' state stacked, as the kernel's per-pair NamedTuple."""
  values = [
    [None] * len(plan.groups)
    if kind is None
    else slots_lib.as_field(name, kind).read(plan, getattr(entries, name), name)
    for name, kind in zip(storage._fields, storage, strict=True)
  ]
  return [type(storage)(*(field[index] for field in values)) for index in range(len(plan.groups))]


def write_pairs(
  plan: plan_lib.LoRAPlan,
  labels: nnx_labels.StateLabels,
  storage: Any,
  entries: Any,
  results: list[KernelResult],
  positions: list[tuple[list[jax.Array], jax.Array]],
) -> Any:
  """The kernels' new per-pair states stored back, as :func:`init_pairs` laid them out."""
  group_positions = [members for members, _ in positions]
  return type(storage)(
    *(
      None
      if kind is None
      else slots_lib.as_field(name, kind).write(
        plan,
        getattr(entries, name),
        [getattr(result.state, name) for result in results],
        group_positions,
        labels,
      )
      for name, kind in zip(storage._fields, storage, strict=True)
    )
  )


def _gather_group(
  plan: plan_lib.LoRAPlan,
  group: plan_lib.PairGroup,
  param_leaves: list[Any],
  grads: list[Any],
) -> PairInputs:
  def gather(leaves, role, **kw):
    return plan.gather(leaves, group, role, **kw)

  row_stats = col_stats = None
  if group.exact_statistics:
    row_stats = gather(grads, "row_stats", factor_layout=False)
    col_stats = gather(grads, "col_stats", factor_layout=False)
  lora_scale = None
  scales = [pair.scale for pair in group.members]
  if any(scale != 1.0 for scale in scales):
    # One entry per single pair, in gather's order (members, then lead axes).
    lora_scale = jnp.repeat(jnp.asarray(scales, jnp.float32), math.prod(group.lead_shape))
  return PairInputs(
    gather(param_leaves, "a"),
    gather(param_leaves, "b"),
    gather(grads, "a"),
    gather(grads, "b"),
    row_stats,
    col_stats,
    lora_scale,
  )


def gather_inputs(plan: plan_lib.LoRAPlan, updates: Any, params: Any) -> list[PairInputs]:
  """Per group, its pairs' factors, gradients and statistics, stacked.

  Raises:
    ValueError: for gradients that do not match the params, naming the path.
  """
  grads = plan_lib.check_matching_tree(plan, updates, "gradient")
  param_leaves = plan.leaves(params)
  return [_gather_group(plan, group, param_leaves, grads) for group in plan.groups]


def _over_pairs(fn: Callable[..., Any], map_pairs: bool) -> Callable[..., Any]:
  """``fn(*per_pair_args, *shared_args)`` over the leading (pair) axis of the
  per-pair arguments: ``jax.vmap`` (one batched program), or with
  ``map_pairs`` ``jax.lax.map`` (a loop of single-pair programs)."""

  def over(per_pair: tuple, *shared: Any) -> Any:
    if not map_pairs:
      return jax.vmap(lambda *args: fn(*args, *shared))(*per_pair)
    return jax.lax.map(lambda args: fn(*args, *shared), per_pair)

  return over


def _default_backend_is_cpu() -> bool:
  return jax.default_backend() == "cpu"


def map_groups(
  kernel: PairKernel,
  inputs: list[PairInputs],
  pair_states: list[Any] | None,
  count: jax.Array,
  *,
  prepare_pair: PreparePair | None = None,
  map_pairs: bool | Literal["on_cpu"] = False,
) -> list[KernelResult]:
  """The kernel over each group's pairs, after the optional first pass.

  Args:
    kernel: the per-pair rule (``PairKernel``).
    inputs: from :func:`gather_inputs`.
    pair_states: from :func:`read_pairs`, or None without per-pair state.
    count: the number of previous updates.
    prepare_pair: a first pass over every pair, for kernels that need a
      reduction over all pairs before updating any (LoRA-RITE's global
      gradient clipping): ``(carry, contribution) = prepare_pair(inputs)``;
      the kernel then receives ``carry`` and the sum of all contributions as
      ``total`` (None without it).
    map_pairs: run the kernel over a group's pairs with ``jax.lax.map``
      instead of ``jax.vmap``, so that every decomposition it calls is
      unbatched. For kernels built on batched LAPACK calls (QR, SVD, eigh)
      on XLA:CPU, where jaxlib 0.10's batch-parallel LAPACK kernels can
      deadlock the intra-op thread pool (docs/design.md §10). The updates
      are the same; only the schedule differs. ``"on_cpu"``: when the
      default backend is CPU, decided when the update is traced.

  Returns:
    One :class:`KernelResult` per group, stacked over its pairs.
  """
  mapped = _default_backend_is_cpu() if map_pairs == "on_cpu" else bool(map_pairs)
  total = None
  if prepare_pair is not None:
    prepared = [_over_pairs(prepare_pair, mapped)((group,)) for group in inputs]
    inputs = [carry for carry, _ in prepared]
    total = functools.reduce(operator.add, [jnp.sum(contribution) for _, contribution in prepared])
  over = _over_pairs(kernel, mapped)
  states = [None] * len(inputs) if pair_states is None else pair_states
  return [
    over((group_inputs, pair_state), count, total)
    for group_inputs, pair_state in zip(inputs, states, strict=True)
  ]


def member_positions(
  plan: plan_lib.LoRAPlan, bookkeeping: Bookkeeping
) -> list[tuple[list[jax.Array], jax.Array]]:
  """Per group, the members' positions from the state and whether they are
  ``0, 1, ...`` (False for a state that was edited)."""
  leaves = plan.leaves(bookkeeping.pair_position)
  found = []
  for group in plan.groups:
    positions = [jnp.ravel(leaves[pair.a_index])[0] for pair in group.members]
    expected = jnp.arange(len(positions), dtype=jnp.int32)
    found.append((positions, jnp.all(jnp.stack(positions) == expected)))
  return found


def scatter_updates(
  plan: plan_lib.LoRAPlan,
  updates: Any,
  results: list[KernelResult],
  positions: list[tuple[list[jax.Array], jax.Array]],
) -> Any:
  """The update tree: each pair's factor steps at its leaves, in the
  parameter dtype, and zero at the statistics probes."""
  out = list(plan.leaves(updates))
  for group, result, (members, valid) in zip(plan.groups, results, positions, strict=True):
    dtype = group.members[0].dtype
    deltas: tuple[tuple[plan_lib.Role, jax.Array], ...] = (
      ("a", result.delta_a),
      ("b", result.delta_b),
    )
    for role, delta in deltas:
      # Wrong positions would silently swap the pairs' updates: make them NaN.
      delta = jnp.where(valid, delta, jnp.nan).astype(dtype)
      plan.scatter(out, group, role, delta, positions=members)
  return plan.update_tree(out)


class PairwiseStep(NamedTuple):
  """One update of every pair (:func:`update_pairs`).

  Attributes:
    updates: the update tree: each pair's factor steps at its leaves, in the
      parameter dtype, zero at the statistics probes.
    pairs: the new per-pair state entries (None without per-pair state).
    metrics: ``() -> StepMetrics`` of the update (:func:`step_metrics`),
      called only by transforms that keep metrics.
  """

  updates: Any
  pairs: Any
  metrics: Callable[[], metrics_lib.StepMetrics]


def update_pairs(
  kernel: PairKernel,
  plan: plan_lib.LoRAPlan,
  labels: nnx_labels.StateLabels,
  updates: Any,
  params: Any,
  state: Any,
  *,
  storage: Any = None,
  prepare_pair: PreparePair | None = None,
  map_pairs: bool | Literal["on_cpu"] = False,
) -> PairwiseStep:
  """One update of every pair: gather, map the kernel, scatter, store.

  Args:
    kernel: the per-pair rule (``PairKernel``).
    plan: from :meth:`~adaprelora_jax._src.engine.routing.PairFinder.find`.
    labels: from :meth:`~adaprelora_jax._src.engine.routing.PairFinder.find`.
    updates: the incoming updates (gradients).
    params: the params.
    state: the transform's state: its ``count``, ``bookkeeping`` and, with
      ``storage``, ``pairs``.
    storage: where each per-pair field is stored (:func:`init_pairs`), or
      None without per-pair state.
    prepare_pair: see :func:`map_groups`.
    map_pairs: see :func:`map_groups`.

  Returns:
    The :class:`PairwiseStep`.
  """
  inputs = gather_inputs(plan, updates, params)
  pair_states = None if storage is None else read_pairs(plan, storage, state.pairs)
  results = map_groups(
    kernel, inputs, pair_states, state.count, prepare_pair=prepare_pair, map_pairs=map_pairs
  )
  positions = member_positions(plan, state.bookkeeping)
  pairs = (
    None if storage is None else write_pairs(plan, labels, storage, state.pairs, results, positions)
  )
  return PairwiseStep(
    scatter_updates(plan, updates, results, positions),
    pairs,
    functools.partial(step_metrics, inputs, results),
  )


def step_metrics(inputs: list[PairInputs], results: list[KernelResult]) -> metrics_lib.StepMetrics:
  """The factor norms of every pair and the kernel's own metrics, aggregated."""
  per_pair = [
    {**jax.vmap(metrics_lib.factor_norms)(group.lora_a, group.lora_b), **result.metrics}
    for group, result in zip(inputs, results, strict=True)
  ]
  return metrics_lib.StepMetrics(metrics_lib.aggregate(per_pair))


UpdateWithMetrics = Callable[..., tuple[Any, Any, Callable[[], metrics_lib.StepMetrics]]]


def transformation(
  init_fn: Callable[[Any], Any], update_fn: UpdateWithMetrics, *, metrics: bool
) -> optax.GradientTransformationExtraArgs:
  """The optax transform of a pairwise ``init_fn`` and ``update_fn``.

  Args:
    init_fn: ``params -> state``.
    update_fn: ``(updates, state, params) -> (updates, state,
      step_metrics)``, ``step_metrics()`` giving the update's
      :class:`adaprelora_jax._src.maths.metrics.StepMetrics` (e.g. a partial of
      :func:`step_metrics`), called only with ``metrics``.
    metrics: keep the last update's metrics: the state is then a
      :class:`adaprelora_jax._src.maths.metrics.WithMetricsState` around ``init_fn``'s
      (read them with :func:`adaprelora_jax.step_metrics`). Off, the state
      is ``init_fn``'s alone.

  Returns:
    The :class:`optax.GradientTransformationExtraArgs`.
  """
  if not metrics:

    def update_without_metrics(updates, state, params=None, **extra_args):
      del extra_args
      return update_fn(updates, state, params)[:2]

    return optax.GradientTransformationExtraArgs(init_fn, update_without_metrics)

  def init_with_metrics(params):
    state = init_fn(params)
    # Which metrics the kernel reports (e.g. only for pairs with exact
    # statistics) is known once it is traced: trace one update abstractly,
    # so that the state's structure is fixed from the start.
    shapes = jax.eval_shape(lambda p, s: update_fn(p, s, p)[2](), params, state)
    return metrics_lib.WithMetricsState(
      state, jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
    )

  def update_with_metrics(updates, state, params=None, **extra_args):
    del extra_args
    new_updates, new_state, step = update_fn(updates, state.inner_state, params)
    return new_updates, metrics_lib.WithMetricsState(new_state, step())

  return optax.GradientTransformationExtraArgs(init_with_metrics, update_with_metrics)
