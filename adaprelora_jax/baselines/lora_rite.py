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
"""LoRA-RITE: transformation-invariant LoRA optimizer (Yen et al., ICLR 2025).

The paper writes ``Z = A Bᵀ`` with ``A: (m, r)``, ``B: (n, r)``; in the flax
layout here ``A = a`` (d_in, r) and ``B = bᵀ`` (d_out, r). Each factor is
split by a thin QR, ``A = U_A R_A``. The gradient of ``A`` with the other
factor's magnitude removed, ``ḡ_A = ∇_A R_B⁻¹ = G U_B``, depends only on the
column space of ``B``; LoRA-RITE runs an Adam-like method with an r×r matrix
second moment on it, in the coordinates of the basis ``U_B``, and maps the
result back with ``R_B⁻ᵀ`` (Algorithm 1)::

  ḡ_A = ∇_A R_B⁻¹                      P_A = U_Bᵀ U_B,prev
  V̄_A ← β̂₂ P_A V̄_A P_Aᵀ + (1 − β̂₂) ḡ_Aᵀ ḡ_A / m
  ρ_A ← β̂₂ (ρ_A + d_λ(V̄_A,prev, P_A V̄_A,prev P_Aᵀ))      (optional)
  S̄_A = ḡ_A (V̄_A + ρ_A I)^(−1/2)
  M̄_A ← β̂₁ M̄_A P_Aᵀ + (1 − β̂₁) S̄_A
  A   ← A − η M̄_A R_B⁻ᵀ

and symmetrically for ``B``. The weight step ``M̄_A R_B⁻ᵀ Bᵀ = M̄_A U_Bᵀ``
(plus the ``B`` term) is the same for every factorization ``(A S, B S⁻ᵀ)`` of
``Z``: the method is transformation invariant.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from adaprelora_jax import tracking
from adaprelora_jax._src import validation
from adaprelora_jax._src.discovery import pairing as pairing_lib
from adaprelora_jax._src.discovery import pairs as pairs_lib
from adaprelora_jax._src.engine import pairwise
from adaprelora_jax._src.engine import routing
from adaprelora_jax._src.engine import slots
from adaprelora_jax._src.maths import linalg
from adaprelora_jax._src.maths import pair_io


class LoRARitePairState(NamedTuple):
  """One pair's LoRA-RITE state: each field a pair ``(for A, for B)``.

  Attributes:
    first_moment: ``M̄``, in the coordinates of the other factor's basis:
      (d_in, r) for ``A``, (r, d_out) (``M̄_Bᵀ``) for ``B``.
    second_moment: ``V̄``, (r, r) for each factor.
    basis: the orthonormal basis of the factor's own QR at the previous step,
      for the transport ``P``: (d_in, r) for ``A``, (r, d_out) (``U_Bᵀ``)
      for ``B``.
    escape_mass: ``ρ``, a scalar for each factor, or None without escape
      mass.
  """

  first_moment: Any
  second_moment: Any
  basis: Any
  escape_mass: Any


def _at_both_factors(dims_a: tuple[Any, ...], dims_b: tuple[Any, ...]) -> slots.Slots:
  return slots.Slots((slots.Slot("a", dims_a), slots.Slot("b", dims_b)))


# Every entry for ``A`` sits at its ``lora_a``, every entry for ``B`` at its
# ``lora_b`` (sharded like the factor where shaped like it).
STORAGE = LoRARitePairState(
  first_moment=_at_both_factors(("d_in", "rank"), ("rank", "d_out")),
  second_moment=_at_both_factors(("rank", "rank"), ("rank", "rank")),
  basis=_at_both_factors(("d_in", "rank"), ("rank", "d_out")),
  escape_mass=_at_both_factors((), ()),
)


class ScaleByLoRARiteState(NamedTuple):
  """State of :func:`scale_by_lora_rite`.

  Attributes:
    count: number of updates so far (int32).
    pairs: every pair's :class:`LoRARitePairState`, stored as
      :data:`STORAGE` says (trees like the params; float32, or float64 for
      float64 parameters).
    bookkeeping: the pairwise engine's
      (:class:`adaprelora_jax._src.engine.pairwise.Bookkeeping`).
  """

  count: chex.Array
  pairs: LoRARitePairState
  bookkeeping: pairwise.Bookkeeping


class _Factor(NamedTuple):
  """One factor after the first pass (paper layout: rows × rank)."""

  grad: jax.Array  # unmagnified gradient ḡ, after update skipping
  basis: jax.Array  # U of the factor's thin QR
  inverse_rotation: jax.Array  # R⁻¹ of the factor's thin QR


class _Moments(NamedTuple):
  first: jax.Array
  second: jax.Array
  escape: jax.Array | None


def _bias_corrected_decay(decay: jax.typing.ArrayLike, count: jax.Array) -> jax.Array:
  """``β̂_t = β (1 − β^(t−1)) / (1 − β^t)`` with ``t = count + 1``.

  An EMA with this decay needs no bias correction (Adafactor, Shazeer and
  Stern 2018, §7.1); ``β̂_1 = 0``, so the first moments are the first
  observations.
  """
  t = count.astype(jnp.result_type(float)) + 1.0
  return (1.0 - jnp.power(decay, t - 1.0)) * decay / (1.0 - jnp.power(decay, t))


def _rms(x: jax.Array) -> jax.Array:
  return jnp.sqrt(jnp.mean(jnp.square(x)))


def _escaped_mass(before: jax.Array, after: jax.Array) -> jax.Array:
  """``d_λ``: second-moment mass lost by projecting onto the new basis.

  As the authors' code: the smaller of the largest eigenvalue drop and the
  trace drop, both clamped at 0 (eigenvalues in ascending order).
  """
  largest_drop = jnp.max(jnp.linalg.eigvalsh(before) - jnp.linalg.eigvalsh(after))
  trace_drop = jnp.trace(before) - jnp.trace(after)
  return jnp.maximum(jnp.minimum(largest_drop, trace_drop), 0.0)


class _RiteHyperparams(NamedTuple):
  b1: jax.typing.ArrayLike
  b2: jax.typing.ArrayLike
  eps: jax.typing.ArrayLike
  clip_unmagnified_grad: float | None
  update_skipping: float | None
  update_capping: float | None
  escape_mass: bool


def _check_rank(pair: pairs_lib.PairInfo) -> None:
  if pair.rank > min(pair.d_in, pair.d_out):
    raise ValueError(
      f"LoRA-RITE needs rank <= min(d_in, d_out) for the QR bases of the "
      f"factors; pair '{pair.a_path}', '{pair.b_path}' has rank "
      f"{pair.rank}, d_in {pair.d_in}, d_out {pair.d_out}."
    )


def _unmagnify(
  update_skipping: float | None, pair: pair_io.PairInputs
) -> tuple[tuple[_Factor, _Factor], jax.Array]:
  """First pass: QR bases, unmagnified gradients, their squared norm."""
  a, b, g_a, g_b = pair.promoted()
  basis_a, rotation_a = jnp.linalg.qr(a)
  basis_b, rotation_b = jnp.linalg.qr(b.T)
  # Pseudo-inverses: R_B = 0 at LoRA init (lora_b = 0), where ḡ_A = 0.
  inverse_a, inverse_b = jnp.linalg.pinv(rotation_a), jnp.linalg.pinv(rotation_b)
  factors = []
  for grad, basis, inverse, other_inverse in (
    (g_a, basis_a, inverse_a, inverse_b),
    (g_b.T, basis_b, inverse_b, inverse_a),
  ):
    unmagnified = linalg.matmul(grad, other_inverse)
    if update_skipping is not None:
      rms = _rms(unmagnified)
      skip = jnp.isfinite(rms) & (rms > update_skipping)
      unmagnified = jnp.where(skip, 0.0, unmagnified)
    factors.append(_Factor(unmagnified, basis, inverse))
  factor_a, factor_b = factors
  squared_norm = jnp.sum(jnp.square(factor_a.grad)) + jnp.sum(jnp.square(factor_b.grad))
  return (factor_a, factor_b), squared_norm


def _preconditioned_moments(
  hyper: _RiteHyperparams,
  grad: jax.Array,
  previous: _Moments,
  transport: jax.Array,
  other_inverse_rotation: jax.Array,
  beta1: jax.Array,
  beta2: jax.Array,
) -> tuple[jax.Array, _Moments]:
  """Algorithm 1 for one factor, in the paper's (rows × rank) layout."""
  transported = linalg.matmul(linalg.matmul(transport, previous.second), transport.T)
  escape = None
  if previous.escape is not None:
    escape = beta2 * (previous.escape + _escaped_mass(previous.second, transported))
  observed = linalg.matmul(grad.T, grad) / grad.shape[0]
  second = beta2 * transported + (1.0 - beta2) * observed
  eigenvalues, eigenvectors = linalg.psd_eigh(second)
  if escape is not None:
    eigenvalues = eigenvalues + escape  # (V̄ + ρI)^(−1/2)
  inverse_root = linalg.spectral_matrix(1.0 / (jnp.sqrt(eigenvalues) + hyper.eps), eigenvectors)
  preconditioned = linalg.matmul(grad, inverse_root)
  first = beta1 * linalg.matmul(previous.first, transport.T) + (1.0 - beta1) * preconditioned
  step = first
  if hyper.update_capping is not None:
    step = first / jnp.maximum(1.0, _rms(first) / hyper.update_capping)
  return linalg.matmul(step, other_inverse_rotation.T), _Moments(first, second, escape)


