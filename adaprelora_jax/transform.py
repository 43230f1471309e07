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
"""The AdaPreLoRA optax transforms."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
import optax

from adaprelora_jax import kernels
from adaprelora_jax import pairing as pairing_lib

Statistics = Literal["auto", "exact", "tangent"]
NonFinitePolicy = Literal["skip", "propagate"]


def decay_rate_pow(
    step: jax.typing.ArrayLike, exponent: jax.typing.ArrayLike = 0.8
) -> jax.Array:
  """Adafactor's second-moment decay ``β2_t = 1 − (t + 1)^(−exponent)``.

  Zero at the first step (t = 0), so the first statistics are the first
  gradient's, exactly as optax ``scale_by_factored_rms``.
  """
  # The default float dtype (float64 under x64) rather than a fixed float32.
  t = jnp.asarray(step, jnp.result_type(float)) + 1.0
  return 1.0 - t ** (-exponent)


class ScaleByAdaPreLoRAState(NamedTuple):
  """State of :func:`scale_by_adaprelora`.

  The per-pair trees mirror the parameter tree: a pair's entries sit at the
  position of its ``lora_a`` or ``lora_b`` leaf (so they can be sharded like
  that factor); every other position holds ``optax.MaskedNode()``.

  Attributes:
    count: number of updates so far (int32).
    row_second_moment: at each ``lora_a``: EMA of the row means of ``G²``,
      shape (..., d_in), float32.
    col_second_moment: at each ``lora_b``: EMA of the column means of ``G²``,
      shape (..., d_out), float32.
    momentum: EMA of the factor updates at ``lora_a``/``lora_b`` (factor
      shape, float32), or ``None`` when ``b1 is None``.
    nonfinite_count: at each ``lora_a``: how many steps of that pair were
      skipped because its gradients were not finite, shape (...), int32.
    non_lora: state of the transform applied to the other leaves.
  """

  count: chex.Array
  row_second_moment: optax.Updates
  col_second_moment: optax.Updates
  momentum: Optional[optax.Updates]
  nonfinite_count: optax.Updates
  non_lora: optax.OptState


class _PairOutput(NamedTuple):
  delta_a: jax.Array
  delta_b: jax.Array
  row_second_moment: jax.Array
  col_second_moment: jax.Array
  momentum_a: Optional[jax.Array]
  momentum_b: Optional[jax.Array]
  skipped: jax.Array


def _all_finite(*arrays: jax.Array) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in arrays]))


def scale_by_adaprelora(
    decay_rate: float = 0.8,
    eps: float = 1e-30,
    *,
    b1: Optional[float] = None,
    damping: float = 1e-4,
    damping_floor: float = 1e-8,
    clipping_threshold: Optional[float] = 1.0,
    tie_breaker: kernels.TieBreaker = "imbalance",
    statistics: Statistics = "auto",
    step_offset: int = 0,
    decay_rate_fn: Optional[Callable[[jax.Array, Any], jax.Array]] = None,
    pairing: pairing_lib.Pairing = "nnx",
    non_lora: Optional[optax.GradientTransformation] = None,
    strict: bool = False,
    nonfinite: NonFinitePolicy = "skip",
) -> optax.GradientTransformationExtraArgs:
  r"""Rescale LoRA factor gradients with the AdaPreLoRA closed-form step.

  For every LoRA pair ``(a, b)`` with ``ΔW = a @ b`` (flax layout
  ``a: (d_in, r)``, ``b: (r, d_out)``) this keeps Adafactor's factored second
  moment of the *full weight* gradient ``G = ∂L/∂W`` -- a row vector over
  ``d_in`` and a column vector over ``d_out`` -- and returns the factor
  directions whose weight change is the H-orthogonal projection of the
  Adafactor step ``H⁻¹G`` onto the tangent space of the rank-r factorization
  (:func:`adaprelora_jax.factor_update`). State per pair is
  ``O(d_in + d_out)`` (plus ``r (d_in + d_out)`` with momentum); the step
  needs only the factor gradients and costs ``O((d_in + d_out) r² + r³)``.

  Statistics (``statistics=``): ``"exact"`` uses the true row/column means of
  ``G²`` that :class:`adaprelora_jax.nn.LoRA` layers put into the gradient
  tree (leaves ``grad_sq_rows``/``grad_sq_cols``); ``"tangent"`` estimates
  them from the factor gradients alone (projection of ``G`` onto the tangent
  space); ``"auto"`` (default) uses exact statistics wherever the gradient
  tree carries them and the tangent estimate for every other pair. They are
  decayed as in optax ``scale_by_factored_rms``:
  ``v ← β2_t v + (1 − β2_t) mean(G² + eps)``, ``β2_t = decay_rate_fn(t)``.

  Numerics: statistics and r×r algebra run in float32 or wider whatever the
  parameter dtype; the two r×r solves are damped
  (``S + (damping · tr(S)/r + floor) I``, Cholesky), which keeps the step
  finite and bounded at ``lora_b = 0`` and for rank-deficient factors.
  Update clipping bounds the H-weighted RMS of the weight-space step
  ``δW = δa b + a δb`` by ``clipping_threshold`` (Adafactor's update clipping
  applied to the weight update it preconditions); it costs no extra matmul,
  since ``‖δW‖²_H = ⟨g_a, δa⟩ + ⟨g_b, δb⟩``.

  Non-finite gradients (``nonfinite="skip"``, default): a pair whose factor
  gradients or statistics (or resulting step) are not all finite gets a zero
  update and keeps its state; ``nonfinite_count`` in the state counts the
  skips per pair (see :func:`adaprelora_jax.nonfinite_report`).
  ``"propagate"`` applies no check. Leaves that are not LoRA factors follow
  the ``non_lora`` transform's own semantics.

  Same-shaped pairs are stacked and processed by one ``jax.vmap``, so the
  traced program does not grow with the number of layers.

  Args:
    decay_rate: exponent of the second-moment decay schedule (Adafactor 0.8).
    eps: added to ``G²`` before averaging (Adafactor's ε1).
    b1: if set, momentum: EMA (bias-corrected) of the clipped factor updates.
    damping: relative damping of the r×r solves.
    damping_floor: absolute damping floor, in units of a squared factor norm
      per rank component; factors much smaller than ``sqrt(damping_floor)``
      are treated as zero (``lora_b`` at init).
    clipping_threshold: bound on the H-weighted RMS of ``δW``; None disables.
    tie_breaker: gauge choice, see :func:`adaprelora_jax.factor_update`.
    statistics: ``"auto"``, ``"exact"`` or ``"tangent"`` (above).
    step_offset: subtracted from the step count in the decay schedule
      (e.g. when starting from a pretrained optimizer).
    decay_rate_fn: ``(step, decay_rate) -> β2``; None means
      :func:`decay_rate_pow` (a default callable would be taken for a schedule
      by ``optax.inject_hyperparams``).
    pairing: ``"nnx"`` (``lora_a``/``lora_b`` siblings), ``"peft"``
      (``lora_A``/``lora_B`` in PyTorch layout) or a callable
      ``(path, leaf) -> LoRARole | None`` (see :mod:`adaprelora_jax.pairing`;
      list a callable in ``static_args`` of ``optax.inject_hyperparams``).
    non_lora: transform for leaves that are not LoRA factors (e.g. a
      classifier head); default ``optax.scale_by_adam()``.
    strict: raise if the params contain leaves that are not LoRA factors.
    nonfinite: ``"skip"`` or ``"propagate"`` (above).

  Returns:
    The corresponding :class:`optax.GradientTransformationExtraArgs`.

  References:
    Bian, Cai, Liu, `AdaPreLoRA: adaptive preconditioned low-rank adaptation
    <https://arxiv.org/abs/2605.08734>`_, 2026.

    Shazeer and Stern, `Adafactor: Adaptive Learning Rates with Sublinear
    Memory Cost <https://arxiv.org/abs/1804.04235>`_, 2018.
  """
  if tie_breaker not in kernels.TIE_BREAKERS:
    raise ValueError(
        f"tie_breaker must be one of {kernels.TIE_BREAKERS}, got {tie_breaker!r}."
    )
  if nonfinite not in ("skip", "propagate"):
    raise ValueError(f"nonfinite must be 'skip' or 'propagate', got {nonfinite!r}.")
  if statistics not in ("auto", "exact", "tangent"):
    raise ValueError(
        f"statistics must be 'auto', 'exact' or 'tangent', got {statistics!r}."
    )
  _check_positive_if_concrete("damping_floor", damping_floor)
  _check_positive_if_concrete("damping", damping, allow_zero=True)
  pairing_lib.resolve_pairing(pairing)  # Fail early on a bad preset name.
  non_lora = optax.scale_by_adam() if non_lora is None else non_lora
  decay_rate_fn = decay_rate_pow if decay_rate_fn is None else decay_rate_fn

  def make_plan(params) -> pairing_lib.LoRAPlan:
    if params is None:
      raise ValueError(
          "scale_by_adaprelora needs the params to find the LoRA pairs: call "
          "update(grads, state, params)."
      )
    return pairing_lib.plan_pairs(
        params, pairing, strict=strict, statistics=statistics
    )

  def non_lora_transform(plan: pairing_lib.LoRAPlan):
    return optax.masked(non_lora, plan.other_mask())

  def init_fn(params):
    plan = make_plan(params)

    def moment(pair, role):
      size = pair.d_in if role == "a" else pair.d_out
      return jnp.zeros((*pair.lead_shape, size), jnp.float32)

    def factor_zeros(pair, role):
      shape = pairing_lib.leaf_shape(pair, role)
      return jnp.zeros(shape, jnp.float32)

    return ScaleByAdaPreLoRAState(
        count=jnp.zeros([], jnp.int32),
        row_second_moment=plan.mirror(moment, roles=("a",)),
        col_second_moment=plan.mirror(moment, roles=("b",)),
        momentum=None if b1 is None else plan.mirror(factor_zeros),
        nonfinite_count=plan.mirror(
            lambda pair, role: jnp.zeros(pair.lead_shape, jnp.int32), roles=("a",)
        ),
        non_lora=non_lora_transform(plan).init(params),
    )

  def pair_update(a, b, g_a, g_b, row_stats, col_stats, row_moment, col_moment,
                  momentum_a, momentum_b, beta2, count):
    """One pair, canonical layout; vmapped over a stacked group."""
    if row_stats is None:
      row_stats, col_stats = kernels.tangent_gradient_statistics(
          a, b, g_a, g_b, damping=damping, damping_floor=damping_floor
      )
    new_row_moment = beta2 * row_moment + (1.0 - beta2) * (row_stats + eps)
    new_col_moment = beta2 * col_moment + (1.0 - beta2) * (col_stats + eps)
    row_scale, col_scale = kernels.factored_scales(new_row_moment, new_col_moment)
    step = kernels.factor_step(
        a, b, g_a, g_b, row_scale, col_scale,
        damping=damping, damping_floor=damping_floor, tie_breaker=tie_breaker,
    )
    delta_a, delta_b = step.delta_a, step.delta_b
    if clipping_threshold is not None:
      # H-weighted RMS of δW: ‖δW‖²_H / Σ_ij p_i q_j, which is 1 for a step
      # of unit entries when the statistics match (Adafactor's RMS(U) = 1).
      weight_total = jnp.sum(row_scale) * jnp.sum(col_scale)
      rms = jnp.sqrt(jnp.maximum(step.descent, 0.0) / weight_total)
      scale = 1.0 / jnp.maximum(1.0, rms / clipping_threshold)
      delta_a, delta_b = delta_a * scale, delta_b * scale
    new_momentum_a = new_momentum_b = None
    if b1 is not None:
      new_momentum_a = b1 * momentum_a + (1.0 - b1) * delta_a
      new_momentum_b = b1 * momentum_b + (1.0 - b1) * delta_b
      bias_correction = 1.0 - b1 ** (count + 1).astype(delta_a.dtype)
      delta_a = new_momentum_a / bias_correction
      delta_b = new_momentum_b / bias_correction
    new_state = (new_row_moment, new_col_moment, new_momentum_a, new_momentum_b)
    if nonfinite == "propagate":
      return _PairOutput(delta_a, delta_b, *new_state, skipped=jnp.array(False))
    inputs = [g_a, g_b] + ([] if row_stats is None else [row_stats, col_stats])
    ok = _all_finite(*inputs) & _all_finite(delta_a, delta_b)
    old_state = (row_moment, col_moment, momentum_a, momentum_b)
    kept = jax.tree.map(lambda new, old: jnp.where(ok, new, old), new_state, old_state)
    return _PairOutput(
        jnp.where(ok, delta_a, 0.0), jnp.where(ok, delta_b, 0.0), *kept,
        skipped=~ok,
    )

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    plan = make_plan(params)
    grads = pairing_lib.check_matching_tree(plan, updates, "gradient")
    param_leaves = plan.leaves(params)
    row_leaves = plan.leaves(state.row_second_moment)
    col_leaves = plan.leaves(state.col_second_moment)
    skip_leaves = plan.leaves(state.nonfinite_count)
    momentum_leaves = None if b1 is None else plan.leaves(state.momentum)
    beta2 = decay_rate_fn(state.count - step_offset, decay_rate)

    out_updates = list(grads)
    new_rows, new_cols, new_skips = list(row_leaves), list(col_leaves), list(skip_leaves)
    new_momentum = None if b1 is None else list(momentum_leaves)
    for group in plan.groups:
      gather = lambda leaves, role, **kw: plan.gather(leaves, group, role, **kw)
      a, b = gather(param_leaves, "a"), gather(param_leaves, "b")
      g_a, g_b = gather(grads, "a"), gather(grads, "b")
      row_stats = col_stats = None
      if group.exact_statistics:
        row_stats = gather(grads, "row_stats", factor_layout=False).astype(jnp.float32)
        col_stats = gather(grads, "col_stats", factor_layout=False).astype(jnp.float32)
      row_moment = gather(row_leaves, "a", factor_layout=False)
      col_moment = gather(col_leaves, "b", factor_layout=False)
      momentum_a = momentum_b = None
      if b1 is not None:
        momentum_a, momentum_b = gather(momentum_leaves, "a"), gather(momentum_leaves, "b")
      output = jax.vmap(pair_update, in_axes=(0,) * 10 + (None, None))(
          a, b, g_a, g_b, row_stats, col_stats, row_moment, col_moment,
          momentum_a, momentum_b, beta2, state.count,
      )
      scatter = lambda leaves, role, value, **kw: plan.scatter(
          leaves, group, role, value, **kw)
      dtype_a = group.members[0].dtype
      scatter(out_updates, "a", output.delta_a.astype(dtype_a))
      scatter(out_updates, "b", output.delta_b.astype(dtype_a))
      scatter(new_rows, "a", output.row_second_moment, factor_layout=False)
      scatter(new_cols, "b", output.col_second_moment, factor_layout=False)
      previous_skips = gather(skip_leaves, "a", factor_layout=False)
      scatter(new_skips, "a", previous_skips + output.skipped.astype(jnp.int32),
              factor_layout=False)
      if b1 is not None:
        scatter(new_momentum, "a", output.momentum_a)
        scatter(new_momentum, "b", output.momentum_b)

    for index in plan.statistics_indices:
      # Statistics probes are not parameters to move.
      out_updates[index] = jnp.zeros_like(grads[index])
    if plan.other_indices:
      other_updates, non_lora_state = non_lora_transform(plan).update(
          updates, state.non_lora, params
      )
      other_leaves = plan.leaves(other_updates)
      for index in plan.other_indices:
        out_updates[index] = other_leaves[index]
    else:
      non_lora_state = state.non_lora

    new_state = ScaleByAdaPreLoRAState(
        count=optax.safe_increment(state.count),
        row_second_moment=plan.unflatten(new_rows),
        col_second_moment=plan.unflatten(new_cols),
        momentum=None if b1 is None else plan.unflatten(new_momentum),
        nonfinite_count=plan.unflatten(new_skips),
        non_lora=non_lora_state,
    )
    return plan.unflatten(out_updates), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _check_positive_if_concrete(name: str, value: Any, allow_zero: bool = False) -> None:
  try:
    number = float(value)
  except (TypeError, jax.errors.ConcretizationTypeError):
    return
  if not (number >= 0.0 if allow_zero else number > 0.0):
    bound = ">= 0" if allow_zero else "> 0"
    raise ValueError(f"{name} must be {bound}, got {value!r}.")


def adaprelora(
    learning_rate: optax.ScalarOrSchedule,
    decay_rate: float = 0.8,
    eps: float = 1e-30,
    *,
    b1: Optional[float] = None,
    weight_decay: float = 0.0,
    mask: Optional[Any] = None,
    damping: float = 1e-4,
    damping_floor: float = 1e-8,
    clipping_threshold: Optional[float] = 1.0,
    tie_breaker: kernels.TieBreaker = "imbalance",
    statistics: Statistics = "auto",
    step_offset: int = 0,
    decay_rate_fn: Optional[Callable[[jax.Array, Any], jax.Array]] = None,
    pairing: pairing_lib.Pairing = "nnx",
    non_lora: Optional[optax.GradientTransformation] = None,
    strict: bool = False,
    nonfinite: NonFinitePolicy = "skip",
) -> optax.GradientTransformationExtraArgs:
  r"""AdaPreLoRA: adaptive preconditioned optimizer for LoRA factors.

  :func:`scale_by_adaprelora` followed by decoupled weight decay and the
  learning rate, in the order of ``optax.adamw``: the parameter update is
  ``−learning_rate · (preconditioned step + weight_decay · param)``.

  Example::

    >>> import jax, jax.numpy as jnp, optax
    >>> from flax import nnx
    >>> from adaprelora_jax import adaprelora
    >>> model = nnx.LoRA(8, 2, 4, rngs=nnx.Rngs(0))
    >>> optimizer = nnx.Optimizer(model, adaprelora(1e-2), wrt=nnx.LoRAParam)
    >>> x, y = jnp.ones((16, 8)), jnp.ones((16, 4))
    >>> loss = lambda m: jnp.mean((m(x) - y) ** 2)
    >>> for _ in range(3):
    ...   grads = nnx.grad(loss)(model)
    ...   _ = optimizer.update(model, grads)
    >>> bool(loss(model) < 1.0)
    True

  Args:
    learning_rate: a float or an optax schedule.
    decay_rate: see :func:`scale_by_adaprelora`.
    eps: see :func:`scale_by_adaprelora`.
    b1: see :func:`scale_by_adaprelora`.
    weight_decay: decoupled weight decay (applied to every leaf selected by
      ``mask``; exact-statistics leaves are zero and stay zero).
    mask: tree or callable selecting the leaves to decay (optax convention;
      list a callable in ``static_args`` of ``optax.inject_hyperparams``).
    damping: see :func:`scale_by_adaprelora`.
    damping_floor: see :func:`scale_by_adaprelora`.
    clipping_threshold: see :func:`scale_by_adaprelora`.
    tie_breaker: see :func:`scale_by_adaprelora`.
    statistics: see :func:`scale_by_adaprelora`.
    step_offset: see :func:`scale_by_adaprelora`.
    decay_rate_fn: see :func:`scale_by_adaprelora`.
    pairing: see :func:`scale_by_adaprelora`.
    non_lora: see :func:`scale_by_adaprelora`.
    strict: see :func:`scale_by_adaprelora`.
    nonfinite: see :func:`scale_by_adaprelora`.

  Returns:
    The corresponding :class:`optax.GradientTransformationExtraArgs`.

  References:
    Bian, Cai, Liu, `AdaPreLoRA: adaptive preconditioned low-rank adaptation
    <https://arxiv.org/abs/2605.08734>`_, 2026.
  """
  return optax.chain(
      scale_by_adaprelora(
          decay_rate=decay_rate, eps=eps, b1=b1, damping=damping,
          damping_floor=damping_floor, clipping_threshold=clipping_threshold,
          tie_breaker=tie_breaker, statistics=statistics, step_offset=step_offset,
          decay_rate_fn=decay_rate_fn, pairing=pairing, non_lora=non_lora,
          strict=strict, nonfinite=nonfinite,
      ),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )


def nonfinite_report(
    state: Any, params: Any, pairing: pairing_lib.Pairing = "nnx"
) -> dict[str, int]:
  """Host-side report of skipped (non-finite) steps per LoRA pair.

  Args:
    state: an optimizer state containing a :class:`ScaleByAdaPreLoRAState`
      (anywhere, e.g. inside ``optax.chain`` or ``inject_hyperparams``).
    params: the params the optimizer was initialized with.
    pairing: the pairing used by the optimizer.

  Returns:
    ``{path of lora_a: number of skipped steps}`` for pairs with skips (summed
    over leading layer axes).
  """
  found = [
      node for node in jax.tree.leaves(
          state, is_leaf=lambda x: isinstance(x, ScaleByAdaPreLoRAState))
      if isinstance(node, ScaleByAdaPreLoRAState)
  ]
  if not found:
    raise ValueError("No ScaleByAdaPreLoRAState found in the optimizer state.")
  plan = pairing_lib.plan_pairs(params, pairing)
  report: dict[str, int] = {}
  for inner in found:
    leaves = plan.leaves(inner.nonfinite_count)
    for pair in plan.pairs:
      skipped = int(jnp.sum(leaves[pair.a_index]))
      if skipped:
        report[pair.a_path] = report.get(pair.a_path, 0) + skipped
  return report
