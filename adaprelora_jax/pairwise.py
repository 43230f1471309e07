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

Every per-pair optimizer of this package is a kernel for a single pair
``(a, b)`` (canonical flax layout ``a: (d_in, r)``, ``b: (r, d_out)``) and a
declaration of its per-pair state (:mod:`adaprelora_jax.slots`).
:func:`pairwise_transform` does the rest; one gradient goes through it as:

1. :class:`adaprelora_jax.routing.Router` finds the pairs
   (:func:`adaprelora_jax.plan.plan_pairs`) and checks the gradients
   against them;
2. each group of same-shaped pairs is gathered into stacked
   :class:`PairInputs` and each state field is read for it;
3. the kernel is ``jax.vmap``-ed (or ``jax.lax.map``-ed) over the group's
   pairs (the traced program does not grow with the number of layers);
4. the factor updates are scattered back to the leaves, each field writes
   its results, and the router finishes the other leaves;
5. with ``metrics=True``, the per-pair metrics (:mod:`adaprelora_jax.metrics`)
   are aggregated over all pairs, beside the state.

Kernels that need a reduction over *all* pairs before updating any
(LoRA-RITE's global gradient clipping) supply a ``prepare_pair`` first pass.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable, Mapping
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adaprelora_jax import linalg
from adaprelora_jax import metrics as metrics_lib
from adaprelora_jax import nnx_metadata
from adaprelora_jax import plan as plan_lib
from adaprelora_jax import routing
from adaprelora_jax import slots as slots_lib
from adaprelora_jax import state_layout


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
  row_stats: jax.Array | None = None
  col_stats: jax.Array | None = None
  lora_scale: jax.Array | None = None

  def promoted(self) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """``(a, b, g_a, g_b)`` in :func:`adaprelora_jax.linalg.compute_dtype`."""
    dtype = linalg.compute_dtype(self.lora_a, self.lora_b, self.grad_a, self.grad_b)
    return (
      self.lora_a.astype(dtype),
      self.lora_b.astype(dtype),
      self.grad_a.astype(dtype),
      self.grad_b.astype(dtype),
    )


# update_pair(inputs, state, count, total) -> (delta_a, delta_b, new_state,
# metrics): ``inputs`` is a PairInputs (or what ``prepare_pair`` returned),
# ``state`` a dict of the pair's fields, ``count`` the number of previous
# updates and ``total`` the sum over all pairs of prepare_pair's scalar (None
# without it); ``metrics`` the kernel's own per-pair scalars (a dict, may be
# empty; read only with ``metrics=True``).
KernelResult = tuple[jax.Array, jax.Array, dict[str, Any], dict[str, jax.Array]]
PairKernel = Callable[[Any, dict[str, Any], jax.Array, jax.Array | None], KernelResult]
PreparePair = Callable[[PairInputs], tuple[Any, jax.Array]]


def _gather_inputs(
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


# Where each pair sits among the members of its group: an int32 at each
# ``lora_a`` (shaped like the factor's leading axes). Positions are state
# rather than Python ints because a static slice offset is part of its XLA
# kernel: every member's slice would compile separately, and compile time
# would grow linearly with the number of per-layer pairs. Offsets known only
# at run time make the slices of all members of a shape one kernel
# (docs/design.md §10).
POSITION_SLOT = slots_lib.Slot("a", (), jnp.int32)


def _init_positions(plan: plan_lib.LoRAPlan, labels: nnx_metadata.StateLabels) -> Any:
  member_position = {
    pair.a_index: position for group in plan.groups for position, pair in enumerate(group.members)
  }
  positions = plan.mirror(
    lambda pair, role: jnp.full(pair.lead_shape, member_position[pair.a_index], jnp.int32),
    roles=("a",),
  )
  return labels.mirrored(positions, (POSITION_SLOT,))


def _member_positions(
  plan: plan_lib.LoRAPlan, entry: Any
) -> list[tuple[list[jax.Array], jax.Array]]:
  """Per group, the members' positions from the state and whether they are
  ``0, 1, ...`` (False for a state that was edited)."""
  leaves = plan.leaves(entry)
  found = []
  for group in plan.groups:
    positions = [jnp.ravel(leaves[pair.a_index])[0] for pair in group.members]
    expected = jnp.arange(len(positions), dtype=jnp.int32)
    found.append((positions, jnp.all(jnp.stack(positions) == expected)))
  return found


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


def _run_kernels(
  update_pair: PairKernel,
  prepare_pair: PreparePair | None,
  inputs: list[PairInputs],
  pair_states: list[dict[str, Any]],
  count: jax.Array,
  map_pairs: bool,
) -> list[KernelResult]:
  """The kernel over each group's pairs, after the optional first pass."""
  total = None
  if prepare_pair is not None:
    prepared = [_over_pairs(prepare_pair, map_pairs)((group,)) for group in inputs]
    inputs = [carry for carry, _ in prepared]
    total = functools.reduce(operator.add, [jnp.sum(contribution) for _, contribution in prepared])
  kernel = _over_pairs(update_pair, map_pairs)
  return [
    kernel((group_inputs, pair_state), count, total)
    for group_inputs, pair_state in zip(inputs, pair_states, strict=True)
  ]


def pairwise_transform(
  update_pair: PairKernel,
  *,
  fields: Mapping[str, slots_lib.Field | None],
  state_type: Callable[..., Any],
  router: routing.Router,
  prepare_pair: PreparePair | None = None,
  map_pairs: bool | Literal["on_cpu"] = False,
  metrics: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """An optax transform from a rule for one LoRA pair.

  For each group of same-shaped pairs the kernel is ``jax.vmap``-ed over the
  stacked pairs::

    delta_a, delta_b, new_state, pair_metrics = update_pair(inputs, state, count, total)

  ``delta_*`` are the factor updates (any floating dtype; cast to the
  parameter dtype), ``state`` / ``new_state`` map each name of ``fields`` to
  the pair's arrays (a tuple for multi-slot fields, None for a None field),
  ``count`` is the number of previous updates. If ``prepare_pair`` is given,
  a first pass computes ``(carry, contribution) = prepare_pair(inputs)`` for
  every pair, ``total`` is the sum of all contributions (over every pair of
  the tree) and the kernel receives ``carry`` instead of ``inputs``;
  otherwise ``total`` is None. ``pair_metrics`` is a dict of the kernel's
  own per-pair scalars (:mod:`adaprelora_jax.metrics`; a ``"skipped"`` flag
  counts skipped pairs), read only with ``metrics``.

  Args:
    update_pair: the per-pair kernel (above).
    fields: per-pair state: field name -> a field of
      :mod:`adaprelora_jax.slots` (a plain tuple of slots at distinct factors
      is a :class:`adaprelora_jax.slots.Slots`), or None (field absent; its
      state entry is None).
    state_type: called as ``state_type(count=..., non_lora=...,
      pair_position=..., layout_version=..., **entries)`` with one entry per
      field; normally the transform's state NamedTuple. ``count`` and
      ``non_lora`` are as in optax; ``pair_position`` is the engine's
      bookkeeping (each pair's place in its group, at its ``lora_a``, int32):
      set by ``init``, never changed; an edited position makes its group's
      updates NaN rather than swapping pairs. ``layout_version`` is
      :data:`adaprelora_jax.STATE_LAYOUT_VERSION`
      (:mod:`adaprelora_jax.state_layout`).
    router: finds the pairs and routes the other leaves
      (:meth:`adaprelora_jax.routing.Router.create`).
    prepare_pair: optional first pass (above).
    map_pairs: run the kernel over a group's pairs with ``jax.lax.map``
      instead of ``jax.vmap``, so that every decomposition it calls is
      unbatched. For kernels built on batched LAPACK calls (QR, SVD, eigh)
      on XLA:CPU, where jaxlib 0.10's batch-parallel LAPACK kernels can
      deadlock the intra-op thread pool (docs/design.md §10). The updates
      are the same; only the schedule differs. ``"on_cpu"``: when the
      default backend is CPU, decided when the update is traced.
    metrics: keep the last update's metrics: the state is then a
      :class:`adaprelora_jax.metrics.WithMetricsState` around
      ``state_type``'s (read them with :func:`adaprelora_jax.step_metrics`).
      Off, the state is ``state_type``'s alone, exactly as without metrics
      (checkpoints saved before metrics existed restore into it), and the
      update computes nothing extra.

  Returns:
    The :class:`optax.GradientTransformationExtraArgs`.
  """
  kinds = {
    name: slots_lib.as_field(name, field) for name, field in fields.items() if field is not None
  }
  absent = {name: None for name in fields if name not in kinds}

  def init_fn(params):
    plan = router.plan(params)
    labels = nnx_metadata.StateLabels.of(plan, params)
    labels.check_uniform()
    state = state_type(
      count=jnp.zeros([], jnp.int32),
      non_lora=router.init_non_lora(plan, params),
      pair_position=_init_positions(plan, labels),
      layout_version=state_layout.version_leaf(),
      **{name: kind.init(plan, labels) for name, kind in kinds.items()},
      **absent,
    )
    if not metrics:
      return state
    # Which metrics the kernel reports (e.g. only for pairs with exact
    # statistics) is known once it is traced: trace one update abstractly,
    # so that the state's structure is fixed from the start.
    shapes = jax.eval_shape(lambda p, s: update_state(p, s, p)[2], params, state)
    return metrics_lib.WithMetricsState(
      state, jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
    )

  def update_state(updates, state, params):
    """The updates, the new state and, with ``metrics``, the step's metrics."""
    plan = router.plan(params)
    grads = plan_lib.check_matching_tree(plan, updates, "gradient")
    param_leaves = plan.leaves(params)
    inputs = [_gather_inputs(plan, group, param_leaves, grads) for group in plan.groups]
    read = {name: kind.read(plan, getattr(state, name), name) for name, kind in kinds.items()}
    pair_states = [
      {**{name: values[index] for name, values in read.items()}, **absent}
      for index in range(len(plan.groups))
    ]
    mapped = _default_backend_is_cpu() if map_pairs == "on_cpu" else bool(map_pairs)
    results = _run_kernels(update_pair, prepare_pair, inputs, pair_states, state.count, mapped)

    out = list(grads)
    member_positions = _member_positions(plan, state.pair_position)
    for group, (delta_a, delta_b, *_), (positions, valid) in zip(
      plan.groups, results, member_positions, strict=True
    ):
      dtype = group.members[0].dtype
      for role, delta in (("a", delta_a), ("b", delta_b)):
        # Wrong positions would silently swap the pairs' updates: make them NaN.
        delta = jnp.where(valid, delta, jnp.nan).astype(dtype)
        plan.scatter(out, group, role, delta, positions=positions)
    labels = nnx_metadata.StateLabels.of(plan, params)
    all_positions = [positions for positions, _ in member_positions]
    entries = {
      name: kind.write(
        plan, getattr(state, name), [new[name] for _, _, new, _ in results], all_positions, labels
      )
      for name, kind in kinds.items()
    }
    new_updates, non_lora_state = router.finish(plan, out, updates, state.non_lora, params)
    new_state = state_type(
      count=optax.safe_increment(state.count),
      non_lora=non_lora_state,
      pair_position=state.pair_position,
      layout_version=state.layout_version,
      **entries,
      **absent,
    )
    return new_updates, new_state, _step_metrics(inputs, results) if metrics else None

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    if not metrics:
      return update_state(updates, state, params)[:2]
    new_updates, new_state, step = update_state(updates, state.inner_state, params)
    return new_updates, metrics_lib.WithMetricsState(new_state, step)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _step_metrics(inputs: list[PairInputs], results: list[KernelResult]) -> metrics_lib.StepMetrics:
  """The factor norms of every pair and the kernel's own metrics, aggregated."""
  per_pair = [
    {**jax.vmap(metrics_lib.factor_norms)(group.lora_a, group.lora_b), **kernel_metrics}
    for group, (*_, kernel_metrics) in zip(inputs, results, strict=True)
  ]
  return metrics_lib.StepMetrics(metrics_lib.aggregate(per_pair))