def _update_pair(
  hyper: _RiteHyperparams,
  factors: tuple[_Factor, _Factor],
  state: LoRARitePairState,
  count: jax.Array,
  total: jax.Array,
) -> pair_io.KernelResult:
  """Both factors' steps from the first pass's results (the pairwise kernel)."""
  factor_a, factor_b = factors
  clip_scale: float | jax.Array = 1.0
  if hyper.clip_unmagnified_grad is not None:
    clip_scale = hyper.clip_unmagnified_grad / jnp.maximum(
      jnp.sqrt(total), hyper.clip_unmagnified_grad
    )
  beta1 = _bias_corrected_decay(hyper.b1, count)
  beta2 = _bias_corrected_decay(hyper.b2, count)
  first_a, first_b = state.first_moment
  second_a, second_b = state.second_moment
  basis_a, basis_b = state.basis
  escape_a, escape_b = (None, None) if state.escape_mass is None else state.escape_mass
  # ḡ_A = G U_B lives in the coordinates of B's basis (and vice versa), so
  # A's moments are transported by P_A = U_Bᵀ U_B,prev.
  delta_a, moments_a = _preconditioned_moments(
    hyper,
    clip_scale * factor_a.grad,
    _Moments(first_a, second_a, escape_a),
    linalg.matmul(factor_b.basis.T, basis_b.T),
    factor_b.inverse_rotation,
    beta1,
    beta2,
  )
  delta_b, moments_b = _preconditioned_moments(
    hyper,
    clip_scale * factor_b.grad,
    _Moments(first_b.T, second_b, escape_b),
    linalg.matmul(factor_a.basis.T, basis_a),
    factor_a.inverse_rotation,
    beta1,
    beta2,
  )
  new_state = LoRARitePairState(
    first_moment=(moments_a.first, moments_b.first.T),
    second_moment=(moments_a.second, moments_b.second),
    basis=(factor_a.basis, factor_b.basis.T),
    escape_mass=(moments_a.escape, moments_b.escape) if hyper.escape_mass else None,
  )
  return pair_io.KernelResult(delta_a, delta_b.T, new_state, {})


def scale_by_lora_rite(
  b1: jax.typing.ArrayLike = 0.9,
  b2: jax.typing.ArrayLike = 0.999,
  eps: jax.typing.ArrayLike = 1e-6,
  *,
  clip_unmagnified_grad: float | None = 1.0,
  update_skipping: float | None = 1.0,
  update_capping: float | None = None,
  escape_mass: bool = False,
  pairing: pairing_lib.Pairing = "nnx",
) -> optax.GradientTransformationExtraArgs:
  r"""Rescale LoRA factor gradients with LoRA-RITE (module docstring).

  Safety valves, all as in the authors' code and on by default where they
  are: *update skipping* zeroes a factor's unmagnified gradient for the step
  when its RMS exceeds ``update_skipping`` (non-finite gradients are not
  skipped: they propagate, as optax's optimizers do); *global clipping*
  rescales the unmagnified gradients of **all** pairs together when their
  joint norm exceeds ``clip_unmagnified_grad`` (a reduction over every pair
  before any update, so the transform makes two passes over the pairs);
  *update capping* bounds the RMS of each factor's first moment before it is
  mapped back; the *escape mass* ``ρ`` keeps the preconditioner from growing
  when the basis change projects second-moment mass away.

  The step needs two thin QRs (rank ≤ min(d_in, d_out)), two r×r
  pseudo-inverses (SVD) and a few r×r ``eigh`` per pair, all in float32 or
  wider; state ``2 (d_in + d_out) r + 2 r²`` per pair (first moments and
  bases; the reference keeps the same). Same-shaped pairs share one
  ``jax.vmap``.

  Differences from the reference code (``gkevinyen5418/LoRA-RITE``, the
  authors' PyTorch re-implementation of their unreleased JAX code):

  * All state, step count included, is in the optax state, so checkpoints
    resume exactly; the reference keeps it outside ``state_dict`` and
    re-initializes the moments after ``load_state_dict``.
  * Eigenvalues of the second moment are clamped at 0 before the inverse
    square root; the reference takes the square root of rounding-negative
    eigenvalues and then replaces the resulting NaNs (and any other NaN in
    the update) with 0 through ``nan_to_num``.
  * ``relative_epsilon`` is not offered: in the reference it raises a
    ``NameError`` and its value would be unused. ``eps`` enters as in the
    reference, ``1/(√(λ + ρ) + eps)``.
  * ``balance_param`` (rescaling the factors themselves to equal norms, off
    by default in the reference) is not offered: it changes the parameters
    rather than the update direction.
  * QR and its inverse run in float32 or wider (the reference runs them in
    the parameter dtype; ``torch.linalg.qr`` has no bfloat16 CUDA kernel).
  * Pairs are found by name (:mod:`adaprelora_jax.pairing`), not by the
    position of alternating ``lora_A``/``lora_B`` parameters.

  Args:
    b1: first-moment decay (bias-corrected decay ``β̂₁``); must be in
      [0, 1).
    b2: second-moment decay (bias-corrected decay ``β̂₂``); must be in
      [0, 1).
    eps: added after the square root in ``(V̄ + ρI)^(−1/2)``; must be >= 0.
    clip_unmagnified_grad: threshold of the global norm of all unmagnified
      gradients; must be > 0, or None (disables).
    update_skipping: RMS threshold above which a factor's step is skipped;
      must be > 0, or None (disables).
    update_capping: RMS bound of each factor's first moment before it is
      mapped back; must be > 0, or None (default, disables).
    escape_mass: track the escaped mass ``ρ`` (off by default, as in the
      reference).
    pairing: ``"nnx"``, ``"peft"`` or a pairing callable (see
      :func:`adaprelora_jax.plan_pairs`). The transform owns the LoRA
      factors and their statistics probes (zero updates) and raises, naming
      them, for other leaves (the alias routes those to its ``non_lora``
      transform).

  Returns:
    The corresponding :class:`optax.GradientTransformationExtraArgs`.

  Raises:
    ValueError: for a hyperparameter out of its range, naming it (which
      values are checked: :doc:`/usage`, Policies); and, when the
      pairs are found, for a pair whose rank exceeds ``d_in`` or ``d_out``,
      naming its path.

  References:
    Yen, Si, Meng, Yu, Duvvuri, Dhillon, Hsieh, Kumar, `LoRA Done RITE:
    Robust Invariant Transformation Equilibration for LoRA Optimization
    <https://arxiv.org/abs/2410.20625>`_, ICLR 2025.
  """
  # β = 1 would make the bias-corrected decay β(1 − β^(t−1))/(1 − β^t) 0/0.
  validation.check_in_range("b1", b1, 0.0, 1.0)
  validation.check_in_range("b2", b2, 0.0, 1.0)
  validation.check_positive("eps", eps, allow_zero=True)
  validation.check_positive("clip_unmagnified_grad", clip_unmagnified_grad, allow_none=True)
  validation.check_positive("update_skipping", update_skipping, allow_none=True)
  validation.check_positive("update_capping", update_capping, allow_none=True)
  hyper = _RiteHyperparams(
    b1=b1,
    b2=b2,
    eps=eps,
    clip_unmagnified_grad=clip_unmagnified_grad,
    update_skipping=update_skipping,
    update_capping=update_capping,
    escape_mass=escape_mass,
  )

  storage = STORAGE if escape_mass else STORAGE._replace(escape_mass=None)
  finder = routing.PairFinder.create("scale_by_lora_rite", pairing, check_pair=_check_rank)
  update_pair = functools.partial(_update_pair, hyper)

  def init_fn(params):
    plan, labels = finder.find(params)
    return ScaleByLoRARiteState(
      count=jnp.zeros([], jnp.int32),
      pairs=pairwise.init_pairs(plan, labels, storage),
      bookkeeping=pairwise.init_bookkeeping(plan, labels),
    )

  def update_fn(updates, state, params):
    plan, labels = finder.find(params)
    step = pairwise.update_pairs(
      update_pair,
      plan,
      labels,
      updates,
      params,
      state,
      storage=storage,
      # The global clipping needs every pair's unmagnified gradient first.
      prepare_pair=functools.partial(_unmagnify, update_skipping),
      # Batched QR/SVD/eigh on XLA:CPU can deadlock (jaxlib 0.10); one pair at a time cannot.
      map_pairs="on_cpu",
    )
    new_state = state._replace(count=optax.safe_increment(state.count), pairs=step.pairs)
    return step.updates, new_state, step.metrics

  return pairwise.transformation(init_fn, update_fn, metrics=False)


def lora_rite(
  learning_rate: optax.ScalarOrSchedule,
  b1: jax.typing.ArrayLike = 0.9,
  b2: jax.typing.ArrayLike = 0.999,
  eps: jax.typing.ArrayLike = 1e-6,
  weight_decay: jax.typing.ArrayLike = 0.0,
  mask: Any | None = None,
  *,
  clip_unmagnified_grad: float | None = 1.0,
  update_skipping: float | None = 1.0,
  update_capping: float | None = None,
  escape_mass: bool = False,
  pairing: pairing_lib.Pairing = "nnx",
  non_lora: optax.GradientTransformation | None = None,
  strict: bool = False,
  metrics: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""LoRA-RITE: transformation-invariant adaptive optimizer for LoRA factors.

  :func:`scale_by_lora_rite` followed by weight decay and the learning rate,
  as the reference: ``a ← a − η (Δa + λ_wd a)``, likewise ``b``. Without
  weight decay (which depends on the factorization) the weight updates are
  the same for every factorization ``(a S, S⁻¹ b)`` of the same ``ΔW``.

  Args:
    learning_rate: a float or an optax schedule.
    b1: see :func:`scale_by_lora_rite`.
    b2: see :func:`scale_by_lora_rite`.
    eps: see :func:`scale_by_lora_rite`.
    weight_decay: weight decay (multiplied by the learning rate); must be
      >= 0.
    mask: tree or callable selecting the leaves to decay (optax convention;
      list a callable in ``static_args`` of ``optax.inject_hyperparams``).
    clip_unmagnified_grad: see :func:`scale_by_lora_rite`.
    update_skipping: see :func:`scale_by_lora_rite`.
    update_capping: see :func:`scale_by_lora_rite`.
    escape_mass: see :func:`scale_by_lora_rite`.
    pairing: see :func:`scale_by_lora_rite`.
    non_lora: transform for leaves that are not LoRA factors, routed by
      ``optax.partition`` (:func:`adaprelora_jax.lora_labels`); default
      ``optax.scale_by_adam()``.
    strict: raise, naming them, if the params contain leaves that are not
      LoRA factors.
    metrics: record the factor metrics of the step before the learning rate
      (:func:`adaprelora_jax.track_step_metrics`), for
      :func:`adaprelora_jax.step_metrics`.

  Returns:
    The corresponding :class:`optax.GradientTransformationExtraArgs`.

  Raises:
    ValueError: for a hyperparameter out of its range, naming it (see
      :func:`scale_by_lora_rite`).

  References:
    Yen, Si, Meng, Yu, Duvvuri, Dhillon, Hsieh, Kumar, `LoRA Done RITE:
    Robust Invariant Transformation Equilibration for LoRA Optimization
    <https://arxiv.org/abs/2410.20625>`_, ICLR 2025.
  """
  # The other hyperparameters are checked by scale_by_lora_rite.
  validation.check_positive("weight_decay", weight_decay, allow_zero=True)
  core = scale_by_lora_rite(
    b1,
    b2,
    eps,
    clip_unmagnified_grad=clip_unmagnified_grad,
    update_skipping=update_skipping,
    update_capping=update_capping,
    escape_mass=escape_mass,
    pairing=pairing,
  )
  return optax.chain(
    routing.partition_non_lora(core, pairing=pairing, non_lora=non_lora, strict=strict),
    optax.add_decayed_weights(weight_decay, mask),
    *([tracking.track_step_metrics(pairing=pairing)] if metrics else []),
    optax.scale_by_learning_rate(learning_rate),
  )
